"""The life of one service replica, the same for all six services.

``server.py`` of a service builds a :class:`ServiceApp`, adds its servicers and
start/stop hooks, and calls :meth:`ServiceApp.run`. The app then:

1. sets up logging, tracing and metrics (``service.name`` = the service; a Prometheus ``/metrics`` endpoint
   when ``TESSERA_METRICS_PORT`` is set),
2. starts the gRPC server with health (NOT_SERVING) and reflection,
3. connects NATS and runs the start hooks (Redis, subscriptions, ...),
4. registers this replica in the control store and keeps it fresh,
5. reports SERVING, and waits for SIGTERM/SIGINT;
6. then reports NOT_SERVING, deregisters, lets in-flight calls finish
   (``shutdown_grace_s``), runs the stop hooks, drains NATS, flushes traces.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera.common import auth, rpc, telemetry
from tessera.common import metrics as tmetrics
from tessera.common.bus import Bus
from tessera.common.config import Settings
from tessera.common.registry import Registration, control_store_aio_stub, grpc_registration, instance_record

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
RegistrationFactory = Callable[[str], Awaitable[Registration]]

#: Retries of a call to the control store while it starts (the services of ``tessera up`` start together):
#: the first after RETRY_FIRST_S, each 1.5 times later, none more than RETRY_MAX_S apart, so a service
#: notices the control store soon after it comes up.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 0.5
#: After this long without reaching the control store, a replica says so as an error (once), naming what to check.
UNREACHABLE_WARN_S = 30.0


def next_retry(delay: float) -> float:
    """The wait after ``delay`` between retries (see RETRY_FIRST_S)."""
    return min(delay * 1.5, RETRY_MAX_S)


class ServiceApp:
    """Wiring shared by every service: one per process."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.server = rpc.create_server(settings=settings)  # with auth when a token is configured
        self.health = health.aio.HealthServicer()
        self.bus: Bus | None = None
        self.port = 0
        self.address = ""
        self._service_names: list[str] = []
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._registration_factory: RegistrationFactory | None = None
        self._stop = asyncio.Event()
        self._cs_channel: grpc.aio.Channel | None = None
        #: a generic handler added with add_servicer sees health calls first (it passes on those it does not take)
        self.catch_all_first = False
        #: host:port of this replica's HTTP front end (set by a start hook), registered beside its gRPC address
        self.http_address = ""
        #: whether health says SERVING: started and registered, not shutting down (an HTTP readiness probe's answer)
        self.serving = False

    def add_servicer(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        """Serve ``servicer`` (``add_fn`` is the generated ``add_XServicer_to_server``)."""
        add_fn(servicer, self.server)
        self._service_names.append(full_name)

    def on_start(self, hook: Hook) -> None:
        """Run ``hook`` after NATS is connected, before SERVING."""
        self._on_start.append(hook)

    def on_stop(self, hook: Hook) -> None:
        """Run ``hook`` (in reverse order of adding) after the server stopped, before NATS closes."""
        self._on_stop.append(hook)

    def register_with(self, factory: RegistrationFactory) -> None:
        """Replace registration through the control store's gRPC API (the control store registers itself)."""
        self._registration_factory = factory

    def request_stop(self) -> None:
        self._stop.set()

    async def _default_registration(self, address: str) -> Registration:
        if self._cs_channel is not None:  # an earlier try's: one channel at a time
            await self._cs_channel.close()
        self._cs_channel, stub = control_store_aio_stub(self.settings)
        record = instance_record(self.name, self.settings, address)
        record.http_address = self.http_address
        reg = grpc_registration(record, self.settings, stub)
        return reg

    async def _start_registration(self) -> Registration:
        factory = self._registration_factory or self._default_registration
        delay = RETRY_FIRST_S
        started, warned = time.monotonic(), False
        while True:  # the control store may still be starting: retry until told to stop
            try:
                reg = await factory(self.address)
                await reg.start()
                return reg
            except (grpc.aio.AioRpcError, OSError) as e:
                if self._stop.is_set():
                    raise
                why = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
                address = self.settings.control_store_address
                if not warned and time.monotonic() - started > UNREACHABLE_WARN_S:
                    warned = True  # once, loudly: what to check (the retries go on)
                    log.error("cannot register with the control store at %s for %.0fs (%s): check "
                              "TESSERA_CONTROL_STORE_ADDRESS, that the control store is up and reachable from here, "
                              "and the token (TESSERA_AUTH_TOKEN_FILE)", address, UNREACHABLE_WARN_S, why)
                log.info("waiting for the control store at %s: %s", address, why)
                await asyncio.sleep(delay)
                delay = next_retry(delay)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`)."""
        s = self.settings
        telemetry.setup_logging(self.name, s.log_level, s.log_format)
        telemetry.setup_tracing(self.name)
        host = s.grpc_host if s.grpc_host not in ("", "0.0.0.0", "::", "[::]") else "0.0.0.0"
        tmetrics.setup_metrics(self.name, port=s.metrics_port, host=host)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

        health_pb2_grpc.add_HealthServicer_to_server(self.health, _GenericOnly(self.server) if self.catch_all_first
                                                     else self.server)
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        for n in ["", *self._service_names]:
            await self.health.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = rpc.add_port(self.server, f"{s.grpc_host}:{s.grpc_port}", s)  # TLS when configured
        # Bound to every interface and told no name (a scaled container replica): advertise the hostname.
        wildcard = s.grpc_host in ("0.0.0.0", "::", "[::]")
        self.address = f"{s.advertise_host or (socket.gethostname() if wildcard else s.grpc_host)}:{self.port}"
        await self.server.start()
        log.info("%s listening on %s:%d", self.name, s.grpc_host, self.port)

        registration: Registration | None = None
        nats_user, nats_password = auth.nats_credentials(s)
        try:
            self.bus = await self._until_stopped(
                Bus.connect(s.nats_url, name=self.name, retry_for=3600.0, request_timeout=s.nats_request_timeout_s,
                            user=nats_user, password=nats_password)
            )
            if self.bus is None:
                return
            for hook in self._on_start:
                await hook()
            registration = await self._until_stopped(self._start_registration())
            if registration is None:
                return
            for n in ["", *self._service_names]:
                await self.health.set(n, health_pb2.HealthCheckResponse.SERVING)
            self.serving = True
            log.info("%s SERVING at %s", self.name, self.address)
            await self._stop.wait()
        finally:
            log.info("%s shutting down", self.name)
            self.serving = False
            await self.health.enter_graceful_shutdown()
            if registration is not None:
                await registration.stop()
            await self.server.stop(s.shutdown_grace_s)
            for hook in reversed(self._on_stop):
                try:
                    await hook()
                except Exception:
                    log.exception("stop hook failed")
            if self._cs_channel is not None:
                await self._cs_channel.close()
            if self.bus is not None:
                await self.bus.close()
            telemetry.shutdown_tracing()
            tmetrics.shutdown_metrics()
            log.info("%s stopped", self.name)

    async def _until_stopped(self, aw: Awaitable[Any]) -> Any:
        """Await ``aw`` unless a stop is requested first (then return None)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stopper.cancel()
            return task.result()
        task.cancel()
        return None


class _GenericOnly:
    """The server, as seen by a generated ``add_*_to_server``: its handlers are added only as generic handlers,
    consulted in the order added, not as registered methods (which gRPC consults before any generic one)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass


def main_for(serve: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Entry point helper for ``__main__``: run ``serve`` and exit 0 after a clean shutdown."""
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:  # pragma: no cover - signal handler normally catches it first
        pass
