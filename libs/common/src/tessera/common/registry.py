"""Reaching the control store, and keeping this replica registered in it.

Every service replica registers a :class:`ServiceInstance` record (service, id,
address, pid) with a TTL and refreshes it each heartbeat, so ``tessera status``
and other services can see who runs where; a replica that dies simply expires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.api.control_store.v1 import control_store_pb2_grpc as pb_grpc
from tessera.common.config import Settings
from tessera.common.rpc import aio_channel, channel

log = logging.getLogger(__name__)

CONTROL_STORE_SERVICE = "tessera.control_store.v1.ControlStoreService"

#: Methods safe to retry after UNAVAILABLE: reads, content-addressed or set-like writes.
IDEMPOTENT_METHODS: tuple[str, ...] = (
    "GetNode", "ListNodes", "NodeHeartbeat", "GetJob", "ListJobs", "ExportFunction", "GetFunction",
    "GetTasks", "ListTasks", "GetLineage", "AddObjectLocations", "RemoveObjectLocations", "GetObjects", "GetActor",
    "ListActors", "KvGet", "KvList", "KvDelete", "RegisterInstance", "DeregisterInstance", "ListInstances",
)


def control_store_aio_stub(settings: Settings) -> tuple[grpc.aio.Channel, pb_grpc.ControlStoreServiceStub]:
    ch = aio_channel(
        settings.control_store_address,
        service=CONTROL_STORE_SERVICE,
        idempotent_methods=IDEMPOTENT_METHODS,
        default_timeout=settings.rpc_timeout_s,
    )
    return ch, pb_grpc.ControlStoreServiceStub(ch)


def control_store_stub(address: str, *, timeout: float = 10.0) -> tuple[grpc.Channel, pb_grpc.ControlStoreServiceStub]:
    ch = channel(address, service=CONTROL_STORE_SERVICE, idempotent_methods=IDEMPOTENT_METHODS, default_timeout=timeout)
    return ch, pb_grpc.ControlStoreServiceStub(ch)


def instance_record(service: str, settings: Settings, address: str) -> pb.ServiceInstance:
    from tessera.common.telemetry import _version

    return pb.ServiceInstance(
        service=service,
        instance_id=settings.resolved_instance_id,
        address=address,
        pid=os.getpid(),
        hostname=socket.gethostname(),
        version=_version(),
        started_ms=int(time.time() * 1000),
    )


RegisterFn = Callable[[pb.ServiceInstance, int], Awaitable[None]]
DeregisterFn = Callable[[str, str], Awaitable[None]]


class Registration:
    """Registers an instance, refreshes it every heartbeat, removes it on :meth:`stop`."""

    def __init__(self, record: pb.ServiceInstance, *, register: RegisterFn, deregister: DeregisterFn,
                 interval_s: float, ttl_s: int) -> None:
        self.record = record
        self._register = register
        self._deregister = deregister
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register(self.record, self.ttl_s)
        self._task = asyncio.create_task(self._beat(), name="registration-heartbeat")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._register(self.record, self.ttl_s)
            except Exception as e:  # the control store may be restarting: keep trying
                log.warning("could not refresh registration: %s", e)

    async def stop(self) -> None:
        if self._task:  # finish the heartbeat first, so no refresh can land after the deregistration
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._deregister(self.record.service, self.record.instance_id)
        except Exception as e:
            why = e.code().name if isinstance(e, grpc.aio.AioRpcError) else repr(e)
            log.info("could not deregister (the control store may be stopping too): %s", why)


def grpc_registration(record: pb.ServiceInstance, settings: Settings,
                      stub: pb_grpc.ControlStoreServiceStub) -> Registration:
    async def register(rec: pb.ServiceInstance, ttl: int) -> None:
        await stub.RegisterInstance(pb.RegisterInstanceRequest(instance=rec, ttl_s=ttl), timeout=settings.rpc_timeout_s)

    async def deregister(service: str, instance_id: str) -> None:
        await stub.DeregisterInstance(pb.DeregisterInstanceRequest(service=service, instance_id=instance_id), timeout=2.0)

    return Registration(record, register=register, deregister=deregister,
                        interval_s=settings.heartbeat_interval_s, ttl_s=settings.instance_ttl_s)
