"""Wiring of the gpu-scheduler service: one process per cluster schedules; one per node
(started with ``TESSERA_NODE_ID``, as ``tessera up --gpus-per-node G`` does) is that node's agent.

Control store KV namespaces: ``gpu-jobs`` (job records), ``gpu-agents`` (what each agent runs).
NATS: ``tessera.gpu.agent.<node>.cmd`` (requests to an agent), ``tessera.gpu.events.job.<state>``
(a JobInfo each time a job changes state).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry.metrics import MeterProvider

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as pb
from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2_grpc as pb_grpc
from tessera.common import errors, packages
from tessera.common.config import Settings
from tessera.common.metrics import observe
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import ServiceApp
from tessera.common.telemetry import context_from_env
from tessera.gpu_scheduler.agent import NodeAgent, discover_gpus
from tessera.gpu_scheduler.policy import make_policy
from tessera.gpu_scheduler.scheduler import GpuScheduler, state_name
from tessera.gpu_scheduler.servicer import GpuSchedulerServicer

NAME = "gpu-scheduler"
AGENT_NAME = "gpu-agent"
SERVICE = "tessera.gpu_scheduler.v1.GpuSchedulerService"
JOBS_NS, AGENTS_NS = "gpu-jobs", "gpu-agents"

log = logging.getLogger(__name__)


def agent_subject(node_id: str) -> str:
    return f"tessera.gpu.agent.{node_id}.cmd"


def decode_message(data: bytes, what: str) -> dict[str, Any]:
    """A command or reply on NATS: a JSON object, or InvalidArgumentError saying why not."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise errors.InvalidArgumentError(f"{what} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise errors.InvalidArgumentError(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


class ControlStoreKV:
    """One KV namespace of the control store (the only home of the scheduler's state)."""

    def __init__(self, stub: Any, namespace: str, timeout: float) -> None:
        self.stub, self.ns, self.timeout = stub, namespace, timeout

    async def put(self, key: str, value: bytes) -> None:
        await self.stub.KvPut(cpb.KvPutRequest(namespace=self.ns, key=key.encode(), value=value, overwrite=True),
                              timeout=self.timeout)

    async def get(self, key: str) -> bytes | None:
        try:
            r = await self.stub.KvGet(cpb.KvGetRequest(namespace=self.ns, key=key.encode()), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return bytes(r.value)

    async def keys(self) -> list[str]:
        r = await self.stub.KvList(cpb.KvListRequest(namespace=self.ns), timeout=self.timeout)
        return [k.decode() for k in r.keys]

    async def delete(self, key: str) -> None:
        await self.stub.KvDelete(cpb.KvDeleteRequest(namespace=self.ns, key=key.encode()), timeout=self.timeout)


def build(settings: Settings) -> ServiceApp:
    return build_agent(settings) if settings.node_id else build_scheduler(settings)


def build_scheduler(settings: Settings) -> ServiceApp:
    app = ServiceApp(NAME, settings)
    channel, stub = control_store_aio_stub(settings)
    timeout = settings.rpc_timeout_s
    lock = asyncio.Lock()
    tasks: list[asyncio.Task[None]] = []

    def job_trace(job_id: str) -> Any:
        """The trace the job was submitted in (its commands and events continue it), or None."""
        j = sched.jobs.get(job_id)
        return context_from_env(j.spec.env) if j is not None else None

    async def send(node: str, cmd: dict[str, Any]) -> dict[str, Any]:
        assert app.bus is not None
        token = otel_context.attach(ctx) if (ctx := job_trace(str(cmd.get("job_id", "")))) is not None else None
        try:
            msg = await app.bus.request(agent_subject(node), json.dumps(cmd).encode(), timeout=min(timeout, 10.0))
        finally:
            if token is not None:
                otel_context.detach(token)
        try:
            reply = decode_message(msg.data, f"the reply of node {node}")
        except errors.InvalidArgumentError as e:
            raise errors.FailedPreconditionError(str(e)) from None
        if not reply.get("ok"):
            raise errors.FailedPreconditionError(str(reply.get("error")))
        return dict(reply)

    async def emit(state: str, job: pb.JobInfo) -> None:
        if app.bus is not None:
            ctx = context_from_env(job.spec.env)
            token = otel_context.attach(ctx) if ctx is not None else None
            try:
                await app.bus.publish(f"tessera.gpu.events.job.{state}", job.SerializeToString())
            finally:
                if token is not None:
                    otel_context.detach(token)

    gandiva = {"explore_packing": settings.gpu_scheduler_packing,
               "stop_below": settings.gpu_scheduler_feedback_stop_below or None}
    policy = make_policy(settings.gpu_scheduler_policy, quantum=settings.gpu_scheduler_quantum_s,
                         **(gandiva if settings.gpu_scheduler_policy == "gandiva" else {}))
    sched = GpuScheduler(ControlStoreKV(stub, JOBS_NS, timeout), ControlStoreKV(stub, AGENTS_NS, timeout), send, emit, policy,
                         agent_timeout_s=settings.gpu_scheduler_agent_timeout_s,
                         migrate_ahead=settings.gpu_scheduler_migrate_ahead)
    descriptor_add = pb_grpc.add_GpuSchedulerServiceServicer_to_server
    app.add_servicer(descriptor_add, GpuSchedulerServicer(sched, lock, policy.name), SERVICE)

    async def loop() -> None:
        while True:
            try:
                async with lock:
                    await sched.tick()
            except Exception:
                log.exception("scheduling tick failed")
            await asyncio.sleep(settings.gpu_scheduler_tick_s)

    async def start() -> None:
        tasks.append(asyncio.create_task(loop(), name="gpu-schedule"))

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await channel.close()

    app.on_start(start)
    app.on_stop(stop)
    observe_scheduler(sched)
    return app


def observe_scheduler(sched: GpuScheduler, meter_provider: MeterProvider | None = None) -> None:
    """The scheduler's figures as metrics, read at each collection: jobs by state, suspensions and migrations
    (running totals over its jobs, which it keeps), and each running job's mini-batch time."""
    scope = "tessera.gpu_scheduler"

    states = [pb.JobState.Name(v).removeprefix("JOB_STATE_").lower() for v in pb.JobState.values()
              if v != pb.JOB_STATE_UNSPECIFIED]

    def by_state() -> list[tuple[int, dict[str, str]]]:  # every state, 0 included: a series does not vanish
        counts = Counter(state_name(j.state) for j in sched.jobs.values())
        return [(counts.get(s, 0), {"tessera.gpu.job.state": s}) for s in states]

    observe(scope, "tessera.gpu.jobs", by_state, unit="{job}", description="GPU jobs by state",
            meter_provider=meter_provider)
    observe(scope, "tessera.gpu.suspensions", lambda: sum(j.suspensions for j in sched.jobs.values()),
            kind="counter", unit="{suspension}", description="Time-slice suspensions of GPU jobs",
            meter_provider=meter_provider)
    observe(scope, "tessera.gpu.migrations", lambda: sum(j.migrations for j in sched.jobs.values()),
            kind="counter", unit="{migration}", description="Migrations of GPU jobs between nodes",
            meter_provider=meter_provider)
    observe(scope, "tessera.gpu.job.minibatch.duration",
            lambda: [(j.minibatch_s, {"tessera.gpu.job.id": j.job_id, "tessera.gpu.job.group": j.spec.group_id})
                     for j in sched.jobs.values() if j.state == pb.JOB_STATE_RUNNING and j.minibatch_s > 0],
            unit="s", description="Each running job's latest mini-batch time (its agent's report)",
            meter_provider=meter_provider)


def build_agent(settings: Settings) -> ServiceApp:
    app = ServiceApp(AGENT_NAME, settings)
    node_id = settings.node_id
    channel, stub = control_store_aio_stub(settings)
    timeout = settings.rpc_timeout_s
    kv = ControlStoreKV(stub, AGENTS_NS, timeout)
    store: dict[str, Any] = {}
    tasks: list[asyncio.Task[None]] = []

    store_lock = asyncio.Lock()  # one client, whoever asks first

    async def store_client() -> Any:
        async with store_lock:
            if "client" not in store:
                node = (await stub.GetNode(cpb.GetNodeRequest(node_id=bytes.fromhex(node_id)), timeout=timeout)).node
                if not node.object_store_address:
                    raise errors.UnavailableError(f"node {node_id[:8]} has no object store")
                from tessera.client.objects import open_object_client

                store["client"] = await asyncio.to_thread(open_object_client, node.object_store_address,
                                                         name=f"gpu-agent-{node_id[:8]}", durable=True)
        return store["client"]

    async def upload(path: Path) -> bytes:
        import numpy as np

        client = await store_client()

        def put() -> bytes:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = np.frombuffer(mm, dtype=np.uint8)  # no read into a bytes copy: the put is the one copy
                try:
                    ref = client.put(view)
                finally:
                    del view
            client.flush()
            return bytes(ref.id)

        return await asyncio.to_thread(put)

    async def fetch(oid: bytes, path: Path) -> None:
        from tessera.client.objects import ObjectRef

        client = await store_client()

        def get() -> None:
            data = client.get(ObjectRef(oid), timeout=60.0)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(memoryview(data).cast("B") if not isinstance(data, bytes | bytearray) else data)
            del data
            tmp.replace(path)

        await asyncio.to_thread(get)

    gpus = discover_gpus(settings.gpus_per_node)
    work = Path("/dev/shm") if Path("/dev/shm").is_dir() else settings.run_dir

    async def package(uri: str) -> Path:
        """A job's working_dir, from the control store's KV, unpacked once per node (tessera.common.packages)."""
        dest = work / f"tessera-gpu-{node_id[:16]}" / "packages" / uri.removeprefix(packages.SCHEME)
        if (dest / ".complete").exists():
            return dest
        try:
            blob = (await stub.KvGet(cpb.KvGetRequest(namespace=packages.NAMESPACE, key=packages.key_of(uri)),
                                     timeout=30.0)).value
        except grpc.aio.AioRpcError as e:
            raise errors.FailedPreconditionError(f"working_dir {uri} could not be read: {e.details()}") from None
        return await asyncio.to_thread(packages.unpack, uri, blob, dest)
    agent = NodeAgent(node_id, gpus, work_dir=work / f"tessera-gpu-{node_id[:16]}", upload=upload, fetch=fetch,
                      control_store_address=settings.control_store_address, prewarm=settings.gpu_scheduler_prewarm,
                      log_dir=settings.run_dir / "gpu-jobs", package=package)

    async def on_cmd(msg: Any) -> None:
        assert app.bus is not None
        try:
            reply = await agent.handle(decode_message(msg.data, "an agent command"))
        except errors.TesseraError as e:
            reply = {"ok": False, "error": str(e), "code": e.code}
        except Exception as e:
            log.exception("agent command failed")
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "code": "INTERNAL"}
        await app.bus.respond(msg, json.dumps(reply).encode())

    async def beat() -> None:
        while True:
            agent.changed.clear()
            try:
                await kv.put(node_id, json.dumps(agent.snapshot()).encode())
            except grpc.aio.AioRpcError as e:
                log.warning("agent report failed: %s", e.details())
            try:  # every tick, or at once when a job exited, was suspended or uploaded a checkpoint
                await asyncio.wait_for(agent.changed.wait(), settings.gpu_scheduler_tick_s)
            except TimeoutError:
                pass

    async def connect_store() -> None:
        try:  # ahead of the first checkpoint's upload or fetch, which would pay for it
            await store_client()
        except Exception as e:
            log.info("object store client not ready yet (%s): made at the first checkpoint", e)

    async def start() -> None:
        assert app.bus is not None
        await app.bus.subscribe(agent_subject(node_id), on_cmd)
        tasks.append(asyncio.create_task(beat(), name="gpu-agent-report"))
        tasks.append(asyncio.create_task(connect_store(), name="gpu-agent-store"))
        agent.start_prewarm()
        log.info("gpu agent of node %s: %d %s GPU(s)", node_id[:8], gpus.count, gpus.kind)

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await agent.close()
        if "client" in store:
            await asyncio.to_thread(store["client"].close)
        await channel.close()

    app.on_start(start)
    app.on_stop(stop)
    return app


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
