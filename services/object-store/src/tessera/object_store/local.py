"""Sessions of the local fast path: the object store's Unix-socket protocol (see tessera.common.localwire).

A :class:`LocalSession` is one connection: bytes in (:meth:`LocalSession.feed`),
reply frames out (through the ``send`` it was given). It calls the same
:class:`~tessera.object_store.node.NodeObjectStore` methods as the gRPC
servicer, under a session id registered beside the gRPC sessions, so a client
may mix both. A get that must wait (an object not sealed yet, or held by another
node) runs as a task and answers when done; the others answer at once, in the
order they came. No sockets here: server.py wires a socket server to this.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from tessera.common import ids
from tessera.common import localwire as lw
from tessera.common.errors import TesseraError, bounded
from tessera.object_store.node import Locator, NodeObjectStore

log = logging.getLogger(__name__)

#: Longest a GET waits when the request does not bound it (as the gRPC GetObjects).
MAX_WAIT_S = 3600.0


class LocalSessions:
    """What every local session shares: the node, the registry of live session ids, the token."""

    def __init__(self, node: NodeObjectStore, sessions: set[str], *, arena_path: str, arena_size: int,
                 token: str, matches: Callable[[str, str], bool]) -> None:
        self.node = node
        self.sessions = sessions
        self.arena_path = arena_path
        self.arena_size = arena_size
        self.token = token
        self.matches = matches
        self.open_count = 0
        self.by_id: dict[str, LocalSession] = {}
        node.freed_pinned.append(self._tell_freed)

    def _tell_freed(self, object_id: bytes, sessions: list[str]) -> None:
        """Objects freed while local sessions pin them: say so to those sessions (a client may hold the pin of
        a value it dropped, to serve its next get without asking; it must no longer)."""
        for sid in sessions:
            s = self.by_id.get(sid)
            if s is not None and not s.closed:
                s.send(lw.frame(lw.FREED, lw.NOTICE_ID, lw.freed_body([object_id])))

    def session(self, send: Callable[[bytes], None], close: Callable[[], None]) -> LocalSession:
        return LocalSession(self, send, close)


class LocalSession:
    """One connection of the local protocol; ``close`` is called to drop the connection."""

    def __init__(self, shared: LocalSessions, send: Callable[[bytes], None], close: Callable[[], None]) -> None:
        self.shared = shared
        self.node = shared.node
        self.send = send
        self._close_conn = close
        self.sid = ""
        self.name = ""
        self.closed = False
        self._buf = bytearray()
        self._waits: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ input

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes from the connection: run every complete frame, in order."""
        if self.closed:
            return
        buf = self._buf
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= lw.HEADER.size:
                h = lw.parse_header(buf, pos)
                end = pos + lw.HEADER.size + h.length
                if len(buf) < end:
                    break
                body = bytes(buf[pos + lw.HEADER.size : end])
                pos = end
                if not self._frame(h, body):
                    return
        except lw.ProtocolError as e:
            self._refuse(getattr(e, "request_id", 0), e.code, str(e))
            return
        except Exception as e:  # a bug here must not leave the client waiting for its reply
            log.exception("local session %s failed", self.name)
            self._refuse(0, "INTERNAL", f"the object store failed: {type(e).__name__}: {e}")
            return
        del buf[:pos]

    def _refuse(self, request_id: int, code: str, message: str) -> None:
        """A frame that breaks the protocol: say why, then close (nothing it asked for was done)."""
        log.warning("local session %s: %s", self.name or "(no hello)", message)
        self.send(lw.frame(lw.ERROR, request_id, lw.error_body(code, bounded(message))))
        self.close()
        self._close_conn()

    def _frame(self, h: lw.Header, body: bytes) -> bool:
        """Run one frame; False once the connection is to be closed."""
        rid = h.request_id
        try:
            if h.op not in lw.REQUESTS:
                raise lw.ProtocolError(f"unknown op {h.op}")
            releases, rest = lw.split_releases(h, body)
            if not self.sid:
                if h.op != lw.HELLO or releases:
                    raise lw.ProtocolError(f"the first frame must be a HELLO (op {lw.HELLO}), got op {h.op}")
                self._hello(rid, rest)
                return not self.closed
            if h.op == lw.HELLO:
                raise lw.ProtocolError("HELLO was sent twice on one connection")
            run = self._parse(h, rest)  # the whole frame is checked before anything is done
        except lw.ProtocolError as e:
            e.request_id = rid  # type: ignore[attr-defined]
            raise
        for oid in releases:
            self.node.manager.release(oid, self.sid)
        try:
            reply = run()
        except TesseraError as e:
            self.send(lw.frame(lw.ERROR, rid, lw.error_body(e.code, bounded(str(e)))))
            return True
        if reply is not None:
            self.send(lw.frame(h.op | lw.REPLY, rid, reply))
        return True

    def _hello(self, rid: int, body: memoryview) -> None:
        token, name = lw.parse_hello(body)
        if self.shared.token and not self.shared.matches(token, self.shared.token):
            self._refuse(rid, "UNAUTHENTICATED", "the HELLO lacks this cluster's token")
            return
        self.sid = f"local-{uuid.uuid4().hex}"
        self.name = name or self.sid
        self.shared.sessions.add(self.sid)
        self.shared.by_id[self.sid] = self
        self.shared.open_count += 1
        w = lw.Welcome(self.sid, self.node.node_id, self.shared.arena_path, self.shared.arena_size,
                       self.node.inline_threshold)
        self.send(lw.frame(lw.HELLO | lw.REPLY, rid, lw.welcome_body(w)))

    def _parse(self, h: lw.Header, body: memoryview) -> Callable[[], bytes | None]:
        """The request, parsed, as what runs it: it returns the reply's body (None: the reply comes later)."""
        sid, flags = self.sid, h.flags
        if h.op == lw.GET:
            oids, timeout_ms = lw.parse_get(body)
            return lambda: self._get(h.request_id, oids, timeout_ms)
        if h.op == lw.CREATE:
            oid, size, owner = lw.parse_create(body)
            return lambda: lw.offset_body(self.node.create(oid, size, owner, sid))
        if h.op == lw.SEAL:
            sealed = lw.parse_oid(body, "SEAL")

            def seal() -> bytes:
                self.node.seal(sealed, sid, bool(flags & lw.F_PIN), durable=bool(flags & lw.F_DURABLE))
                return b""
            return seal
        if h.op == lw.ABORT:
            aborted = lw.parse_oid(body, "ABORT")

            def abort() -> bytes:
                self.node.manager.abort(ids.check_id("object_id", aborted))
                return b""
            return abort
        if h.op == lw.PUT:
            objects = lw.parse_put(body)
            return lambda: self._put(objects, durable=bool(flags & lw.F_DURABLE))
        if len(body):  # RELEASE
            raise lw.ProtocolError(f"RELEASE carries nothing but releases, got {len(body)} more bytes")
        return lambda: b""

    # ------------------------------------------------------------------ ops

    def _get(self, rid: int, oids: list[bytes], timeout_ms: int) -> bytes | None:
        ready = self.node.try_get(oids, self.sid)
        if ready is not None:
            return _located(ready)
        t = asyncio.get_running_loop().create_task(self._wait_get(rid, oids, timeout_ms))
        self._waits.add(t)
        t.add_done_callback(self._waits.discard)
        return None

    def _put(self, objects: list[tuple[bytes, memoryview, str]], *, durable: bool) -> bytes:
        for oid, _, _ in objects:  # validate all before storing any
            ids.check_id("object_id", oid)
        failed = []
        for oid, data, owner in objects:
            try:
                self.node.put_inline(oid, data, owner, self.sid, False, durable=durable)  # type: ignore[arg-type]
            except TesseraError as e:
                failed.append((oid, f"{e.code}: {e}"))
        return lw.failed_body(failed)

    async def _wait_get(self, rid: int, oids: list[bytes], timeout_ms: int) -> None:
        timeout = timeout_ms / 1000 if timeout_ms else MAX_WAIT_S
        try:
            locs = await self.node.get(oids, self.sid, timeout)
        except TesseraError as e:
            if not self.closed:
                self.send(lw.frame(lw.ERROR, rid, lw.error_body(e.code, bounded(str(e)))))
            return
        if self.closed:  # the pins went with the session (release_session ran before they were taken)
            for loc in locs:
                if loc.offset is not None and loc.inline is None:
                    self.node.manager.release(loc.object_id, self.sid)
            return
        self.send(lw.frame(lw.GET | lw.REPLY, rid, _located(locs)))

    # ------------------------------------------------------------------ end

    def close(self) -> None:
        """The connection is gone: the session's waits stop, its pins are released, its creates aborted."""
        if self.closed:
            return
        self.closed = True
        for t in list(self._waits):
            t.cancel()
        if self.sid:
            self.shared.sessions.discard(self.sid)
            self.shared.by_id.pop(self.sid, None)
            self.shared.open_count -= 1
            self.node.manager.release_session(self.sid)


def _located(locs: list[Locator]) -> bytes:
    return lw.located_body([lw.Located(x.object_id, x.size, x.owner, offset=x.offset, inline=x.inline)
                            for x in locs])
