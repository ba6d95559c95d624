"""Wiring of the control store: Redis shards + NATS events + gRPC, in one ServiceApp."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.msg import Msg

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.api.control_store.v1 import control_store_pb2_grpc as pb_grpc
from tessera.common import auth, rpc
from tessera.common.config import Settings
from tessera.common.errors import FailedPreconditionError
from tessera.common.registry import CONTROL_STORE_SERVICE, Registration, instance_record
from tessera.common.service import ServiceApp
from tessera.control_store.liveness import LivenessMonitor
from tessera.control_store.servicer import ControlStoreServicer
from tessera.control_store.shards import ShardedRedis
from tessera.control_store.store import ControlStore

NAME = "control-store"


def build(settings: Settings) -> ServiceApp:
    app = ServiceApp(NAME, settings)
    db = ShardedRedis(settings.redis_urls, password=auth.redis_password(settings))

    async def publish(subject: str, data: bytes) -> None:
        assert app.bus is not None
        await app.bus.publish(subject, data)

    async def subscribe(subject: str, on_message: Callable[[bytes], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        assert app.bus is not None

        async def handler(msg: Msg) -> None:
            await on_message(msg.data)

        sub = await app.bus.subscribe(subject, handler)
        return sub.unsubscribe

    store = ControlStore(db, publish=publish, node_timeout_s=settings.node_timeout_s)
    monitor = LivenessMonitor(store, interval_s=settings.heartbeat_interval_s)
    app.add_servicer(pb_grpc.add_ControlStoreServiceServicer_to_server,
                     ControlStoreServicer(store, subscribe, instance_ttl_s=settings.instance_ttl_s),
                     CONTROL_STORE_SERVICE)

    async def start() -> None:
        await db.ping()
        # One control store per cluster: its liveness monitor and watches are not built to run twice over the
        # same shards. A second one (`--scale control-store=2`) refuses to start while the first answers; the
        # record of one that died (killed, its container replaced) is not in the way.
        me = settings.resolved_instance_id
        for other in await store.list_instances(NAME):
            if other.instance_id != me and await _serving(other):
                raise FailedPreconditionError(
                    f"another control store ({other.instance_id} at {other.address}) serves these Redis shards: the "
                    "control store runs as exactly one replica (do not scale it); stop that one first")
        monitor.start()

    async def stop() -> None:
        await monitor.stop()
        await db.close()

    async def register_self(address: str) -> Registration:
        async def register(rec: pb.ServiceInstance, ttl: int) -> None:
            await store.register_instance(rec, ttl)

        async def deregister(service: str, instance_id: str) -> None:
            await store.deregister_instance(service, instance_id)

        return Registration(instance_record(NAME, settings, address), register=register, deregister=deregister,
                            interval_s=settings.heartbeat_interval_s, ttl_s=settings.instance_ttl_s)

    app.on_start(start)
    app.on_stop(stop)
    app.register_with(register_self)
    return app


async def _serving(inst: pb.ServiceInstance) -> bool:
    """Whether the control store ``inst`` answers SERVING, asked at its own host (several replicas may
    advertise one shared name, e.g. compose's service name)."""
    port = inst.address.rsplit(":", 1)[-1]
    targets = dict.fromkeys([f"{inst.hostname}:{port}" if inst.hostname else "", inst.address])
    for target in filter(None, targets):
        async with rpc.raw_aio_channel(target) as ch:
            try:
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            except grpc.aio.AioRpcError:
                continue
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return True
    return False


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
