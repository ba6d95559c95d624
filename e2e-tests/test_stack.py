"""The whole stack, as `tessera up` runs it: health, events, traces, durability, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

import tessera
from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids
from tessera.common.config import SERVICES
from tessera.common.rpc import health_status

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SUBSCRIBER = r"""
import asyncio, sys
from tessera.common.bus import Bus
from tessera.common.telemetry import setup_tracing, shutdown_tracing

async def main():
    setup_tracing("e2e-subscriber")
    bus = await Bus.connect(sys.argv[1], name="e2e-subscriber")
    got = asyncio.Event()
    async def handle(msg):
        print("received", msg.subject, flush=True)
        got.set()
    await bus.subscribe("tessera.events.kv.e2e-trace.*", handle, queue="e2e-subscriber")
    await bus.nc.flush()
    print("ready", flush=True)
    await asyncio.wait_for(got.wait(), 30)
    await bus.close()
    shutdown_tracing()

asyncio.run(main())
"""

WRITER = r"""
import sys
from opentelemetry import trace
import tessera
from tessera.common.telemetry import current_trace_id, setup_tracing, shutdown_tracing

setup_tracing("e2e-client")
with trace.get_tracer("e2e").start_as_current_span("e2e write"):
    print(current_trace_id(), flush=True)
    tessera.connect(sys.argv[1]).kv_put("e2e-trace", b"traced", b"value")
shutdown_tracing()
"""


def test_all_six_services_serving(stack) -> None:
    status = stack.status()
    assert status["running"] and status["healthy"], status
    rows = {p["name"]: p for p in status["processes"]}
    for name in SERVICES:
        assert rows[name]["health"] == "SERVING", rows[name]
        assert health_status(rows[name]["address"]) == "SERVING"
    with tessera.connect(status["control_store_address"]) as c:
        assert {i.service for i in c.instances()} == set(SERVICES)


def test_control_store_write_seen_by_nats_subscriber(stack) -> None:
    status = stack.status()

    async def scenario() -> pb.ChangeEvent:
        import nats

        nc = await nats.connect(status["nats_url"])
        sub = await nc.subscribe("tessera.events.kv.e2e.>")
        await nc.flush()
        with tessera.connect(status["control_store_address"]) as c:
            await asyncio.to_thread(c.kv_put, "e2e", b"seen", b"by nats")
        msg = await sub.next_msg(timeout=10)
        await nc.close()
        assert msg.subject == "tessera.events.kv.e2e.created"
        assert msg.headers and "traceparent" in msg.headers
        return pb.ChangeEvent.FromString(msg.data)

    event = asyncio.run(scenario())
    assert event.table == "kv" and event.namespace == "e2e"
    assert [(c.key, c.value) for c in event.changes] == [(b"seen", b"by nats")]


def test_one_trace_across_grpc_and_nats(stack, otlp, poll) -> None:
    status = stack.status()
    sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, status["nats_url"]],
                           env=dict(stack.env, OTEL_SERVICE_NAME="e2e-subscriber"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.stdout.readline().strip() == "ready", sub.stderr.read()
        writer = subprocess.run([sys.executable, "-c", WRITER, status["control_store_address"]],
                                env=dict(stack.env, OTEL_SERVICE_NAME="e2e-client"),
                                capture_output=True, text=True, timeout=60)
        assert writer.returncode == 0, writer.stderr
        trace_id = writer.stdout.strip()
        assert sub.wait(30) == 0, sub.stderr.read()
    finally:
        if sub.poll() is None:
            sub.kill()

    def complete():
        spans = otlp.trace(trace_id)
        names = {(s.service, s.name) for s in spans}
        want = {("e2e-client", "e2e write"),
                ("control-store", "/tessera.control_store.v1.ControlStoreService/KvPut"),
                ("control-store", "send tessera.events.kv.e2e-trace.created"),
                ("e2e-subscriber", "process tessera.events.kv.e2e-trace.created")}
        return spans if want <= names else None

    spans = poll(complete, timeout=20, what=f"the spans of trace {trace_id}")
    by_id = {s.span_id: s for s in spans}

    def one(service: str, name: str):
        [s] = [s for s in spans if s.service == service and s.name == name]
        return s

    root = one("e2e-client", "e2e write")
    server = one("control-store", "/tessera.control_store.v1.ControlStoreService/KvPut")
    producer = one("control-store", "send tessera.events.kv.e2e-trace.created")
    consumer = one("e2e-subscriber", "process tessera.events.kv.e2e-trace.created")
    assert root.parent_span_id == ""
    # client span (gRPC instrumentation) sits between the root and the server span
    client = by_id[server.parent_span_id]
    assert client.service == "e2e-client" and client.parent_span_id == root.span_id
    assert producer.parent_span_id == server.span_id
    assert consumer.parent_span_id == producer.span_id
    assert producer.attributes["messaging.system"] == "nats"
    assert consumer.attributes["messaging.consumer.group.name"] == "e2e-subscriber"
    # health checks are not traced
    assert not any("grpc.health" in s.name for s in otlp.spans)


def test_control_store_kill9_loses_nothing(stack, poll) -> None:
    status = stack.status()
    addr = status["control_store_address"]
    job_id, task_id = ids.new_id("job_id"), ids.new_id("task_id")
    fn = b"def f(): return 1"
    with tessera.connect(addr) as c:
        c.kv_put("durable", b"k1", b"v1")
        stub = c.stub
        stub.CreateJob(pb.CreateJobRequest(job=pb.JobInfo(job_id=job_id, entrypoint="e2e")), timeout=5)
        fid = stub.ExportFunction(pb.ExportFunctionRequest(job_id=job_id, name="f", code=fn), timeout=5).function_id
        stub.CreateTasks(pb.CreateTasksRequest(specs=[pb.TaskSpec(task_id=task_id, job_id=job_id, function_id=fid,
                                                                  num_returns=1)]), timeout=5)
    before = stack.proc("control-store")
    os.kill(before["pid"], signal.SIGKILL)

    def restarted():
        p = stack.proc("control-store")
        return p if p["restarts"] > before["restarts"] and p["health"] == "SERVING" else None

    after = poll(restarted, timeout=60, interval=0.3, what="the control store to be restarted")
    assert after["pid"] != before["pid"]
    assert "SIGKILL" in after["last_exit"]
    with tessera.connect(addr) as c:
        assert c.kv_get("durable", b"k1") == b"v1"
        stub = c.stub
        assert stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5).job.entrypoint == "e2e"
        assert stub.GetFunction(pb.GetFunctionRequest(function_id=fid), timeout=5).function.code == fn
        [task] = stub.GetTasks(pb.GetTasksRequest(task_ids=[task_id]), timeout=5).tasks
        assert task.state == pb.TASK_STATE_PENDING and task.spec.function_id == fid


def test_bad_request_gets_precise_status(stack) -> None:
    with tessera.connect(stack.status()["control_store_address"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.stub.GetTasks(pb.GetTasksRequest(task_ids=[b"short"]), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "task_id must be 16 bytes, got 5 bytes" in e.value.details()


def test_down_leaves_no_process(stack, poll) -> None:
    pids = stack.pids()
    assert len(pids) == 1 + 2 + len(SERVICES)  # supervisor, nats, redis, six services
    down = stack.cli("down", timeout=60)
    assert down.returncode == 0, down.stderr
    from tessera._launcher.rundir import alive

    poll(lambda: not any(alive(p) for p in pids), timeout=10, what="every process to exit")
    assert not (stack.run_dir / "cluster.json").exists()
    assert stack.cli("status").returncode == 2
