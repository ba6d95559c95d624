"""Wiring of the dashboard: the service app (gRPC health, registration with ``http_address``), the HTTP server
(uvicorn, in this process's event loop) and the subscription to the control store's change events.

The dashboard holds no state: every page reads the control store when asked, so a restarted control store
(or dashboard) needs nothing rebuilt. Change events only tell the open pages when to read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from nats.aio.msg import Msg

from tessera.common.config import Settings
from tessera.common.service import ServiceApp
from tessera.dashboard.app import create_app
from tessera.dashboard.live import Broadcaster
from tessera.dashboard.source import ControlStoreSource

log = logging.getLogger(__name__)

NAME = "dashboard"
#: Every change the control store announces (tessera.events.<table>.<op>, kv: .<namespace>.<op>).
EVENTS = "tessera.events.>"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the service app owns SIGTERM/SIGINT and stops this server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build(settings: Settings) -> ServiceApp:
    app = ServiceApp(NAME, settings)
    broadcaster = Broadcaster()
    source = ControlStoreSource(settings.control_store_address, timeout=min(settings.rpc_timeout_s, 3.0))
    web = create_app(source, broadcaster, jaeger_ui_url=settings.jaeger_ui_url)
    server: list[_Server] = []
    tasks: list[asyncio.Task[None]] = []

    async def on_event(msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) >= 3:
            broadcaster.publish(parts[2])

    async def start() -> None:
        assert app.bus is not None
        await app.bus.subscribe(EVENTS, on_event)
        host = (settings.grpc_host or "0.0.0.0").strip("[]")  # the HTTP server listens beside the gRPC one
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, settings.dashboard_port))
        except OSError as e:
            sock.close()
            raise SystemExit(f"dashboard: cannot listen on {host}:{settings.dashboard_port} ({e.strerror}); "
                             "choose another port with TESSERA_DASHBOARD_PORT (0: a free one)") from None
        port = sock.getsockname()[1]
        srv = _Server(uvicorn.Config(web, log_level="warning", access_log=False, lifespan="off",
                                     timeout_graceful_shutdown=1))
        server.append(srv)
        tasks.append(asyncio.create_task(srv.serve(sockets=[sock])))
        app.http_address = f"{app.address.rsplit(':', 1)[0]}:{port}"
        log.info("dashboard at http://%s (control store %s)", app.http_address, settings.control_store_address)

    async def stop() -> None:
        for srv in server:
            srv.should_exit = True
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(t, timeout=5.0)
                except TimeoutError:
                    t.cancel()

    app.on_start(start)
    app.on_stop(stop)
    return app


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
