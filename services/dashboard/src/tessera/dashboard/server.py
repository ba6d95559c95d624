"""Wiring of the dashboard: the service app (gRPC health, registration with ``http_address``), the HTTP server
(uvicorn, in this process's event loop) and the subscription to the control store's change events.

The dashboard holds no state: every page reads the control store when asked, so a restarted control store
(or dashboard) needs nothing rebuilt. Change events only tell the open pages when to read again.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from tessera.common.config import Settings
from tessera.common.service import ServiceApp
from tessera.common.web import WebServer
from tessera.dashboard.app import create_app
from tessera.dashboard.live import Broadcaster
from tessera.dashboard.source import ControlStoreSource

log = logging.getLogger(__name__)

NAME = "dashboard"
#: Every change the control store announces (tessera.events.<table>.<op>, kv: .<namespace>.<op>).
EVENTS = "tessera.events.>"


def build(settings: Settings) -> ServiceApp:
    app = ServiceApp(NAME, settings)
    broadcaster = Broadcaster()
    source = ControlStoreSource(settings.control_store_address, timeout=min(settings.rpc_timeout_s, 3.0))
    web = WebServer(create_app(source, broadcaster, jaeger_ui_url=settings.jaeger_ui_url))

    async def on_event(msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) >= 3:
            broadcaster.publish(parts[2])

    async def start() -> None:
        assert app.bus is not None
        await app.bus.subscribe(EVENTS, on_event)
        port = await web.start(settings.grpc_host, settings.dashboard_port, what="dashboard",
                               setting="TESSERA_DASHBOARD_PORT")  # beside the gRPC server
        app.http_address = f"{app.address.rsplit(':', 1)[0]}:{port}"
        log.info("dashboard at http://%s (control store %s)", app.http_address, settings.control_store_address)

    async def stop() -> None:
        await web.stop()

    app.on_start(start)
    app.on_stop(stop)
    return app


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
