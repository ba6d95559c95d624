"""What every object-store client does the same way, whether it maps the arena or streams bytes.

Small values (up to the store's inline threshold) are kept by the client that put
them, as Ray's owners do, so reading them back costs no round trip; they are sent
to the store in batches by a background thread a few milliseconds later. A reader
elsewhere that asks for one before it arrives simply waits for it.

A session with the store (``OpenSession``) is kept open for the client's life:
small puts name it, and the pins it takes die with it. When the store restarts,
the session is gone; calls notice and open a new one once (:meth:`_retrying`).
"""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.api.object_store.v1 import object_store_pb2_grpc as pb_grpc
from tessera.client._local import LocalSessionLost
from tessera.common import rpc
from tessera.common.errors import DeadlineExceededError, NotFoundError, ResourceExhaustedError, TesseraError
from tessera.exceptions import GetTimeoutError, ObjectFreedError, ObjectStoreFullError, OwnerDiedError

if TYPE_CHECKING:
    from tessera.client.objects import ObjectRef

log = logging.getLogger(__name__)

SERVICE = "tessera.object_store.v1.ObjectStoreService"
#: Bytes of small objects a client keeps for reading its own puts back.
OWNED_CACHE_BYTES = 64 * 2**20
#: Small puts sent per PutObjects call.
BATCH_MAX = 1024
IDEMPOTENT = ("GetObjects", "ContainsObjects", "GetStats", "ReleaseObjects")
FOREVER_S = 365 * 24 * 3600.0
#: Ids per FreeObjects call.
FREE_BATCH = 5000
#: How long a client whose socket session broke waits for the store to answer again before it gives up.
RECONNECT_WAIT_S = 2.0


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


class ObjectClientBase(abc.ABC):
    """A session with one node's object store: small-object batching, the owned cache, session recovery.

    Subclasses open and close the session (:meth:`_open`, :meth:`_close_session`) and
    move the bytes of large objects (``put_serialized``, ``get``).
    """

    session_id: str
    node_id: bytes
    inline_threshold: int

    def __init__(self, address: str, *, timeout: float = 30.0, name: str = "", durable: bool = False) -> None:
        """``durable``: every object this client puts is also kept on the node's disk, so it outlives a crash
        of the store (what services keep there: parameters, artifacts, checkpoints)."""
        self.address = address
        self.durable = durable
        self.timeout = timeout
        self.name = name or f"pid-{os.getpid()}"
        self._channel = rpc.channel(address, service=SERVICE, idempotent_methods=IDEMPOTENT, default_timeout=timeout)
        self._stub = pb_grpc.ObjectStoreServiceStub(self._channel)
        self._lock = threading.RLock()  # (a dropped view's finalizer may run in a garbage collection inside it)
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

    # ------------------------------------------------------------------ the session

    @abc.abstractmethod
    def _open(self, wait: float | None = None) -> None:
        """Open a session with the store (again, after it restarted): sets session_id, node_id, inline_threshold;
        ``wait``: seconds the store may take to answer (default: the client's timeout)."""

    @abc.abstractmethod
    def _close_session(self) -> None:
        """End the session: the store drops the pins it holds."""

    def _open_grpc_session(self, wait: float | None = None) -> pb.OpenSessionResponse:
        """Open a gRPC session with the store (``self._streams``, ``self._session``): its answer."""
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
            hello: pb.OpenSessionResponse = next(iter(self._session))
        except grpc.RpcError as e:
            self._streams.close()
            raise _map_error(e) from None
        self.session_id = hello.session_id
        self.node_id = hello.node_id
        self.inline_threshold = hello.inline_threshold
        return hello

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

    # ------------------------------------------------------------------ interface of the subclasses

    @abc.abstractmethod
    def put(self, value: Any, *, owner: str = "", object_id: bytes | None = None) -> ObjectRef:
        """Store ``value`` (as ``object_id``, else a new id) and return its reference."""

    @abc.abstractmethod
    def put_serialized(self, oid: bytes, ser: Any, *, owner: str = "") -> ObjectRef:
        """Store an already serialized value (``tessera.common.serialization.Serialized``) as ``oid``."""

    @abc.abstractmethod
    def get(self, refs: Any, *, timeout: float | None = None) -> Any:
        """The value of one ref, or the values of a list of refs (GetTimeoutError past ``timeout``)."""

    # ------------------------------------------------------------------ small objects

    def _get_args(self, refs: Any) -> tuple[list[ObjectRef], bool]:
        """``get``'s refs as a list, and whether one ref was given; a put that failed in the background
        raises here."""
        from tessera.client.objects import ObjectRef

        single = isinstance(refs, ObjectRef)
        items: list[ObjectRef] = [refs] if single else list(refs)
        for r in items:
            if not isinstance(r, ObjectRef):
                raise TypeError(f"tessera.get takes ObjectRefs, got {type(r).__name__}")
        self._raise_flush_error()
        return items, single

    def _put_small(self, oid: bytes, data: bytes, owner: str) -> None:
        """Keep a small object's bytes here (reads of it cost nothing) and queue it for the store."""
        self._own(oid, data)
        self.put_inline(oid, data, owner=owner)

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

    def _put_batch(self, batch: list[pb.InlineObject]) -> list[str]:
        """Store a batch of small objects; why each one that failed did."""
        resp = self._stub.PutObjects(pb.PutObjectsRequest(session_id=self.session_id, objects=batch,
                                                          durable=self.durable))
        return list(resp.errors)

    def release_dropped_views(self) -> None:
        """Tell the store about views of objects this process dropped, if it has not yet (they are sent with
        the next call; a process that makes none would keep pinning them, and a freed object stays while it
        is pinned). Nothing to do for a client that holds no views."""
        return None

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

    def _stop_flusher(self) -> None:
        """Send what is pending, then let the flusher thread end."""
        try:
            self.flush(timeout=10)
        except Exception as e:
            log.warning("closing with unsent small objects: %s", e)
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ misc

    def delete(self, refs: Iterable[ObjectRef]) -> int:
        """Free objects now (FAILED_PRECONDITION while someone still views one)."""
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
        releases = self._take_releases()
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

    def _take_releases(self) -> list[bytes]:
        """Pins this client dropped and has not released yet (they ride on the next request)."""
        return []

    def _releases_back(self, releases: list[bytes]) -> None:
        """A request carrying ``releases`` failed: they go on the next one (none here: no pins to release)."""
        return None

    def contains(self, object_ids: Sequence[bytes]) -> list[bool]:
        """Whether each object is in this store and readable (sealed, in memory or spilled)."""
        return list(self._stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=list(object_ids))).present)

    def stats(self) -> pb.GetStatsResponse:
        return self._stub.GetStats(pb.GetStatsRequest())

    @abc.abstractmethod
    def close(self) -> None:
        """Send what is pending (:meth:`_stop_flusher`), then end the session and close the channels."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
