"""A driver outside the cluster's network, through the gateway (tessera.gateway): the whole API over one
address, as the host of a compose stack reaches it.

The cluster is `tessera up`'s; the gateway runs beside it as compose runs it, and the driver is told
nothing but the gateway's address. Being on the same host, the driver is kept off the node-local paths
(the agent's Unix socket, the mapped arena) so that every byte goes through the gateway, as it must from
a host that shares no memory with the nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from stacks import Cluster, clean_env, poll_until, running

from tessera.common import procs, rpc
from tessera.testing import track

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], address: str, http: str, log: Path) -> None:
        self.proc, self.address, self.http, self.log = proc, address, http, log


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, otlp: Any) -> Iterator[Cluster]:
    with running(tmp_path_factory, "gw", "--gpus-per-node", "1", otlp_endpoint=otlp.endpoint,
                 TESSERA_GPU_SCHEDULER_QUANTUM_S="3") as c:
        yield c


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    info = cluster.info()
    port, http = procs.free_port(), procs.free_port()
    log = tmp_path_factory.mktemp("gwlog") / "gateway.log"
    env = {**cluster.env, "TESSERA_CONTROL_STORE_ADDRESS": info["control_store_address"],
           "TESSERA_NATS_URL": info["nats_url"], "TESSERA_GRPC_HOST": "127.0.0.1", "TESSERA_GRPC_PORT": str(port),
           "TESSERA_GATEWAY_HTTP_PORT": str(http), "OTEL_SERVICE_NAME": "gateway"}
    proc = subprocess.Popen([sys.executable, "-m", "tessera.gateway"], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)
    track(proc.pid)
    try:
        address = f"127.0.0.1:{port}"
        poll_until(lambda: rpc.is_gateway(address, timeout=1.0), timeout=60, interval=0.3, what="the gateway")
        yield Gateway(proc, address, f"127.0.0.1:{http}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def outside_env(cluster: Cluster, tmp: Path, **extra: str) -> dict[str, str]:
    """A driver's environment that knows no cluster but the address it is given, and keeps off node-local paths."""
    env = clean_env(tmp / "no-cluster-here", TESSERA_SESSION_TRANSPORT="grpc", TESSERA_CLIENT_MODE="remote")
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY"):
        if k in cluster.env:
            env[k] = cluster.env[k]
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.update(extra)
    return env


def run_driver(code: str, env: dict[str, str], timeout: float = 240) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"driver failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_a_driver_outside_reaches_the_whole_api_through_the_gateway(cluster: Cluster, gateway: Gateway,
                                                                     otlp: Any, tmp_path: Path) -> None:
    out = run_driver(f"""
        import json, numpy as np, tessera
        from opentelemetry import trace
        from tessera.common import rpc
        from tessera.common.telemetry import current_trace_id, setup_tracing, shutdown_tracing
        setup_tracing("outside-driver")
        with trace.get_tracer("t").start_as_current_span("outside"):
            tid = current_trace_id()
            tessera.init(address="{gateway.address}")
            gw = rpc.gateway_address()

            @tessera.remote
            def total(a):
                return float(a.sum())

            @tessera.remote
            def make(n):
                return np.full(n, 2.0, dtype=np.float32)

            @tessera.remote
            class Counter:
                def __init__(self):
                    self.n = 0
                def add(self, k):
                    self.n += k
                    return self.n

            big = np.arange(6_000_000, dtype=np.float32)  # 24 MB: streamed over gRPC both ways
            ref = tessera.put(big)
            back = tessera.get(ref)
            made = tessera.get(make.remote(5_000_000))
            c = Counter.remote()
            counts = tessera.get([c.add.remote(i) for i in range(1, 4)])
            out = dict(gateway=gw, same=bool((back == big).all()), total=tessera.get(total.remote(ref)),
                       want=float(big.sum()), made=[int(made.size), float(made[0])], counts=counts, trace_id=tid,
                       agents=sorted(i.address for i in tessera.connect().instances("task-scheduler")))
            tessera.shutdown()
        shutdown_tracing()
        print(json.dumps(out))
    """, outside_env(cluster, tmp_path))
    assert out["gateway"] == gateway.address
    assert out["same"] and out["total"] == out["want"]
    assert out["made"] == [5_000_000, 2.0]
    assert out["counts"] == [1, 3, 6]
    # One trace, with the gateway on its edges: driver -> gateway -> replica.
    spans = poll_until(lambda: [s for s in otlp.trace(out["trace_id"]) if s.service == "gateway"] and
                       otlp.trace(out["trace_id"]), timeout=30, what="the gateway's spans in the driver's trace")
    by_id = {s.span_id: s for s in spans}
    gw_spans = [s for s in spans if s.service == "gateway"]
    assert any(by_id.get(s.parent_span_id, None) is not None and by_id[s.parent_span_id].service == "outside-driver"
               for s in gw_spans), "no gateway span is a child of the driver's"
    below = [s for s in spans if s.parent_span_id in {g.span_id for g in gw_spans} and s.service != "gateway"]
    assert below, "no replica's span continues a gateway span"


def test_a_job_whose_entry_point_is_a_local_file_runs_on_a_node_that_never_saw_it(
        cluster: Cluster, gateway: Gateway, tmp_path: Path) -> None:
    code = tmp_path / "job"
    code.mkdir()
    (code / "helper.py").write_text("def answer():\n    return 42\n")
    (code / "train.py").write_text(textwrap.dedent("""
        import helper
        from tessera import gpu

        def main(steps):
            job = gpu.init()
            for _ in range(job.restore(), int(steps)):
                job.step(answer=helper.answer())
            job.finish(answer=helper.answer())
    """))
    out = run_driver(f"""
        import json, time
        from tessera.gpu import GpuClient
        with GpuClient(cluster_address="{gateway.address}", timeout=30) as g:
            jid = g.submit(entry_point="{code / 'train.py'}:main", args=["5"], name="local-file")
            spec = g.status(jid).spec
            deadline = time.monotonic() + 120
            while g.status(jid).state not in (4, 5, 6) and time.monotonic() < deadline:
                time.sleep(0.5)
            j = g.status(jid)
        print(json.dumps(dict(state=j.state, message=j.message, metrics=dict(j.metrics), entry=spec.entry_point,
                              working_dir=spec.working_dir)))
    """, outside_env(cluster, tmp_path))
    assert out["entry"] == "train.py:main" and out["working_dir"].startswith("pkg:")
    assert out["state"] == 4, out  # SUCCEEDED
    assert out["metrics"].get("answer") == 42.0


def test_a_call_naming_no_registered_replica_is_refused(gateway: Gateway, cluster: Cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(gateway.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10,
                       metadata=[(rpc.ROUTE_HEADER, "169.254.1.1:22")])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no replica is registered at 169.254.1.1:22" in (e.value.details() or "")
        # the gateway's own health, and a registered replica's through it
        assert stub.Check(health_pb2.HealthCheckRequest(service=rpc.GATEWAY_HEALTH_SERVICE), timeout=10).status == 1
        cs = cluster.info()["control_store_address"]
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=[(rpc.ROUTE_HEADER, cs)]).status == 1


def test_the_http_port_relays_to_serving(gateway: Gateway) -> None:
    with urllib.request.urlopen(f"http://{gateway.http}/v1/pipelines", timeout=30) as r:
        assert r.status == 200
        assert "pipelines" in json.loads(r.read())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{gateway.http}/v1/pipelines/nope:predict",
                               data=b'{"records": [{"text": "hi"}]}', timeout=30)
    assert e.value.code == 404, e.value.read()
    assert "error" in json.loads(e.value.read())  # serving's own answer, relayed


def test_the_sdk_finds_no_gateway_at_a_control_store(cluster: Cluster) -> None:
    assert not rpc.is_gateway(cluster.info()["control_store_address"], timeout=5.0)
    assert not rpc.is_gateway(f"127.0.0.1:{procs.free_port()}", timeout=2.0)
    assert os.environ.get("TESSERA_GATEWAY", "") == ""
