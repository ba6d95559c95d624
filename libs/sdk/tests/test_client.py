"""tessera.connect() against a real control-store process."""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import tessera
from tessera.client import Client, ClusterNotFoundError, Event
from tessera.common import procs
from tessera.common.rpc import health_status
from tessera.testing import NatsServer, redis_server, track


@pytest.fixture(scope="module")
def address(nats_srv: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a control-store process with a Redis of its own."""
    logs = tmp_path_factory.mktemp("control-store")
    with redis_server() as r:
        port = procs.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
        env.update(TESSERA_NATS_URL=nats_srv.url, TESSERA_REDIS_URLS=r.url, TESSERA_GRPC_PORT=str(port),
                   TESSERA_CONTROL_STORE_ADDRESS=f"127.0.0.1:{port}", TESSERA_INSTANCE_ID="cs-sdk",
                   TESSERA_SHUTDOWN_GRACE_S="1", OTEL_TRACES_SAMPLER="always_off")
        proc = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=logs / "cs.log", env=env)
        track(proc)
        addr = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while health_status(addr, timeout=0.5) != "SERVING":
                assert proc.poll() is None, (logs / "cs.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "control store not SERVING in 30s"
                time.sleep(0.05)
            yield addr
        finally:
            procs.stop(proc)


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    with tessera.connect(address, timeout=5) as c:
        yield c


@pytest.fixture
def ns() -> str:
    return "sdk-" + uuid.uuid4().hex[:10]


def test_kv(client: Client, ns: str) -> None:
    assert client.address.startswith("127.0.0.1:")
    assert client.kv_put(ns, b"greeting", b"hello") is True
    assert client.kv_get(ns, b"greeting") == b"hello"
    assert client.kv_put(ns, b"greeting", b"hi") is False  # overwritten
    assert client.kv_get(ns, b"greeting") == b"hi"
    client.kv_put(ns, b"g2", b"x")
    client.kv_put(ns, b"other", b"y")
    assert client.kv_list(ns) == [b"g2", b"greeting", b"other"]
    assert client.kv_list(ns, b"g") == [b"g2", b"greeting"]
    assert client.kv_delete(ns, b"g2") is True
    assert client.kv_delete(ns, b"g2") is False
    assert client.kv_list(ns, b"g") == [b"greeting"]


def test_kv_errors(client: Client, ns: str) -> None:
    client.kv_put(ns, b"k", b"v")
    with pytest.raises(grpc.RpcError) as e:
        client.kv_put(ns, b"k", b"other", overwrite=False)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    assert client.kv_get(ns, b"k") == b"v"
    with pytest.raises(grpc.RpcError) as e:
        client.kv_get(ns, b"missing")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert e.value.details() == f"key b'missing' not found in namespace '{ns}'"  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["bad namespace", "", "a.b", "x" * 65])
def test_bad_namespace(client: Client, bad: str) -> None:
    calls = [lambda: client.kv_put(bad, b"k", b"v"), lambda: client.kv_get(bad, b"k"), lambda: client.kv_list(bad)]
    if bad:  # watching namespace "" means every namespace
        calls.append(lambda: next(client.watch("kv", namespace=bad, timeout=5)))
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert e.value.details().startswith(f"namespace {bad!r} must be 1-64 characters")  # type: ignore[attr-defined]


def test_watch_yields_changes_made_after_ready(client: Client, ns: str) -> None:
    ready = threading.Event()
    got: queue.Queue[Event | BaseException] = queue.Queue()

    def watch() -> None:
        try:
            for ev in client.watch("kv", namespace=ns, timeout=15, ready=ready):
                got.put(ev)
                if ev.op == "deleted":
                    return  # leaving the loop cancels the stream
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            got.put(e)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert ready.wait(10), "watch never became ready"
    client.kv_put(ns, b"k", b"v1")
    client.kv_put(ns, b"k", b"v2")
    client.kv_put("elsewhere-" + ns[4:], b"k", b"not for this watch")
    client.kv_delete(ns, b"k")
    events = [got.get(timeout=5) for _ in range(3)]
    t.join(5)
    assert not t.is_alive()
    assert events == [Event("kv", "created", b"k", b"v1", ns), Event("kv", "updated", b"k", b"v2", ns),
                      Event("kv", "deleted", b"k", b"", ns)]
    assert got.empty()


def test_watch_ends_quietly_at_its_timeout(client: Client, ns: str) -> None:
    t0 = time.monotonic()
    assert list(client.watch("kv", namespace=ns, timeout=0.5)) == []
    assert time.monotonic() - t0 < 5


def test_watch_rejects_an_unknown_table(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as e:
        next(client.watch("widgets", timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_cluster_queries(client: Client) -> None:
    (me,) = client.instances("control-store")
    assert me.instance_id == "cs-sdk" and me.address == client.address
    assert client.nodes() == [] or all(n.node_id for n in client.nodes())


def test_address_from_the_environment(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_ADDRESS", address)
    with tessera.connect() as c:
        assert c.address == address
        c.kv_put("sdk-env", b"k", b"v")
        assert c.kv_get("sdk-env", b"k") == b"v"


def test_no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TESSERA_ADDRESS", raising=False)
    monkeypatch.setenv("TESSERA_RUN_DIR", str(tmp_path))
    with pytest.raises(ClusterNotFoundError, match="no Tessera cluster found"):
        tessera.connect()
