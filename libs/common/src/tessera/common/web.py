"""An HTTP server (uvicorn) in the service's own event loop, beside its gRPC server: the dashboard's pages and
serving's HTTP front end.

The socket is bound here, before uvicorn starts, so that a port already taken is one line naming the setting to
change instead of a traceback, and port 0 reports the port the system chose. uvicorn's signal handlers are not
installed: the service app owns SIGTERM/SIGINT and stops this server from its stop hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

#: How long :meth:`WebServer.start` waits for uvicorn to accept connections, and :meth:`WebServer.stop` for it to end.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, *, what: str, setting: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``host`` empty: every interface; IPv6 with or without brackets).

    Raises:
        SystemExit: the port cannot be bound; the message starts with ``what`` (the service) and names
            ``setting``, the variable that chooses the port.
    """
    host = (host or "0.0.0.0").strip("[]")
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and without that
    # a response written as head then body waits for the client's delayed ACK (40 ms a request)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"{what}: cannot listen on {host}:{port} ({e.strerror}); choose another port with {setting} "
                         "(0: a free one)") from None
    return sock


class WebServer:
    """One ASGI application served by uvicorn on a socket bound by :func:`bind`."""

    def __init__(self, app: Any, **config: Any) -> None:
        """``config``: more :class:`uvicorn.Config` options (defaults: no lifespan, no access log, warnings only,
        no ``Server`` header)."""
        options: dict[str, Any] = dict(log_level="warning", access_log=False, lifespan="off",
                                       timeout_graceful_shutdown=1, server_header=False)
        options.update(config)
        self._server = _Server(uvicorn.Config(app, **options))
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, what: str, setting: str) -> int:
        """Listen on ``host:port`` and return the port, once connections are accepted (see :func:`bind`)."""
        sock = bind(host, port, what=what, setting=setting)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"http-{self.port}")
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():  # failed while starting: its exception, else a plain error
                self._task.result()
                raise RuntimeError(f"the HTTP server on port {self.port} stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the HTTP server on port {self.port} did not start in {START_TIMEOUT_S:g}s")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let requests in flight end (at most ``timeout_graceful_shutdown`` seconds), close."""
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await asyncio.wait_for(self._task, timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                self._task.cancel()
        self._task = None
