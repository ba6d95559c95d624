"""Objects: the public object-store client (`tessera.put` / `tessera.get` and services alike) over the node's object store.

Large values are written straight into the node's shared-memory arena and read
back in place: numpy arrays returned by ``get`` are read-only views of shared
memory (no copy at any size). The object stays pinned while such a view is
alive and is released once the last one is garbage.

Small values (up to the store's inline threshold) are kept by the client that
put them and sent to the store in batches (:mod:`tessera.client._base`).

On the store's own host the session runs over the store's Unix socket (see
:mod:`tessera.client._local`): a get is a socket round trip of tens of
microseconds instead of a gRPC call. ``TESSERA_OBJECT_TRANSPORT=grpc`` keeps it
on gRPC; other hosts always use gRPC.

A process that cannot map the store's arena (another host) gets a
:class:`~tessera.client._remote_objects.RemoteObjectStoreClient` instead, which
streams the bytes over gRPC: :func:`open_object_client` chooses.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

import grpc
import numpy as np
from opentelemetry import trace

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.client._base import FOREVER_S, ObjectClientBase, _map_error
from tessera.client._discovery import find_cluster
from tessera.client._local import LocalConnection, LocalSessionLost
from tessera.common import auth, ids, prefault, telemetry
from tessera.common import localwire as lw
from tessera.common.config import current_settings
from tessera.common.errors import InvalidArgumentError, TesseraError
from tessera.common.registry import control_store_stub
from tessera.common.serialization import deserialize, serialize

if TYPE_CHECKING:
    from tessera._refcount import RefCounter

log = logging.getLogger(__name__)

#: "grpc" keeps a same-host client's session on gRPC instead of the store's Unix socket.
TRANSPORT_ENV = "TESSERA_OBJECT_TRANSPORT"
#: Bytes of small objects sent in one frame over the store's socket.
PUT_FRAME_BYTES = 8 * 2**20

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


class ObjectStoreClient(ObjectClientBase):
    """A session with one node's object store (on this machine: the arena is mapped)."""

    def __init__(self, address: str, *, timeout: float = 30.0, name: str = "", durable: bool = False) -> None:
        """``durable``: every object this client puts is also kept on the node's disk, so it outlives a crash
        of the store (what services keep there: parameters, artifacts, checkpoints)."""
        super().__init__(address, timeout=timeout, name=name, durable=durable)
        self._releases: list[bytes] = []
        self._live: dict[bytes, weakref.ref[np.ndarray]] = {}  # objects this client views (and pins)
        #: objects whose last view died but whose release is not sent yet: (offset, size), while the pin lasts.
        #: A get of one takes the pin back, with no round trip (over the socket, which says what was freed).
        self._parked: dict[bytes, tuple[int, int]] = {}
        self._open()

    def _open(self, wait: float | None = None) -> None:
        """Open a session and map the node's arena (again, after the store restarted); on the store's host the
        session then moves to the store's Unix socket."""
        hello = self._open_grpc_session(wait)
        self._local: LocalConnection | None = None
        if hello.local_socket and hello.hostname == socket.gethostname() \
                and os.environ.get(TRANSPORT_ENV, "") != "grpc":
            try:
                # the socket has no metadata: the token (when one is set) travels in its first frame
                conn = LocalConnection(hello.local_socket, token=auth.client_token(), name=self.name,
                                       timeout=min(self.timeout, 5.0))
                conn.on_notice = self._notice
            except (OSError, lw.UnauthenticatedError) as e:
                log.info("object store session stays on gRPC: its socket is not usable (%s)", e)
            else:  # the socket's session replaces the gRPC one (which ends holding nothing)
                self._session.cancel()
                self._streams.close()
                self._local = conn
                self.session_id = conn.welcome.session_id
        fd = os.open(hello.arena_path, os.O_RDWR)
        # Mapped lazily: a page enters this process's page table when a put writes it or a get
        # reads it. Populating the whole arena here (MAP_POPULATE) made opening a client, and so
        # the first put, cost a page fault per page of a store that may be tens of GiB.
        try:
            self._wmap = mmap.mmap(fd, hello.arena_size, flags=mmap.MAP_SHARED)
            self._rmap = mmap.mmap(fd, hello.arena_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._arena = np.frombuffer(self._rmap, dtype=np.uint8)
        anchor = ctypes.c_char.from_buffer(self._wmap)
        self._wbase = ctypes.addressof(anchor)  # for page-congruent placement of large buffers
        del anchor  # (no export of the mapping may outlive this, or it could not be closed)
        # a large put maps the pages it writes in one call, not a fault per page (see tessera.common.prefault)
        self._written = prefault.WrittenPages(self._wbase, hello.arena_size)
        with self._lock:
            self._releases.clear()  # pins of the old session died with it
            self._parked.clear()

    @property
    def transport(self) -> str:
        """How this client's session talks to the store: "socket" (same host) or "grpc"."""
        return "socket" if self._local is not None else "grpc"

    def _socket(self) -> LocalConnection | None:
        """The socket for this call, or None for gRPC: the socket carries no trace context, so while spans
        are exported a call made in a trace goes over gRPC (the session is the same), keeping the trace whole."""
        conn = self._local
        if conn is not None and telemetry.spans_exported() and trace.get_current_span().get_span_context().is_valid:
            return None
        return conn

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
            self._put_small(oid, ser.to_bytes(), owner)
            return ObjectRef(oid)
        if self._socket() is None:  # (over the socket the releases ride on the create)
            self._flush_releases()
        self._retrying(lambda: self._put(oid, ser, owner))
        return ObjectRef(oid)

    def _put_batch(self, batch: list[pb.InlineObject]) -> list[str]:
        conn = self._socket()
        if conn is None:
            return super()._put_batch(batch)
        flags = lw.F_DURABLE if self.durable else 0
        failed: list[str] = []
        start = 0
        while start < len(batch):  # frames of at most PUT_FRAME_BYTES (the store refuses a body over MAX_BODY)
            end, size = start, 0
            while end < len(batch) and (end == start or size + len(batch[end].data) <= PUT_FRAME_BYTES):
                size += len(batch[end].data)
                end += 1
            body = lw.put_body([(o.object_id, o.data, o.owner) for o in batch[start:end]])
            reply = conn.call(lw.PUT, body, flags=flags, timeout=self.timeout)
            failed += [why for _, why in lw.parse_failed(reply)]
            start = end
        return failed

    def _put(self, oid: bytes, ser: Any, owner: str) -> None:
        conn = self._socket()
        if conn is not None:
            self._put_local(conn, oid, ser, owner)
            return
        sid = self.session_id
        if ser.size <= self.inline_threshold:
            self._stub.PutObject(pb.PutObjectRequest(session_id=sid, object_id=oid, data=ser.to_bytes(), owner=owner,
                                                     durable=self.durable))
            return
        req = pb.CreateObjectRequest(session_id=sid, object_id=oid, size=ser.size, owner=owner)
        off = self._stub.CreateObject(req).arena_offset
        try:
            self._write(off, ser)
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
            releases = self._swap_releases()
        off = lw.parse_offset(conn.call(lw.CREATE, lw.create_body(oid, ser.size, owner), releases=releases,
                                        timeout=self.timeout))
        try:
            self._write(off, ser)
        except BaseException:
            conn.call(lw.ABORT, oid, timeout=self.timeout)
            raise
        conn.call(lw.SEAL, oid, flags=lw.F_DURABLE if self.durable else 0, timeout=self.timeout)

    def _write(self, off: int, ser: Any) -> None:
        """Fill the object created at ``off`` of the arena."""
        self._written.prepare(off, ser.size)
        ser.write_into(memoryview(self._wmap)[off : off + ser.size], dst_addr=self._wbase + off)

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
        items, single = self._get_args(refs)
        local: dict[bytes, Any] = {}
        conn = self._local
        if conn is not None and self._parked and any(r.id in self._parked for r in items):
            conn.poll()  # the store's word on what was freed, before a parked pin serves a get
        with self._lock:
            for r in items:
                if r.id in self._owned:
                    local[r.id] = self._owned[r.id]
                else:
                    anchor = self._live[r.id]() if r.id in self._live else None
                    if anchor is not None:  # already pinned and mapped here: another view, no round trip
                        local[r.id] = memoryview(anchor)  # type: ignore[arg-type]
                    elif r.id in self._parked:  # pinned still (its release not sent): take the pin back
                        self._releases.remove(r.id)
                        off, size = self._parked.pop(r.id)
                        local[r.id] = memoryview(self._anchor(r.id, off, size))  # type: ignore[arg-type]
            if len(local) == len(items):
                releases = []
            else:
                releases = self._swap_releases()
        if len(local) == len(items):
            values = [deserialize(local[r.id]) for r in items]
            return values[0] if single else values
        remote = self._fetch([r.id for r in items if r.id not in local], timeout, releases)
        values = [deserialize(local[r.id]) if r.id in local else remote[r.id] for r in items]
        return values[0] if single else values

    def _fetch(self, object_ids: list[bytes], timeout: float | None, releases: list[bytes]) -> dict[bytes, Any]:
        """Get (wait for and pin) objects from the store, releasing ``releases`` on the way; id -> value."""
        timeout_ms = max(1, int(timeout * 1000)) if timeout is not None else 0
        deadline = (timeout + 5.0) if timeout is not None else FOREVER_S
        if self._socket() is not None:
            body = lw.get_body(object_ids, timeout_ms)

            def call_local() -> list[lw.Located]:
                sock = self._local  # (a new one, if the store restarted and the session was opened again)
                assert sock is not None
                rel, releases[:] = list(releases), []  # (they reach the store with the request, whatever its fate)
                # no timeout: as long as it takes (the store answers within its own longest wait, an hour)
                return lw.parse_located(sock.call(lw.GET, body, releases=rel,
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
        with self._lock:
            old = self._live.get(oid)
            old_anchor = old() if old is not None else None
            if old_anchor is not None:  # viewed here already (a racing get): keep that pin, return this one
                self._releases.append(oid)
                anchor = old_anchor
            else:
                anchor = self._anchor(oid, off, size)
        return deserialize(memoryview(anchor))  # type: ignore[arg-type]

    def _anchor(self, oid: bytes, off: int, size: int) -> np.ndarray:
        """A read-only view of a pinned object (under the lock); its life is the pin's."""
        anchor = self._arena[off : off + size]
        self._live[oid] = weakref.ref(anchor)
        weakref.finalize(anchor, self._release_later, oid, off, size)
        return anchor

    def _release_later(self, oid: bytes, off: int, size: int) -> None:
        with self._lock:
            ref = self._live.get(oid)
            if ref is not None and ref() is None:
                del self._live[oid]
            self._releases.append(oid)
            if self._local is not None and oid not in self._parked:
                self._parked[oid] = (off, size)

    def _swap_releases(self) -> list[bytes]:
        """The releases to send now (under the lock): their pins are no longer ours to take back."""
        todo, self._releases = self._releases, []
        self._parked.clear()
        return todo

    def _notice(self, h: lw.Header, body: memoryview) -> None:
        """The store's word (over the socket): objects this session pins were freed, so a parked pin of one
        must not serve a get (the get asks the store, which says the object is freed)."""
        if h.op == lw.FREED:
            with self._lock:
                for oid in lw.parse_freed(body):
                    self._parked.pop(oid, None)

    def _take_releases(self) -> list[bytes]:
        with self._lock:
            return self._swap_releases()

    def _releases_back(self, releases: list[bytes]) -> None:
        if releases:
            with self._lock:
                self._releases[:0] = releases

    def release_dropped_views(self) -> None:
        self._flush_releases()

    def _flush_releases(self) -> None:
        with self._lock:
            todo = self._swap_releases()
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
        return super().delete(refs)

    def close(self) -> None:
        """Send what is pending, then end the session: the store releases every pin it holds."""
        self._stop_flusher()
        try:
            self._flush_releases()
        except Exception:
            pass
        self._close_session()
        self._channel.close()

    def _close_session(self) -> None:
        self._session.cancel()
        self._streams.close()
        if self._local is not None:
            self._local.close()
        for m in (self._wmap, self._rmap):
            try:
                m.close()
            except BufferError:  # values still reference shared memory: it is unmapped when they go
                pass


# ---------------------------------------------------------------------- choosing a client

CLIENT_MODES = ("auto", "local", "remote")


def client_mode() -> str:
    """``TESSERA_CLIENT_MODE``: local, remote or auto (the default).

    Raises:
        InvalidArgumentError: any other value.
    """
    raw = current_settings().client_mode
    mode = raw.strip().lower() or "auto"
    if mode not in CLIENT_MODES:
        raise InvalidArgumentError(f"TESSERA_CLIENT_MODE must be local, remote or auto, got {raw!r}")
    return mode


def open_object_client(address: str, **kwargs: Any) -> ObjectClientBase:
    """A client of the object store at ``address``: one that maps its arena when this process can
    (:class:`ObjectStoreClient`), else one that streams the bytes over gRPC
    (:class:`~tessera.client._remote_objects.RemoteObjectStoreClient`).

    ``TESSERA_CLIENT_MODE=local`` or ``remote`` forces the choice; with ``auto`` the store's
    OpenSession answer decides (its arena file must exist here, on the store's own host).
    """
    mode = client_mode()
    if mode == "local":
        return ObjectStoreClient(address, **kwargs)
    from tessera.client._remote_objects import RemoteObjectStoreClient, arena_mappable, probe

    if mode == "auto" and arena_mappable(probe(address, timeout=kwargs.get("timeout", 30.0))):
        return ObjectStoreClient(address, **kwargs)
    return RemoteObjectStoreClient(address, **kwargs)


# ---------------------------------------------------------------------- module-level API

_default: ObjectClientBase | None = None
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


def _client() -> ObjectClientBase:
    global _default
    with _default_lock:
        if _default is None:
            _default = open_object_client(local_object_store_address())
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
