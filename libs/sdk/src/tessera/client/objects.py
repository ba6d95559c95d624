"""Objects: the public object-store client (`tessera.put` / `tessera.get` and services alike) over the node's object store.

Large values are written straight into the node's shared-memory arena and read
back in place: numpy arrays returned by ``get`` are read-only views of shared
memory (no copy at any size). The object stays pinned while such a view is
alive and is released once the last one is garbage.

Small values (up to the store's inline threshold) are kept by the client that
put them, as Ray's owners do, so reading them back costs no round trip; they are
sent to the store in batches by a background thread a few milliseconds later.
A reader elsewhere that asks for one before it arrives simply waits for it.

On the store's own host the session runs over the store's Unix socket (see
:mod:`tessera.client._local`): a get is a socket round trip of tens of
microseconds instead of a gRPC call. ``TESSERA_OBJECT_TRANSPORT=grpc`` keeps it
on gRPC; other hosts always use gRPC.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.api.object_store.v1 import object_store_pb2_grpc as pb_grpc
from tessera.client._discovery import find_cluster
from tessera.client._local import LocalConnection, LocalSessionLost
from tessera.common import auth, ids, rpc
from tessera.common import localwire as lw
from tessera.common.errors import DeadlineExceededError, NotFoundError, ResourceExhaustedError, TesseraError
from tessera.common.registry import control_store_stub
from tessera.common.serialization import deserialize, serialize
from tessera.exceptions import GetTimeoutError, ObjectFreedError, ObjectStoreFullError, OwnerDiedError

if TYPE_CHECKING:
    from tessera._refcount import RefCounter

log = logging.getLogger(__name__)

SERVICE = "tessera.object_store.v1.ObjectStoreService"
#: Bytes of small objects a client keeps for reading its own puts back.
OWNED_CACHE_BYTES = 64 * 2**20
#: Small puts sent per PutObjects call.
BATCH_MAX = 1024
#: Ids per FreeObjects call.
FREE_BATCH = 5000
IDEMPOTENT = ("GetObjects", "ContainsObjects", "GetStats", "ReleaseObjects")
FOREVER_S = 365 * 24 * 3600.0
#: "grpc" keeps a same-host client's session on gRPC instead of the store's Unix socket.
TRANSPORT_ENV = "TESSERA_OBJECT_TRANSPORT"
#: Bytes of small objects sent in one frame over the store's socket.
PUT_FRAME_BYTES = 8 * 2**20
#: How long a client whose socket session broke waits for the store to answer again before it gives up.
RECONNECT_WAIT_S = 2.0


class ObjectRef:
    """A reference to an immutable object in the cluster (20-byte id).

    Its owner counts live refs (``counter``, set by ``tessera.init`` and in workers): once none is left
    anywhere, the object is freed, every copy on every node.
    """

    __slots__ = ("_id", "_c")

    def __init__(self, object_id: bytes) -> None:
        self._id = ids.check_id("object_id", bytes(object_id))
        c = self._c = counter
        if c is not None:
            c.born(self._id)

    def __del__(self) -> None:
        c = self._c
        if c is not None:
            c.died(self._id)

    @property
    def id(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __reduce__(self) -> tuple[Any, ...]:
        hook = escape_hook
        if hook is not None:  # the ref leaves its owner (nested in a value): make sure others can read it
            hook(self._id)
        return ObjectRef, (self._id,)


#: Called with an object id whenever an ObjectRef is serialized (set by the task API's owner).
escape_hook: Callable[[bytes], None] | None = None
#: This process's reference counts (set by ``tessera.init`` and in workers; None: refs are not counted).
counter: RefCounter | None = None


def freed_error(message: str) -> Exception:
    """ObjectFreedError, or OwnerDiedError when the object went with its owner."""
    if "(owner died" in message:
        return OwnerDiedError(message)
    return ObjectFreedError(message)


def _map_error(e: grpc.RpcError | Exception) -> Exception:
    if isinstance(e, DeadlineExceededError | TimeoutError):  # (local sessions: the store's typed errors)
        return GetTimeoutError(str(e))
    if isinstance(e, ResourceExhaustedError):
        return ObjectStoreFullError(str(e))
    if isinstance(e, NotFoundError) and " was freed (" in str(e):
        return freed_error(str(e))
    if not isinstance(e, grpc.RpcError):
        return e
    code = e.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GetTimeoutError(e.details())  # type: ignore[attr-defined]
    if code == grpc.StatusCode.NOT_FOUND and " was freed (" in (e.details() or ""):  # type: ignore[attr-defined]
        return freed_error(e.details())  # type: ignore[attr-defined]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ObjectStoreFullError(e.details())  # type: ignore[attr-defined]
    return e


class ObjectStoreClient:
    """A session with one node's object store (on this machine: the arena is mapped)."""

    def __init__(self, address: str, *, timeout: float = 30.0, name: str = "", durable: bool = False) -> None:
        """``durable``: every object this client puts is also kept on the node's disk, so it outlives a crash
        of the store (what services keep there: parameters, artifacts, checkpoints)."""
        self.address = address
        self.durable = durable
        self.timeout = timeout
        self.name = name or f"pid-{os.getpid()}"
        self._channel = rpc.channel(address, service=SERVICE, idempotent_methods=IDEMPOTENT, default_timeout=timeout)
        self._stub = pb_grpc.ObjectStoreServiceStub(self._channel)
        self._releases: list[bytes] = []
        self._live: dict[bytes, weakref.ref[np.ndarray]] = {}  # objects this client views (and pins)
        self._lock = threading.Lock()
        self._owned: OrderedDict[bytes, bytes] = OrderedDict()
        self._owned_bytes = 0
        self._pending: list[pb.InlineObject] = []
        # the trace of the first traced put waiting in _pending: the batch that carries it is sent in that trace
        self._pending_ctx: otel_context.Context | None = None
        self._inflight = 0
        self._cond = threading.Condition()
        self._flusher: threading.Thread | None = None
        self._closing = False
        self._flush_error: Exception | None = None
        self._open()

    def _open(self, wait: float | None = None) -> None:
        """Open a session and map the node's arena (again, after the store restarted); ``wait``: seconds
        the store may take to answer (default: the client's timeout)."""
        wait = self.timeout if wait is None else wait
        self._streams = rpc.stream_channel(self.address)
        try:  # a store that just restarted may take a moment to accept connections again
            grpc.channel_ready_future(self._streams).result(timeout=wait)
        except grpc.FutureTimeoutError:
            self._streams.close()
            raise ConnectionError(f"no object store answered at {self.address} within {wait:g}s") from None
        self._session = pb_grpc.ObjectStoreServiceStub(self._streams).OpenSession(
            pb.OpenSessionRequest(client_name=self.name), metadata=rpc.trace_metadata())
        try:
            hello = next(iter(self._session))
        except grpc.RpcError as e:
            self._streams.close()
            raise _map_error(e) from None
        self.session_id = hello.session_id
        self.node_id = hello.node_id
        self.inline_threshold = hello.inline_threshold
        self._local: LocalConnection | None = None
        if hello.local_socket and hello.hostname == socket.gethostname() \
                and os.environ.get(TRANSPORT_ENV, "") != "grpc":
            try:
                # the socket has no metadata: the token (when one is set) travels in its first frame
                conn = LocalConnection(hello.local_socket, token=auth.client_token(), name=self.name,
                                       timeout=min(self.timeout, 5.0))
            except (OSError, lw.UnauthenticatedError) as e:
                log.info("object store session stays on gRPC: its socket is not usable (%s)", e)
            else:  # the socket's session replaces the gRPC one (which ends holding nothing)
                self._session.cancel()
                self._streams.close()
                self._local = conn
                self.session_id = conn.welcome.session_id
        fd = os.open(hello.arena_path, os.O_RDWR)
        populate = getattr(mmap, "MAP_POPULATE", 0)  # map the (pre-faulted) pages now, not on first touch
        try:
            self._wmap = mmap.mmap(fd, hello.arena_size, flags=mmap.MAP_SHARED | populate)
            self._rmap = mmap.mmap(fd, hello.arena_size, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._arena = np.frombuffer(self._rmap, dtype=np.uint8)
        anchor = ctypes.c_char.from_buffer(self._wmap)
        self._wbase = ctypes.addressof(anchor)  # for page-congruent placement of large buffers
        del anchor  # (no export of the mapping may outlive this, or it could not be closed)
        with self._lock:
            self._releases.clear()  # pins of the old session died with it

    @property
    def transport(self) -> str:
        """How this client's session talks to the store: "socket" (same host) or "grpc"."""
        return "socket" if self._local is not None else "grpc"

    def _session_lost(self, e: Exception) -> bool:
        if isinstance(e, LocalSessionLost):
            return True
        return (isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
                and "unknown session" in (e.details() or ""))  # type: ignore[attr-defined]

    def _retrying(self, op: Any) -> Any:
        """Run ``op``; if the store restarted (our session is gone), reopen once and run it again."""
        try:
            return op()
        except (grpc.RpcError, LocalSessionLost, TesseraError, TimeoutError) as e:
            if not self._session_lost(e):
                raise _map_error(e) from None
            # a closed socket: the store restarted (then it answers at once) or is down (then say so promptly)
            wait = RECONNECT_WAIT_S if isinstance(e, LocalSessionLost) else None
        self._close_session()
        self._open(wait)
        try:
            return op()
        except (grpc.RpcError, LocalSessionLost, TesseraError, TimeoutError) as e:
            raise _map_error(e) from None

    # ------------------------------------------------------------------ put

    def put(self, value: Any, *, owner: str = "", object_id: bytes | None = None) -> ObjectRef:
        """Store ``value``; large buffers are copied once, straight into shared memory.

        ``object_id`` names the object (a task's return value); by default a new id is drawn.
        """
        oid = ids.check_id("object_id", object_id) if object_id is not None else ids.new_id("object_id")
        ser = serialize(value)
        return self.put_serialized(oid, ser, owner=owner)

    def put_serialized(self, oid: bytes, ser: Any, *, owner: str = "") -> ObjectRef:
        """Store an already serialized value (``tessera.common.serialization.Serialized``) as ``oid``."""
        self._raise_flush_error()
        if ser.size <= self.inline_threshold:
            data = ser.to_bytes()
            self._own(oid, data)
            with self._cond:
                self._pending.append(pb.InlineObject(object_id=oid, data=data, owner=owner))
                self._note_trace()
                self._cond.notify()
            if self._flusher is None:
                self._start_flusher()
            return ObjectRef(oid)
        if self._local is None:  # (over the socket the releases ride on the create)
            self._flush_releases()
        self._retrying(lambda: self._put(oid, ser, owner))
        return ObjectRef(oid)

    # ------------------------------------------------------------------ small objects

    def put_inline(self, oid: bytes, data: bytes, *, owner: str = "") -> None:
        """Queue an already serialized small object (at most the inline threshold) for the next batch."""
        with self._cond:
            self._pending.append(pb.InlineObject(object_id=oid, data=data, owner=owner))
            self._note_trace()
            self._cond.notify()
        if self._flusher is None:
            self._start_flusher()

    def owned(self, oid: bytes) -> bytes | None:
        """The serialized bytes of a small object this client put, if it still keeps them."""
        with self._lock:
            return self._owned.get(oid)

    def _own(self, oid: bytes, data: bytes) -> None:
        with self._lock:
            self._owned[oid] = data
            self._owned_bytes += len(data)
            while self._owned_bytes > OWNED_CACHE_BYTES and self._owned:
                _, old = self._owned.popitem(last=False)
                self._owned_bytes -= len(old)

    def _note_trace(self) -> None:
        """Remember the caller's trace for the next batch (the first traced put wins). Caller holds _cond."""
        if self._pending_ctx is None and trace.get_current_span().get_span_context().is_valid:
            self._pending_ctx = otel_context.get_current()

    def _start_flusher(self) -> None:
        with self._cond:
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="tessera-put-flusher", daemon=True)
                self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending and self._closing:
                    return
                batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
                ctx, self._pending_ctx = self._pending_ctx, None
                self._inflight += 1
            token = otel_context.attach(ctx) if ctx is not None else None
            try:
                failed = self._retrying(lambda batch=batch: self._put_batch(batch))
                if failed:
                    raise RuntimeError(f"{len(failed)} small objects were not stored: {failed[0]}")
            except Exception as e:  # surfaced on the next put/get/flush
                log.warning("could not store %d small objects: %s", len(batch), e)
                self._flush_error = e
            finally:
                if token is not None:
                    otel_context.detach(token)
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every small object put so far is in the store."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._pending and not self._inflight, timeout):
                raise GetTimeoutError(f"{len(self._pending)} small objects not sent within {timeout}s")
        self._raise_flush_error()

    def _raise_flush_error(self) -> None:
        if self._flush_error is not None:
            e, self._flush_error = self._flush_error, None
            raise e

    def _put_batch(self, batch: list[pb.InlineObject]) -> list[str]:
        """Store a batch of small objects; why each one that failed did."""
        if self._local is not None:
            flags = lw.F_DURABLE if self.durable else 0
            failed: list[str] = []
            start = 0
            while start < len(batch):  # frames of at most PUT_FRAME_BYTES (the store refuses a body over MAX_BODY)
                end, size = start, 0
                while end < len(batch) and (end == start or size + len(batch[end].data) <= PUT_FRAME_BYTES):
                    size += len(batch[end].data)
                    end += 1
                body = lw.put_body([(o.object_id, o.data, o.owner) for o in batch[start:end]])
                reply = self._local.call(lw.PUT, body, flags=flags, timeout=self.timeout)
                failed += [why for _, why in lw.parse_failed(reply)]
                start = end
            return failed
        resp = self._stub.PutObjects(pb.PutObjectsRequest(session_id=self.session_id, objects=batch,
                                                          durable=self.durable))
        return list(resp.errors)

    def _put(self, oid: bytes, ser: Any, owner: str) -> None:
        if self._local is not None:
            self._put_local(self._local, oid, ser, owner)
            return
        sid = self.session_id
        if ser.size <= self.inline_threshold:
            self._stub.PutObject(pb.PutObjectRequest(session_id=sid, object_id=oid, data=ser.to_bytes(), owner=owner,
                                                     durable=self.durable))
            return
        req = pb.CreateObjectRequest(session_id=sid, object_id=oid, size=ser.size, owner=owner)
        off = self._stub.CreateObject(req).arena_offset
        try:
            ser.write_into(memoryview(self._wmap)[off : off + ser.size], dst_addr=self._wbase + off)
        except BaseException:
            self._stub.AbortObject(pb.AbortObjectRequest(session_id=sid, object_id=oid))
            raise
        self._stub.SealObject(pb.SealObjectRequest(session_id=sid, object_id=oid, durable=self.durable))

    def _put_local(self, conn: LocalConnection, oid: bytes, ser: Any, owner: str) -> None:
        if ser.size <= self.inline_threshold:
            body = lw.put_body([(oid, ser.to_bytes(), owner)])
            failed = lw.parse_failed(conn.call(lw.PUT, body, flags=lw.F_DURABLE if self.durable else 0,
                                               timeout=self.timeout))
            if failed:  # (each reason reads "CODE: message")
                code, _, message = failed[0][1].partition(": ")
                raise _map_error(lw.error_of(code, message))
            return
        with self._lock:  # views dropped since the last request: their pins go first, making room
            releases, self._releases = self._releases, []
        off = lw.parse_offset(conn.call(lw.CREATE, lw.create_body(oid, ser.size, owner), releases=releases,
                                        timeout=self.timeout))
        try:
            ser.write_into(memoryview(self._wmap)[off : off + ser.size], dst_addr=self._wbase + off)
        except BaseException:
            conn.call(lw.ABORT, oid, timeout=self.timeout)
            raise
        conn.call(lw.SEAL, oid, flags=lw.F_DURABLE if self.durable else 0, timeout=self.timeout)

    # ------------------------------------------------------------------ get

    @overload
    def get(self, refs: ObjectRef, *, timeout: float | None = None) -> Any: ...
    @overload
    def get(self, refs: Sequence[ObjectRef], *, timeout: float | None = None) -> list[Any]: ...

    def get(self, refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
        """The values of ``refs`` (one ref or a list), waiting up to ``timeout`` seconds (None: forever).

        Raises:
            GetTimeoutError: an object was not available in time.
        """
        single = isinstance(refs, ObjectRef)
        items: list[ObjectRef] = [refs] if isinstance(refs, ObjectRef) else list(refs)
        for r in items:
            if not isinstance(r, ObjectRef):
                raise TypeError(f"tessera.get takes ObjectRefs, got {type(r).__name__}")
        self._raise_flush_error()
        local: dict[bytes, Any] = {}
        with self._lock:
            for r in items:
                if r.id in self._owned:
                    local[r.id] = self._owned[r.id]
                else:
                    anchor = self._live[r.id]() if r.id in self._live else None
                    if anchor is not None:  # already pinned and mapped here: another view, no round trip
                        local[r.id] = memoryview(anchor)  # type: ignore[arg-type]
            releases, self._releases = self._releases, []
        if len(local) == len(items):
            self._releases_back(releases)
            values = [deserialize(local[r.id]) for r in items]
            return values[0] if single else values
        remote = self._fetch([r.id for r in items if r.id not in local], timeout, releases)
        values = [deserialize(local[r.id]) if r.id in local else remote[r.id] for r in items]
        return values[0] if single else values

    def _fetch(self, object_ids: list[bytes], timeout: float | None, releases: list[bytes]) -> dict[bytes, Any]:
        """Get (wait for and pin) objects from the store, releasing ``releases`` on the way; id -> value."""
        timeout_ms = max(1, int(timeout * 1000)) if timeout is not None else 0
        deadline = (timeout + 5.0) if timeout is not None else FOREVER_S
        if self._local is not None:
            body = lw.get_body(object_ids, timeout_ms)

            def call_local() -> list[lw.Located]:
                assert self._local is not None
                rel, releases[:] = list(releases), []  # (they reach the store with the request, whatever its fate)
                # no timeout: as long as it takes (the store answers within its own longest wait, an hour)
                return lw.parse_located(self._local.call(lw.GET, body, releases=rel,
                                                         timeout=None if timeout is None else deadline,
                                                         on_late=self._late_get))

            locs = self._retrying(call_local)
            return {loc.object_id: self._materialize_at(loc.object_id, loc.size, loc.offset, loc.inline)
                    for loc in locs}

        def call() -> pb.GetObjectsResponse:
            req = pb.GetObjectsRequest(session_id=self.session_id, object_ids=object_ids,
                                       timeout_ms=timeout_ms, release_object_ids=releases)
            return self._stub.GetObjects(req, timeout=deadline)

        try:
            resp = self._retrying(call)
        except BaseException:
            self._releases_back(releases)
            raise
        return {loc.object_id: self._materialize(loc) for loc in resp.objects}

    def _late_get(self, h: lw.Header, body: memoryview) -> None:
        """A get's answer that came after its caller gave up: release what it pinned."""
        if h.op == lw.GET | lw.REPLY:
            with self._lock:
                self._releases.extend(loc.object_id for loc in lw.parse_located(body) if loc.inline is None)

    def _materialize(self, loc: pb.ObjectLocator) -> Any:
        inline = loc.inline_data if loc.WhichOneof("where") == "inline_data" else None
        return self._materialize_at(loc.object_id, loc.size, loc.arena_offset, inline)

    def _materialize_at(self, oid: bytes, size: int, offset: int | None, inline: bytes | None) -> Any:
        if inline is not None:
            return deserialize(inline)
        off = offset or 0
        anchor = self._arena[off : off + size]  # a read-only view; its life is the pin's
        with self._lock:
            old = self._live.get(oid)
            old_anchor = old() if old is not None else None
            if old_anchor is not None:  # viewed here already (a racing get): keep that pin, return this one
                self._releases.append(oid)
                anchor = old_anchor
            else:
                self._live[oid] = weakref.ref(anchor)
                weakref.finalize(anchor, self._release_later, oid)
        return deserialize(memoryview(anchor))  # type: ignore[arg-type]

    def _release_later(self, oid: bytes) -> None:
        with self._lock:
            ref = self._live.get(oid)
            if ref is not None and ref() is None:
                del self._live[oid]
            self._releases.append(oid)

    def _releases_back(self, releases: list[bytes]) -> None:
        if releases:
            with self._lock:
                self._releases[:0] = releases

    def _flush_releases(self) -> None:
        with self._lock:
            todo, self._releases = self._releases, []
        if todo:
            try:
                if self._local is not None:
                    self._local.call(lw.RELEASE, releases=todo, timeout=self.timeout)
                else:
                    self._stub.ReleaseObjects(pb.ReleaseObjectsRequest(session_id=self.session_id, object_ids=todo))
            except (grpc.RpcError, LocalSessionLost, TesseraError, TimeoutError) as e:
                if not self._session_lost(e):  # a lost session released its pins already
                    raise _map_error(e) from None

    # ------------------------------------------------------------------ misc

    def delete(self, refs: Iterable[ObjectRef]) -> int:
        """Free objects now (FAILED_PRECONDITION while someone still views one)."""
        self._flush_releases()  # views this client dropped no longer pin
        with self._lock:
            ids_ = [r.id for r in refs]
            for oid in ids_:
                data = self._owned.pop(oid, None)
                self._owned_bytes -= len(data) if data is not None else 0
        return int(self._stub.DeleteObjects(pb.DeleteObjectsRequest(object_ids=ids_)).deleted)

    def free(self, object_ids: Sequence[bytes], *, task_ids: Sequence[bytes] = (), remember: bool = False,
             reason: str = "") -> int:
        """Reference counting: drop every copy of these objects (a viewed one once its views go) and their
        records, with the lineage records in ``task_ids``; ``remember``: refs may exist elsewhere, their gets
        fail at once. Pins this client dropped are released first. Returns the copies dropped here now."""
        with self._lock:
            for oid in object_ids:
                data = self._owned.pop(oid, None)
                self._owned_bytes -= len(data) if data is not None else 0
            releases, self._releases = self._releases, []
        total = 0
        for i in range(0, max(len(object_ids), len(task_ids), 1), FREE_BATCH):
            req = pb.FreeObjectsRequest(session_id=self.session_id, release_object_ids=releases if i == 0 else (),
                                        object_ids=object_ids[i:i + FREE_BATCH], task_ids=task_ids[i:i + FREE_BATCH],
                                        remember=remember, reason=reason)
            try:
                total += int(self._stub.FreeObjects(req).freed)
            except grpc.RpcError as e:
                if i == 0:
                    self._releases_back(releases)
                if not self._session_lost(e):
                    raise _map_error(e) from None
        return total

    def contains(self, object_ids: Sequence[bytes]) -> list[bool]:
        """Whether each object is in this store and readable (sealed, in memory or spilled)."""
        return list(self._stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=list(object_ids))).present)

    def stats(self) -> pb.GetStatsResponse:
        return self._stub.GetStats(pb.GetStatsRequest())

    def close(self) -> None:
        """Send what is pending, then end the session: the store releases every pin it holds."""
        try:
            self.flush(timeout=10)
        except Exception as e:
            log.warning("closing with unsent small objects: %s", e)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        try:
            self._flush_releases()
        except Exception:
            pass
        self._close_session()
        self._channel.close()

    def _close_session(self) -> None:
        if self._local is not None:
            self._local.close()
        self._session.cancel()
        self._streams.close()
        for m in (self._wmap, self._rmap):
            try:
                m.close()
            except BufferError:  # values still reference shared memory: it is unmapped when they go
                pass

    def __enter__(self) -> ObjectStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- module-level API

_default: ObjectStoreClient | None = None
_default_lock = threading.Lock()


def local_object_store_address(address: str | None = None) -> str:
    """The object store of this machine's node in the cluster found by :func:`find_cluster`."""
    cluster = find_cluster(address)
    svc = cluster.services.get("object-store")
    if svc and svc.get("address"):
        return str(svc["address"])
    ch, stub = control_store_stub(cluster.control_store_address)
    with ch:
        inst = stub.ListInstances(cpb.ListInstancesRequest(service="object-store")).instances
    here = os.uname().nodename
    local = [i for i in inst if i.hostname == here] or list(inst)
    if not local:
        raise ConnectionError("no object store is registered in the cluster")
    return local[0].address


def _client() -> ObjectStoreClient:
    global _default
    with _default_lock:
        if _default is None:
            _default = ObjectStoreClient(local_object_store_address())
        return _default


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the local node's object store and return its reference."""
    return _client().put(value)


def get(refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) of ``refs``; numpy arrays come back as read-only views of shared memory."""
    return _client().get(refs, timeout=timeout)


def _reset() -> None:
    """Close the default client (tests, and tessera.shutdown later)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None
