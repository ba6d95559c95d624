"""Metrics of a live `tessera up` stack, scraped from each process's Prometheus /metrics endpoint: every
service serves one, `tessera status` and the control store name it, and the figures follow what was run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from stacks import Cluster, poll_until, running

SERVICES = ("control-store", "object-store", "task-scheduler")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory, "metrics", "--services", ",".join(SERVICES), TESSERA_NUM_CPUS="1",
                 TESSERA_LOG_FORMAT="json") as c:
        yield c


def scrape(url: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s series that carry ``labels`` (0 when there is none)."""
    total = 0.0
    for series, v in samples.items():
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{want}"' in rest for k, want in labels.items()):
            total += v
    return total


def test_each_process_serves_metrics_and_status_names_them(cluster: Cluster) -> None:
    status = cluster.status()
    urls = {p["name"]: p["metrics"] for p in status["processes"] if p["kind"] == "service"}
    assert set(urls) == set(SERVICES)
    assert all(re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", u) for u in urls.values()), urls
    assert "METRICS" in cluster.cli("status").stdout
    import tessera

    with tessera.connect(cluster.info()["control_store_address"]) as c:  # registered with each replica
        registered = {i.service: i.metrics_address for i in c.instances()}
    assert {s: f"http://{a}/metrics" for s, a in registered.items()} == urls
    remote = json.loads(cluster.cli("status", "--json", "--address", cluster.info()["control_store_address"]).stdout)
    assert {p["name"]: p["metrics"] for p in remote["processes"]} == urls  # as a remote cluster's status shows them
    for name, url in urls.items():
        samples = scrape(url)
        assert f'service_name="{name}"' in next(k for k in samples if k.startswith("target_info"))


def test_task_and_rpc_and_nats_figures_follow_what_ran(cluster: Cluster) -> None:
    agent = cluster.proc("task-scheduler")["metrics"]
    store = cluster.proc("object-store")["metrics"]
    before = scrape(agent)
    finished0 = value(before, "tessera_tasks_finished_total")
    import tessera

    with cluster.driving("metrics"):
        @tessera.remote
        def sq(x: int) -> int:
            return x * x

        assert sum(tessera.get([sq.remote(i) for i in range(7)])) == 91
        big = tessera.put(b"x" * 300_000)
        objects = scrape(store)  # while the driver holds it
        assert value(objects, "tessera_object_store_objects", tessera_object_location="memory") >= 1
        assert value(objects, "tessera_object_store_used_bytes") >= 300_000
        assert value(objects, "tessera_object_store_capacity_bytes") > 0
        del big

    after = poll_until(lambda: (s := scrape(agent)) and value(s, "tessera_tasks_finished_total") >= finished0 + 7
                       and s, timeout=30, what="7 more tasks finished")
    assert value(after, "tessera_tasks_finished_total") == finished0 + 7
    assert value(after, "tessera_tasks_received_total") == 0  # one node: nothing forwarded from another
    assert value(after, "tessera_tasks", tessera_task_state="running") == 0
    assert value(after, "tessera_workers") >= 1
    # the driver's session with the node agent went through the gRPC server: its calls were timed
    assert value(after, "rpc_server_call_duration_seconds_count", rpc_system="grpc", rpc_grpc_status_code="0") > 0
    assert any('le="+Inf"' in k for k in after if k.startswith("rpc_server_call_duration_seconds_bucket"))

    # every service talks over NATS: the heartbeats and events it sent are counted per subject
    cs = scrape(cluster.proc("control-store")["metrics"])
    sent = {k for k in cs if k.startswith("messaging_client_sent_messages_total")}
    assert sent and all('messaging_system="nats"' in k for k in sent), sent


def test_metrics_endpoint_answers_only_metrics(cluster: Cluster) -> None:
    url = cluster.proc("control-store")["metrics"].replace("/metrics", "/other")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 404


def test_status_json_names_metrics(cluster: Cluster) -> None:
    status = json.loads(cluster.cli("status", "--json").stdout)
    assert all(p["metrics"] == "" for p in status["processes"] if p["kind"] != "service")


def test_a_driver_sets_up_opentelemetry_from_the_environment(cluster: Cluster) -> None:
    """``tessera.init()`` installs a tracer provider from OTEL_* (here the console exporter): the driver's own
    calls to the cluster are spans under its service name, with no OpenTelemetry code in the program."""
    code = ("import tessera\ntessera.init(name='otel')\n@tessera.remote\ndef one():\n    return 1\n"
            "assert tessera.get(one.remote()) == 1\ntessera.shutdown()")
    env = {**cluster.env, "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "my-driver"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"service.name": "my-driver"' in out.stdout
    assert '"name": "/tessera.control_store.v1.ControlStoreService/CreateJob"' in out.stdout, out.stdout[-2000:]


def test_services_log_json_lines_under_tessera_log_format(cluster: Cluster) -> None:
    from tessera._launcher.rundir import RunDir

    lines = RunDir(cluster.run_dir).log("control-store").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records, lines[:5]
    # no line in the text format (other output, such as a library writing to stderr itself, may be there)
    assert not [line for line in lines if " control-store " in line and " trace=" in line]
    assert {r["service"] for r in records} == {"control-store"}
    assert any(r["message"].startswith("control-store SERVING at ") for r in records)
