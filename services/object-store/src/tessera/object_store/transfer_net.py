"""Wiring of the data sockets (see :mod:`tessera.object_store.transfer`): the holder's TCP
server and the requester's client.

The event loop accepts connections, reads requests, pins and releases objects;
the bytes move on a thread pool with blocking sockets (``sendfile`` and
``recv_into`` release the GIL), so a transfer costs the loop a few callbacks,
not one per chunk. Every socket has a timeout: a silent peer fails the transfer
after ``timeout_s``, and a whole range has ``range_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from tessera.common import auth
from tessera.common.errors import DataLossError, InvalidArgumentError, TesseraError, UnavailableError
from tessera.object_store import transfer as tp
from tessera.object_store.node import NodeObjectStore

log = logging.getLogger(__name__)

#: Threads moving bytes, per side: enough for several pulls of several streams at once.
THREADS = 32


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgumentError(f"bad data address {address!r}: want host:port")
    return host.strip("[]"), int(port)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TransferServer:
    """Serves ranges of this node's objects to peers on a TCP port (0: any free port)."""

    def __init__(self, node: NodeObjectStore, arena_path: Path, *, host: str, port: int, token: str,
                 timeout_s: float) -> None:
        self.node = node
        self.arena_path = arena_path
        self.host = host
        self.port = port
        self.token = token
        self.timeout_s = timeout_s
        self.served = 0  # ranges served whole
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None
        self._accept: asyncio.Task[None] | None = None
        self._conns: dict[socket.socket, asyncio.Task[None]] = {}
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="transfer-send")

    async def start(self) -> None:
        self._file = open(self.arena_path, "rb", buffering=0)  # noqa: SIM115 (open until stop)
        self._sock = socket.create_server((self.host, self.port), backlog=256)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._accept = asyncio.create_task(self._accept_loop(), name="transfer-accept")
        log.info("object data socket listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, cut the transfers in progress and wait for their threads."""
        if self._accept is not None:
            self._accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept
        if self._sock is not None:
            self._sock.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._conns:
            await asyncio.wait(list(self._conns.values()), timeout=self.timeout_s)
        self._pool.shutdown(wait=False)
        if self._file is not None:
            self._file.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:  # e.g. EMFILE: let the peers fall back, and try again soon
                log.warning("data socket accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self._conns[conn] = asyncio.create_task(self._serve(conn))

    def _forget(self, conn: socket.socket) -> None:
        self._conns.pop(conn, None)

    async def _recv(self, conn: socket.socket, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        while len(buf) < n:
            data = await loop.sock_recv(conn, n - len(buf))
            if not data:
                raise InvalidArgumentError(f"the requester closed the connection after {len(buf)} of {n} bytes "
                                           f"of its request")
            buf += data
        return bytes(buf)

    async def _read_request(self, conn: socket.socket) -> tp.Request:
        head = await self._recv(conn, tp.REQUEST.size)
        oid_len, node_len, token_len, *_ = tp.request_tail(head)
        tail = await self._recv(conn, oid_len + node_len + token_len)
        return tp.decode_request(head, tail)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer = "?"
        answered = False  # once the header is out, an error can only cut the stream
        try:
            conn.setblocking(False)
            _tune(conn)
            host, port = conn.getpeername()[:2]
            peer = f"{host}:{port}"
            try:
                req = await asyncio.wait_for(self._read_request(conn), self.timeout_s)
            except TimeoutError:
                raise InvalidArgumentError(f"no whole request within {self.timeout_s:g}s") from None
            if self.token and not auth.matches(req.token, self.token):
                raise tp.UnauthenticatedError("invalid cluster token")
            session = f"transfer-{uuid.uuid4().hex}"
            e = self.node.open_range(req.object_id, req.offset, req.length, session)
            sent = 0
            try:
                assert e.offset is not None and self._file is not None
                header = tp.encode_ok(tp.Header(e.size, req.offset, req.length, req.chunk_bytes, e.owner))
                answered = True
                await loop.sock_sendall(conn, header)
                view = self.node.manager.arena.view(e.offset + req.offset, req.length)
                tp.set_io_timeout(conn, self.timeout_s)  # blocking, for the sending thread
                try:
                    await loop.run_in_executor(self._pool, tp.send_range, conn, self._file, view,
                                               e.offset + req.offset, req.chunk_bytes)
                finally:
                    view.release()
                sent = req.length
                self.served += 1
            finally:
                self.node.close_range(req.object_id, session, sent)
        except TesseraError as err:
            if answered:
                log.info("data socket: transfer to %s ended: %s", peer, err)
                return
            log.info("data socket: refused a request from %s: %s", peer, err)
            with contextlib.suppress(OSError, TimeoutError):
                conn.setblocking(False)
                await asyncio.wait_for(self._refuse(conn, tp.encode_error(err.code, str(err))), 1.0)
        except (OSError, TimeoutError) as err:
            log.info("data socket: transfer to %s ended: %s", peer, err)
        finally:
            conn.close()
            self._forget(conn)


    @staticmethod
    async def _refuse(conn: socket.socket, reply: bytes) -> None:
        """Send ``reply`` and read what the requester still sends until it closes: closing with
        unread bytes would reset the connection, and the requester could lose the reply."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(conn, reply)
        conn.shutdown(socket.SHUT_WR)
        for _ in range(64):
            if not await loop.sock_recv(conn, 65536):
                return


class _Call:
    """One range being received on a pool thread; :meth:`cut` ends it from the event loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.cut_ = False

    def cut(self) -> None:
        with self.lock:
            self.cut_ = True
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)


class TransferClient:
    """Receives ranges of objects from holders' data sockets into this node's arena."""

    def __init__(self, node_id: bytes, *, token: str, chunk_bytes: int, timeout_s: float,
                 range_timeout_s: float = 600.0) -> None:
        self.node_id = node_id
        self.token = token
        self.chunk_bytes = min(max(chunk_bytes, tp.MIN_CHUNK), tp.MAX_CHUNK)
        self.timeout_s = timeout_s
        self.range_timeout_s = range_timeout_s
        self.received = 0  # bytes received whole and checked
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="transfer-recv")

    async def fetch_range(self, address: str, object_id: bytes, start: int, dest: memoryview,
                          total_size: int) -> None:
        """See :class:`~tessera.object_store.node.RangeFetch`. Cancelled, it cuts the connection and
        returns only once the receiving thread has stopped writing into ``dest``."""
        loop = asyncio.get_running_loop()
        call = _Call()
        fut = loop.run_in_executor(self._pool, self._fetch, call, address, object_id, start, dest, total_size)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            call.cut()
            await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()  # retrieved: the cancellation is what the caller sees
            raise
        self.received += len(dest)

    def _fetch(self, call: _Call, address: str, object_id: bytes, start: int, dest: memoryview,
               total_size: int) -> None:
        host, port = split_address(address)
        what = f"range [{start}, {start + len(dest)}) of {object_id.hex()} from {address}"
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout_s)
        except OSError as e:
            raise UnavailableError(f"cannot connect to the data socket at {address}: {e}") from e
        with sock:
            with call.lock:
                if call.cut_:
                    raise UnavailableError(f"{what}: cancelled")
                call.sock = sock
            try:
                _tune(sock)
                tp.set_io_timeout(sock, self.timeout_s)
                sock.sendall(tp.encode_request(tp.Request(object_id, start, len(dest), self.node_id, self.token,
                                                          self.chunk_bytes)))
                h = tp.read_header(sock)
                if (h.total_size, h.offset, h.length) != (total_size, start, len(dest)):
                    raise DataLossError(f"{what}: the holder answered for [{h.offset}, {h.offset + h.length}) of "
                                        f"an object of {h.total_size} bytes")
                tp.recv_range(sock, dest, h.chunk_bytes, deadline=time.monotonic() + self.range_timeout_s,
                              what=what)
            except (BlockingIOError, TimeoutError) as e:
                raise UnavailableError(f"{what}: the holder sent nothing for {self.timeout_s:g}s (timed out)") from e
            except OSError as e:
                raise UnavailableError(f"{what}: {e or type(e).__name__}") from e

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
