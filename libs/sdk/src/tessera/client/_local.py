"""The client end of the object store's local fast path: a session over its Unix socket.

The framing is :mod:`tessera.common.localwire` (shared with the store). Any
thread may call; requests are multiplexed on one connection by request id. No
thread of its own: a caller waiting for its reply reads the socket for everyone
(the others wait on a condition until the reader hands them their reply or one
of them takes over the reading), so a reply costs no thread switch in the
common case of one caller at a time.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

from tessera.common import localwire as lw

#: Bytes asked of one read: under malloc's mmap threshold, so a read allocates no fresh pages.
RECV_BYTES = 64 * 1024


class LocalSessionLost(ConnectionError):
    """The socket closed or broke: the store restarted or went away, and the session with it."""


class LocalConnection:
    """One session with the node's object store over its Unix socket (the connection is the session)."""

    def __init__(self, path: str, *, token: str, name: str, timeout: float) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect("\0" + path[1:] if path.startswith("@") else path)
        except OSError:
            self._sock.close()
            raise
        self._sock.settimeout(None)  # blocking; reads wait in poll() with their own deadline
        self._fd = self._sock.fileno()
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, tuple[lw.Header, memoryview]] = {}
        #: request id -> what to do with its reply should it come after its caller gave up
        self._abandoned: dict[int, Callable[[lw.Header, memoryview], None] | None] = {}
        self._reading = False
        self._broken: Exception | None = None
        self._next_id = 0
        self._buf = bytearray()
        #: gets the store's notices (frames with request id NOTICE_ID), outside every lock
        self.on_notice: Callable[[lw.Header, memoryview], None] | None = None
        try:
            self.welcome = lw.parse_welcome(self.call(lw.HELLO, lw.hello_body(token, name), timeout=timeout))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ calls

    def call(self, op: int, body: bytes = b"", *, flags: int = 0, releases: list[bytes] | None = None,
             timeout: float | None, on_late: Callable[[lw.Header, memoryview], None] | None = None) -> memoryview:
        """Send one request and wait for its reply's body (``timeout``: seconds, None: as long as it takes).

        ``releases`` ride on the request (the store applies them first, whatever the request's fate).
        ``on_late`` gets the reply should it arrive after the caller stopped waiting.

        Raises:
            TesseraError: the store's typed error (localwire.error_of).
            TimeoutError: no reply in time.
            LocalSessionLost: the connection broke (the session's pins and creates are gone).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while releases and len(releases) > lw.MAX_RELEASES:  # (only after dropping very many views at once)
            self.call(lw.RELEASE, releases=releases[: lw.MAX_RELEASES], timeout=timeout)
            releases = releases[lw.MAX_RELEASES :]
        with self._send_lock:
            if self._broken is not None:
                raise LocalSessionLost(str(self._broken))
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1  # (0 is the notices' id)
            rid = self._next_id
            data = lw.frame(op, rid, body, flags=flags, releases=releases)
            try:
                self._sock.sendall(data)
            except OSError as e:
                self._fail(e)
                raise LocalSessionLost(f"the object store's socket {self.path} closed: {e}") from None
        h, reply = self._wait(rid, deadline, on_late)
        if h.op == lw.ERROR:
            raise lw.error_of(*lw.parse_error(reply))
        if h.op != op | lw.REPLY:
            raise LocalSessionLost(f"the object store answered op {op} with op {h.op}")
        return reply

    def _wait(self, rid: int, deadline: float | None,
              on_late: Callable[[lw.Header, memoryview], None] | None) -> tuple[lw.Header, memoryview]:
        with self._cond:
            while True:
                got = self._replies.pop(rid, None)
                if got is not None:
                    return got
                if self._broken is not None:
                    raise LocalSessionLost(str(self._broken))
                if not self._reading:
                    self._reading = True  # this caller reads for everyone until its own reply comes
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._abandoned[rid] = on_late
                    raise TimeoutError("no answer from the object store in time")
                self._cond.wait(remaining)
        late: list[tuple[Callable[[lw.Header, memoryview], None], lw.Header, memoryview]] = []
        try:
            while True:
                frames = self._read(deadline)
                with self._cond:
                    mine = self._dispatch(frames, rid, late)
                    if mine is not None:
                        return mine
                    if not frames and deadline is not None and time.monotonic() >= deadline:
                        self._abandoned[rid] = on_late
                        raise TimeoutError("no answer from the object store in time")
        except OSError as e:
            self._fail(e)
            raise LocalSessionLost(f"the object store's socket {self.path} closed: {e}") from None
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()
            for fn, h, body in late:
                fn(h, body)

    def _dispatch(self, frames: list[tuple[lw.Header, memoryview]], rid: int,
                  late: list[tuple[Callable[[lw.Header, memoryview], None], lw.Header, memoryview]]
                  ) -> tuple[lw.Header, memoryview] | None:
        """Hand ``frames`` out (under the condition's lock): the reply to ``rid`` is returned, the others' kept
        for them, late replies and notices queued in ``late`` for their handlers."""
        mine = None
        for h, body in frames:
            if h.request_id == rid:
                mine = (h, body)
            elif h.request_id == lw.NOTICE_ID:
                if self.on_notice is not None:
                    late.append((self.on_notice, h, body))
            elif h.request_id in self._abandoned:
                fn = self._abandoned.pop(h.request_id)
                if fn is not None:
                    late.append((fn, h, body))
            else:
                self._replies[h.request_id] = (h, body)
        if frames:
            self._cond.notify_all()
        return mine

    def poll(self) -> None:
        """Read what the store has sent without waiting (its notices above all), unless another thread is
        reading now (it hands them out itself). A broken connection is left for the next call to report."""
        with self._cond:
            if self._reading or self._broken is not None:
                return
            self._reading = True
        late: list[tuple[Callable[[lw.Header, memoryview], None], lw.Header, memoryview]] = []
        try:
            while True:
                try:
                    data = self._sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    raise ConnectionResetError("end of stream")
                self._buf += data
                frames = self._frames()
                with self._cond:
                    self._dispatch(frames, lw.NOTICE_ID - 1, late)  # (no request has id -1: none is ours)
        except OSError as e:
            self._fail(e)
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()
            for fn, h, body in late:
                fn(h, body)

    def _read(self, deadline: float | None) -> list[tuple[lw.Header, memoryview]]:
        """The complete frames in hand after at most one read (none if the deadline passed first)."""
        if self._buf:
            frames = self._frames()
            if frames:
                return frames
        if deadline is not None:  # (without one: a plain blocking read, one system call)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if not select.select([self._fd], [], [], remaining)[0]:
                return []
        data = self._sock.recv(RECV_BYTES)
        if not data:
            raise ConnectionResetError("end of stream")
        self._buf += data
        return self._frames()

    def _frames(self) -> list[tuple[lw.Header, memoryview]]:
        buf, pos, out = self._buf, 0, []
        while len(buf) - pos >= lw.HEADER.size:
            h = lw.parse_header(buf, pos)
            end = pos + lw.HEADER.size + h.length
            if len(buf) < end:
                break
            out.append((h, memoryview(bytes(buf[pos + lw.HEADER.size : end]))))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def _fail(self, e: Exception) -> None:
        with self._cond:
            if self._broken is None:
                self._broken = e
            self._cond.notify_all()

    # ------------------------------------------------------------------ end

    def close(self) -> None:
        """End the session: the store releases its pins and aborts its unsealed creates."""
        self._fail(ConnectionAbortedError("closed"))
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
