"""The dashboard service as a process in front of a real control store: it registers with its HTTP address,
serves every page, answers bad input precisely, pushes the control store's change events as server-sent events,
and shows the banner while the control store is down, recovering by itself when it is back."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.client import Client
from tessera.dashboard.model import PAGES


def _get(url: str, timeout: float = 15.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_registers_with_its_http_address(dashboard: Any, store: Any) -> None:
    with Client(store.address) as c:
        (me,) = [i for i in c.instances("dashboard")]
    assert me.address == dashboard.address and f"http://{me.http_address}" == dashboard.url and me.metrics_address == ""


def test_every_page_and_bad_input(dashboard: Any) -> None:
    status, body = _get(dashboard.url + "/")
    assert status == 200 and 'data-page="cluster"' in body  # / redirects to the cluster page
    for page in PAGES:
        status, body = _get(f"{dashboard.url}/{page}")
        assert status == 200 and f'data-page="{page}"' in body and "store-down" not in body, body
        status, data = _get(f"{dashboard.url}/api/{page}")
        assert status == 200 and json.loads(data)["page"] == page
    status, body = _get(dashboard.url + "/nope")
    assert status == 404 and "No page nope" in body and 'href="/cluster"' in body
    status, data = _get(dashboard.url + "/api/<script>")
    assert status == 404 and json.loads(data) == {"error": "unknown page '<script>'", "pages": list(PAGES)}
    status, body = _get(dashboard.url + "/fragment/nope")
    assert status == 404
    status, js = _get(dashboard.url + "/static/vendor/uPlot.iife.min.js")
    assert status == 200 and "uPlot" in js  # the chart library comes from the package, not a CDN
    status, _ = _get(dashboard.url + "/static/vendor/uPlot.LICENSE")
    assert status == 200


def test_change_events_arrive_as_server_sent_events(dashboard: Any, store: Any) -> None:
    with urllib.request.urlopen(dashboard.url + "/events", timeout=15) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.readline() == b"retry: 2000\n"
        with Client(store.address) as c:
            c.stub.KvPut(pb.KvPutRequest(namespace="dashboard-test", key=b"k", value=b"v", overwrite=True),  # type: ignore[attr-defined]
                         timeout=10)
        deadline = time.monotonic() + 10
        lines: list[bytes] = []
        while time.monotonic() < deadline:
            lines.append(stream.readline())
            if lines[-1].startswith(b"data:") and b"kv" in lines[-1]:
                break
        assert b"event: change\n" in lines and any(b"kv" in x for x in lines if x.startswith(b"data:")), lines


@pytest.mark.timeout(180)
def test_banner_while_the_control_store_is_down(dashboard: Any, store: Any) -> None:
    store.stop()
    try:
        for page in PAGES:
            status, body = _get(f"{dashboard.url}/{page}")
            assert status == 200 and 'id="store-down"' in body and "Control store unavailable" in body
            assert "Traceback" not in body and store.address in body
        status, data = _get(dashboard.url + "/api/tasks")
        assert status == 200 and json.loads(data)["store_down"]
    finally:
        store.start()
    deadline = time.monotonic() + 30
    while "store-down" in _get(dashboard.url + "/fragment/cluster")[1]:  # nothing to restart: the next read works
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert dashboard.proc.poll() is None


def test_a_port_already_taken_is_one_line_naming_it(service_env: Any) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tessera.dashboard"], capture_output=True, text=True, timeout=60,
                           env=service_env(TESSERA_DASHBOARD_PORT=str(port), TESSERA_GRPC_PORT="0"))
    assert r.returncode == 1
    assert f"dashboard: cannot listen on 127.0.0.1:{port} (Address already in use)" in r.stderr
    assert "TESSERA_DASHBOARD_PORT" in r.stderr and "Traceback" not in r.stderr
