"""Wiring of the gateway: the forwarding gRPC handler, the HTTP relay and the route table's refresh.

Run one where drivers outside the cluster's network need to get in (compose publishes it on the host):
the SDK finds it at the address it is given and sends every call through it (tessera.common.rpc).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tessera.common import rpc
from tessera.common.config import Settings
from tessera.common.errors import FailedPreconditionError
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import ServiceApp
from tessera.gateway.relay import HttpRelay
from tessera.gateway.routes import RouteTable
from tessera.gateway.servicer import Directory, Forwarder

log = logging.getLogger(__name__)

NAME = "gateway"


def build(settings: Settings) -> ServiceApp:
    if settings.gateway:
        raise FailedPreconditionError(f"a gateway does not route through another (TESSERA_GATEWAY={settings.gateway})")
    app = ServiceApp(NAME, settings)
    cs_channel, stub = control_store_aio_stub(settings)
    directory = Directory(RouteTable(settings.control_store_address), stub)
    forwarder = Forwarder(directory, max_message_bytes=settings.grpc_max_message_bytes)
    app.add_servicer(lambda s, srv: srv.add_generic_rpc_handlers((s,)), forwarder, rpc.GATEWAY_HEALTH_SERVICE)
    app.catch_all_first = True  # a health check naming a replica is forwarded to it; one naming none is ours
    relay = HttpRelay(directory.pick_http)
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(directory.run()))
        port = await relay.start(settings.grpc_host, settings.gateway_http_port)
        app.http_address = f"{app.address.rsplit(':', 1)[0]}:{port}"
        log.info("gateway: gRPC on %s, HTTP relay to serving on %s", app.address, app.http_address)

    async def stop() -> None:
        await relay.stop()
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await forwarder.close()
        await cs_channel.close()

    app.on_start(start)
    app.on_stop(stop)
    return app


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
