"""Wiring of the compiler service: the JetStream job stream, the control store for artifact
metadata, the node's object store for models and bundles, gRPC for clients."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import grpc
import grpc.aio
import numpy as np
from nats.aio.msg import Msg

from tessera.api.compiler.v1 import compiler_pb2 as pb
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.common import rpc
from tessera.common.config import Settings
from tessera.common.errors import UnavailableError
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import ServiceApp
from tessera.compiler.jobs import Compiler
from tessera.compiler.servicer import CompilerServicer
from tessera.compiler.tune import merge_record

NAME = "compiler"
SERVICE = "tessera.compiler.v1.CompilerService"
STREAM = "COMPILER_JOBS"
SUBJECT = "tessera.compiler.jobs"
DURABLE = "compiler"
NAMESPACE = "compiler_artifacts"
#: How long a compile job waits, still held, for the control store or object store to come back.
DEPENDENCY_WAIT_S = 120.0

log = logging.getLogger(__name__)


class ControlStoreMetadata:
    """Artifact records in the control store's KV namespace ``compiler_artifacts``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channel, self.stub = control_store_aio_stub(settings)

    async def get(self, artifact_id: str) -> bytes | None:
        try:
            r = await self.stub.KvGet(cpb.KvGetRequest(namespace=NAMESPACE, key=artifact_id.encode()),
                                      timeout=self.settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise UnavailableError(f"control store: {e.code().name} {e.details()}") from e
        return bytes(r.value)

    async def put(self, artifact_id: str, value: bytes) -> None:
        try:
            await self.stub.KvPut(cpb.KvPutRequest(namespace=NAMESPACE, key=artifact_id.encode(), value=value, overwrite=True),
                                  timeout=self.settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise UnavailableError(f"control store: {e.code().name} {e.details()}") from e

    async def object_store_address(self) -> str:
        r = await self.stub.ListInstances(cpb.ListInstancesRequest(service="object-store"), timeout=self.settings.rpc_timeout_s)
        here = socket.gethostname()
        local = [i for i in r.instances if i.hostname == here] or list(r.instances)
        if not local:
            raise UnavailableError("no object store is registered in the cluster")
        return str(local[0].address)


class ObjectStoreBlobs:
    """Models and bundles in this node's object store (a blocking client, used from threads)."""

    def __init__(self, address: Any) -> None:
        self._address = address
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _get_client(self) -> Any:
        async with self._lock:
            if self._client is None:
                from tessera.client.objects import open_object_client

                addr = await self._address()
                self._client = await asyncio.to_thread(open_object_client, addr, name="compiler", durable=True)
            return self._client

    async def put(self, data: bytes) -> bytes:
        c = await self._get_client()
        ref = await asyncio.to_thread(c.put, np.frombuffer(data, np.uint8))
        await asyncio.to_thread(c.flush)
        return bytes(ref.id)

    async def get(self, object_id: bytes, timeout: float = 30.0) -> bytes:
        from tessera.client.objects import ObjectRef

        c = await self._get_client()
        value = await asyncio.to_thread(c.get, ObjectRef(object_id), timeout=timeout)
        return bytes(value)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class ControlStoreTuningLog:
    """Best schedules per workload in the control store's KV namespace ``compiler_tuning`` (a blocking
    client: the tuner runs in a worker thread). Shared by every replica and every model."""

    NAMESPACE = "compiler_tuning"

    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.client.kv_get(self.NAMESPACE, key.encode(), timeout=5.0)))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def put(self, key: str, record: dict[str, Any]) -> None:
        merged = merge_record(self.get(key), record)
        if merged is not None:
            self.client.kv_put(self.NAMESPACE, key.encode(), json.dumps(merged).encode(), timeout=5.0)


def build(settings: Settings) -> ServiceApp:
    app = ServiceApp(NAME, settings)
    meta = ControlStoreMetadata(settings)
    blobs = ObjectStoreBlobs(meta.object_store_address)

    async def enqueue(job: bytes, dedupe: str) -> None:
        assert app.bus is not None
        await app.bus.js_publish(SUBJECT, job, msg_id=dedupe)

    from tessera.client import Client

    tuning = ControlStoreTuningLog(Client(settings.control_store_address, timeout=settings.rpc_timeout_s))
    compiler = Compiler(meta, blobs, enqueue, instance=settings.resolved_instance_id, tuning_log=tuning,
                        cache_dir=str(settings.compiler_cache_dir) if settings.compiler_cache_dir else None,
                        loaded_max=settings.compiler_loaded_artifacts, heartbeat_s=settings.compiler_job_ack_wait_s / 3)
    descriptor = pb.DESCRIPTOR.services_by_name["CompilerService"]
    app.add_servicer(lambda s, srv: rpc.add_servicer(s, srv, descriptor),
                     CompilerServicer(compiler, max_wait_s=settings.compiler_compile_timeout_s), SERVICE)

    async def handle(msg: Msg) -> None:
        job = pb.CompileJob.FromString(msg.data)
        attempt = int(msg.metadata.num_delivered or 1)
        # The control store or the object store restarting is no reason to spend one of the job's few
        # deliveries (each redelivery follows the last within seconds): keep the job, and wait for them.
        deadline = time.monotonic() + DEPENDENCY_WAIT_S
        delay = 0.5
        while True:
            try:
                await compiler.run_job(job, attempt, msg.in_progress)
                return
            except (grpc.RpcError, UnavailableError) as e:
                code = getattr(e, "code", lambda: grpc.StatusCode.UNAVAILABLE)()
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s: a service it needs is unavailable (%s); trying again in %.1fs",
                            job.artifact_id, e, delay)
            await msg.in_progress()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def start() -> None:
        assert app.bus is not None
        await app.bus.ensure_stream(STREAM, [SUBJECT])
        app.bus.consume(SUBJECT, handle, durable=DURABLE, stream=STREAM, batch=1,
                        ack_wait_s=settings.compiler_job_ack_wait_s, max_deliver=settings.compiler_job_max_deliver)

    async def stop() -> None:
        blobs.close()
        await meta.channel.close()

    app.on_start(start)
    app.on_stop(stop)
    return app


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
