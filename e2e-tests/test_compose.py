"""The platform as compose runs it: every service registered and serving, scaled replicas, traces in Jaeger.

`make compose-test` (scripts/compose_test.sh) builds the images, starts the stack with
`--scale node=2 --scale serving=2`, runs this module with TESSERA_E2E_STACK=compose (host drivers reach
the stack through the gateway, as users do) and tears the stack
down. Without a container engine the same tests run against `tessera up` (the default
``stack`` fixture); those that need compose itself (replicas, Jaeger) are skipped there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import tessera
from tessera.api.serving.v1 import serving_pb2, serving_pb2_grpc
from tessera.common.config import SERVICES
from tessera.common.rpc import authorized, health_status

pytestmark = [pytest.mark.compose, pytest.mark.e2e, pytest.mark.timeout(330)]

# The gRPC service each Tessera service serves (beside health and reflection).
GRPC_SERVICE = {
    "control-store": "tessera.control_store.v1.ControlStoreService",
    "object-store": "tessera.object_store.v1.ObjectStoreService",
    "task-scheduler": "tessera.task_scheduler.v1.TaskSchedulerService",
    "compiler": "tessera.compiler.v1.CompilerService",
    "gpu-scheduler": "tessera.gpu_scheduler.v1.GpuSchedulerService",
    "serving": "tessera.serving.v1.ServingService",
}


class Target:
    """What the tests need of a stack, the same for compose and for `tessera up`."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.compose = os.environ.get("TESSERA_E2E_STACK", "up") == "compose"

    @property
    def control_store_address(self) -> str:
        return str(self.stack.control_store_address if self.compose else self.stack.status()["control_store_address"])

    def reachable(self, address: str) -> str:
        return str(self.stack.reachable(address)) if self.compose else address

    def instances(self, service: str = "") -> list[Any]:
        with tessera.connect(self.control_store_address) as c:
            return c.instances(service)

    def containers(self, service: str) -> list[dict[str, Any]]:
        return [c for c in self.stack.containers() if c["service"] == service] if self.compose else []


@pytest.fixture(scope="module")
def target(stack: Any) -> Target:
    return Target(stack)


def reflected_services(address: str) -> set[str]:
    """Service names that server reflection lists at ``address`` (what `grpcurl list` shows)."""
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        return {s.name for r in stub.ServerReflectionInfo(iter([req]), timeout=5)
                for s in r.list_services_response.service}


def test_every_service_registered_serving_and_reflected(target: Target, poll: Callable[..., Any]) -> None:
    instances = poll(lambda: (lambda xs: xs if {i.service for i in xs} >= set(SERVICES) else None)(target.instances()),
                     timeout=60, what="all six services registered in the control store")
    # beside the six: the GPU node agents, and under compose the gateway and the global scheduler
    assert {i.service for i in instances} - set(SERVICES) <= {"gpu-agent", "gateway", "global-scheduler"}
    for inst in instances:
        if inst.service not in GRPC_SERVICE:
            continue
        address = target.reachable(inst.address)
        # through the SDK's channels (under compose: the gateway, naming the replica), and reflection directly
        assert health_status(inst.address, timeout=5) == "SERVING", (inst.service, inst.address)
        assert {GRPC_SERVICE[inst.service], "grpc.health.v1.Health"} <= reflected_services(address), inst


# ---- scaled replicas -----------------------------------------------------------------

def serving_stats(stub: serving_pb2_grpc.ServingServiceStub) -> str:
    """One request to whichever replica the channel picks; returns the replica that answered."""
    return str(stub.GetStats(serving_pb2.GetStatsRequest(), timeout=5).instance_id)


# Requests spread over the replicas: each returns the instance id of the replica that answered.
# (Predict joins here once a pipeline is registered on every replica.)
SERVING_CALLS: list[Callable[[serving_pb2_grpc.ServingServiceStub], str]] = [serving_stats]


def test_scaled_serving_replicas_share_the_requests(target: Target, poll: Callable[..., Any]) -> None:
    if not target.compose:
        pytest.skip("replicas need the compose stack (`--scale serving=2`); `tessera up` runs one serving process")
    containers = target.containers("serving")
    assert len(containers) >= 2, f"the stack runs {len(containers)} serving container(s); start it with --scale serving=2"
    replicas = poll(lambda: (lambda xs: xs if len(xs) >= len(containers) else None)(target.instances("serving")),
                    timeout=60, what=f"{len(containers)} serving replicas registered")
    assert len({r.instance_id for r in replicas}) == len(replicas) == len(containers)
    assert len({r.address for r in replicas}) == len(replicas), "replicas advertise distinct addresses"
    addresses = [target.reachable(r.address) for r in replicas]
    for r, address in zip(replicas, addresses, strict=True):
        assert health_status(r.address, timeout=5) == "SERVING", r
        assert GRPC_SERVICE["serving"] in reflected_services(address), r

    # One client, round robin over every replica: the calls land on all of them.
    target_uri = "ipv4:" + ",".join(addresses)
    with grpc.insecure_channel(target_uri, options=[("grpc.lb_policy_name", "round_robin")]) as ch:
        stub = serving_pb2_grpc.ServingServiceStub(authorized(ch))  # the stack's token (compose: its secret)
        for call in SERVING_CALLS:
            answered = [call(stub) for _ in range(4 * len(replicas))]
            assert set(answered) == {r.instance_id for r in replicas}, (call.__name__, answered)


# ---- a driver on the host ------------------------------------------------------------

def host_driver(target: Target, code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """A driver process on the host that knows only the stack's published address (compose: the gateway)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_E2E")}
    env["TESSERA_ADDRESS"] = target.control_store_address
    env.pop("TESSERA_RUN_DIR", None)
    if not target.compose:
        env["TESSERA_RUN_DIR"] = str(target.stack.run_dir)
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


NODES = r"""
import json, os, time, numpy as np, tessera
tessera.init()

@tessera.remote
def read_on_some_node(a, s):
    time.sleep(s)
    return os.environ["TESSERA_NODE_ID"], float(a.sum())

data = np.arange(4_000_000, dtype=np.float32)  # 16 MB: in the object store of the driver's node
ref = tessera.put(data)
# SPREAD hands the tasks to the nodes in turn: those on the other node pull the object there (spilling from a
# busy node depends on timing that two shared cores do not guarantee)
spread = read_on_some_node.options(scheduling_strategy="SPREAD")
ran = tessera.get([spread.remote(ref, 0.1) for _ in range(20)], timeout=180)
back = tessera.get(ref)
print(json.dumps({"nodes": sorted({n for n, _ in ran}), "sums": sorted({s for _, s in ran}), "want": float(data.sum()),
                  "same": bool((back == data).all()), "agents": len(tessera.connect().instances("task-scheduler"))}))
tessera.shutdown()
"""


def test_a_task_on_the_second_node_reads_an_object_put_from_the_host(target: Target) -> None:
    if not target.compose:
        pytest.skip("two nodes from the host need the compose stack (`--scale node=2`); test_tasks.py covers `tessera up`")
    r = host_driver(target, NODES)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["agents"] >= 2, "start the stack with --scale node=2"
    assert len(out["nodes"]) == 2, f"every task ran on one node: {out['nodes']}"
    assert out["sums"] == [out["want"]] and out["same"]


def test_the_demo_story_from_the_host(target: Target) -> None:
    """Tasks, actors, objects both ways, GPU jobs, a compile and predictions, from the host through the
    published address alone: examples/demo.py --small --address."""
    if not target.compose:
        pytest.skip("e2e-tests/test_demo.py runs the demo against `tessera up`")
    demo = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.py")
    r = host_driver(target, "", demo, "--small", "--address", target.control_store_address, timeout=280)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "3/3 jobs done" in r.stdout, r.stdout[-3000:]
    assert "policy answers agree with the compiled model" in r.stdout, r.stdout[-3000:]


def test_serving_http_is_published(target: Target) -> None:
    if not target.compose:
        pytest.skip("the published HTTP port is the compose stack's")
    url = f"http://{target.control_store_address.rsplit(':', 1)[0]}:{os.environ.get('GATEWAY_HTTP_HOST_PORT', '8000')}"
    token = ""
    path = os.environ.get("TESSERA_AUTH_TOKEN_FILE", "")
    if path:
        with open(path) as f:
            token = f.read().strip()
    req = urllib.request.Request(f"{url}/v1/pipelines", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        assert "pipelines" in json.loads(resp.read())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}/v1/pipelines", timeout=30)
    assert e.value.code == 401  # the token is required there as on gRPC
    # KServe v2 on the same port: the probe open, the rest under the token
    with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=30) as resp:
        assert json.loads(resp.read()) == {"ready": True}
    req = urllib.request.Request(f"{url}/v2", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read())["name"] == "tessera-serving"


# ---- traces in Jaeger ----------------------------------------------------------------

CLIENT = r"""
import sys, grpc
from opentelemetry import trace
from tessera.api.object_store.v1 import object_store_pb2 as pb, object_store_pb2_grpc as g
from tessera.common import rpc
from tessera.common.telemetry import current_trace_id, setup_tracing, shutdown_tracing

setup_tracing("e2e-client")
with trace.get_tracer("e2e").start_as_current_span("e2e get"):
    print(current_trace_id(), flush=True)
    ch = rpc.channel(sys.argv[1])
    stub = g.ObjectStoreServiceStub(ch)
    session = stub.OpenSession(pb.OpenSessionRequest(client_name="e2e"), timeout=30)
    sid = next(session).session_id
    # An object no store holds: the store asks the control store where it is (object-store -> control-store).
    try:
        stub.GetObjects(pb.GetObjectsRequest(session_id=sid, object_ids=[bytes(20)], timeout_ms=300), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    else:
        raise SystemExit("GetObjects of an object nobody holds returned")
    ch.close()  # ends the session stream too
shutdown_tracing()
"""


def jaeger_get(base: str, path: str, **query: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def service_edges(trace: dict[str, Any]) -> set[tuple[str, str]]:
    """(parent service, child service) for each CHILD_OF reference that crosses services in a Jaeger trace."""
    service = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
    span_service = {s["spanID"]: service[s["processID"]] for s in trace["spans"]}
    edges = set()
    for s in trace["spans"]:
        for ref in s.get("references") or []:
            parent = span_service.get(ref["spanID"])
            child = span_service[s["spanID"]]
            if ref.get("refType") == "CHILD_OF" and parent and parent != child:
                edges.add((parent, child))
    return edges


class Collector:
    """Where the stack's spans go, as the host reaches it: Jaeger (its query API), or, where Jaeger's image
    could not be pulled, the OTLP receiver scripts/compose_test.sh runs on the host (its span file)."""

    def __init__(self, otlp: str, jaeger_url: str = "", spans_file: str = "") -> None:
        self.otlp, self.jaeger_url, self.spans_file = otlp, jaeger_url, spans_file

    def edges(self, trace_id: str) -> set[tuple[str, str]]:
        if self.jaeger_url:
            try:
                data = jaeger_get(self.jaeger_url, f"/api/traces/{trace_id}")["data"]
            except OSError:  # 404 until the spans are in
                return set()
            return service_edges(data[0]) if data else set()
        spans = []
        with open(self.spans_file) as f:
            for line in f:
                d = json.loads(line)
                if d["trace_id"] == trace_id:
                    spans.append(d)
        service = {d["span_id"]: d["service"] for d in spans}
        return {(service[d["parent_span_id"]], d["service"]) for d in spans
                if d["parent_span_id"] in service and service[d["parent_span_id"]] != d["service"]}

    def health_checks_traced(self, service: str) -> bool:
        if self.jaeger_url:
            return bool(jaeger_get(self.jaeger_url, "/api/traces", service=service,
                                   operation="/grpc.health.v1.Health/Check", limit="5", lookback="1h").get("data"))
        with open(self.spans_file) as f:
            return any(json.loads(line)["service"] == service and "grpc.health.v1.Health" in json.loads(line)["name"]
                       for line in f)


@pytest.fixture(scope="module")
def collector(target: Target) -> Collector:
    """Jaeger's query API on the host and its OTLP/gRPC endpoint on the compose network, or the tests' receiver."""
    if not target.compose:
        pytest.skip("Jaeger runs in the compose stack; under `tessera up` test_stack.py checks traces with its own receiver")
    found = target.containers("jaeger")
    if found:
        return Collector(f"http://{found[0]['ip']}:{os.environ.get('JAEGER_OTLP_GRPC_PORT', '4317')}",
                         jaeger_url=target.stack.jaeger_url)
    spans = os.environ.get("TESSERA_E2E_OTLP_SPANS", "")
    if not spans:
        pytest.skip("the compose stack runs without Jaeger and without the tests' OTLP receiver")
    port = os.environ.get("OTEL_COLLECTOR_ENDPOINT", "").rsplit(":", 1)[-1]
    return Collector(f"http://127.0.0.1:{port}", spans_file=spans)


def test_trace_edges_client_object_store_control_store(target: Target, collector: Collector,
                                                       poll: Callable[..., Any]) -> None:
    stores = target.instances("object-store")
    assert stores, "no object store registered"
    store = stores[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_SERVICE_NAME="e2e-client", OTEL_EXPORTER_OTLP_ENDPOINT=collector.otlp, OTEL_BSP_SCHEDULE_DELAY="200")
    run = subprocess.run([sys.executable, "-c", CLIENT, target.reachable(store.address)], env=env,
                         capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    trace_id = run.stdout.strip()
    want = {("e2e-client", "object-store"), ("object-store", "control-store")}

    def edges() -> set[tuple[str, str]] | None:
        got = collector.edges(trace_id)
        return got if want <= got else None

    got = poll(edges, timeout=60, interval=1.0, what=f"trace {trace_id} with edges {sorted(want)}")
    assert want <= got
    # Health checks are not traced (compose_wait.py and this module made many).
    for service in ("control-store", "object-store"):
        assert not collector.health_checks_traced(service), f"{service}: health checks were traced"


HOST_TRACE = r"""
import tessera
from opentelemetry import trace
from tessera.common.telemetry import current_trace_id, setup_tracing, shutdown_tracing
setup_tracing("e2e-host-driver")
with trace.get_tracer("e2e").start_as_current_span("from the host"):
    print(current_trace_id(), flush=True)
    tessera.init()

    @tessera.remote
    def one():
        return 1

    assert tessera.get(one.remote(), timeout=60) == 1
    tessera.shutdown()
shutdown_tracing()
"""


def test_one_trace_from_the_host_through_the_gateway(target: Target, collector: Collector,
                                                     poll: Callable[..., Any]) -> None:
    env_otel = {"OTEL_SERVICE_NAME": "e2e-host-driver", "OTEL_EXPORTER_OTLP_ENDPOINT": collector.otlp,
                "OTEL_BSP_SCHEDULE_DELAY": "200"}
    saved = {k: os.environ.get(k) for k in env_otel}
    os.environ.update(env_otel)
    try:
        r = host_driver(target, HOST_TRACE)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert r.returncode == 0, r.stderr[-4000:]
    trace_id = r.stdout.strip().splitlines()[0]
    # the driver's calls go through the gateway; the task runs in the driver's trace (its spec carries it)
    want = {("e2e-host-driver", "gateway"), ("gateway", "control-store"), ("e2e-host-driver", "task-scheduler")}

    def edges() -> set[tuple[str, str]] | None:
        got = collector.edges(trace_id)
        return got if want <= got else None

    assert want <= poll(edges, timeout=60, interval=1.0, what=f"trace {trace_id} with edges {sorted(want)}")
