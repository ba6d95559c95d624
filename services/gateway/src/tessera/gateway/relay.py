"""The gateway's HTTP port: each connection is relayed, bytes both ways, to one serving replica's HTTP
front end (chosen in turn). Serving authenticates, parses and traces the requests itself; the relay
neither reads nor changes them, so keep-alive, streaming bodies and ``Expect: 100-continue`` pass as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
#: How long connecting to a replica may take before the client gets a 502.
CONNECT_TIMEOUT_S = 5.0

Pick = Callable[[], Awaitable[str]]  # -> host:port of a replica's HTTP front end; raises LookupError


def _bad_gateway(why: str) -> bytes:
    body = json.dumps({"error": {"code": "UNAVAILABLE", "message": why}}).encode()
    head = (f"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class HttpRelay:
    """Listens on a port and relays each connection to the replica ``pick`` names."""

    def __init__(self, pick: Pick) -> None:
        self._pick = pick
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            try:
                target = await self._pick()
                host, port = target.rsplit(":", 1)
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_S)
            except (LookupError, OSError, TimeoutError, ValueError) as e:
                why = str(e) if isinstance(e, LookupError) else f"no serving replica answered: {e or type(e).__name__}"
                writer.write(_bad_gateway(why))
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.drain()
                return
            try:
                await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
            finally:
                up_w.close()
        finally:
            writer.close()
            if task is not None:
                self._conns.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
