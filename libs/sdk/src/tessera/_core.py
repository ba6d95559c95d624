"""The owner side of tasks: submit, track, get, wait, cancel, rebuild lost objects.

A driver (or a worker running nested tasks) owns the tasks it submits, as in Ray:
it holds each task until the tasks it depends on have finished (their small values
then travel inline with it), sends submissions to its node agent in batches over
one session, and keeps the results that come back. Values too large to travel
inline are read from the object store. An object whose every copy was lost is
rebuilt by re-running the tasks that made it (their specs are kept in the control
store as lineage).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import pickle
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tessera._generators import DynamicObjectRefGenerator
from tessera._refcount import BorrowerTable, FreeBatch, RefCounter
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common import ids, rpc
from tessera.common.names import REFS_HEARTBEAT_S, REFS_NAMESPACE, REFS_STALE_S
from tessera.common.serialization import deserialize, serialize
from tessera.common.telemetry import current_traceparent
from tessera.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    ObjectFreedError,
    ObjectLostError,
    TaskCancelledError,
    TaskError,
    TaskUnschedulableError,
    TesseraSDKError,
    WorkerCrashedError,
)

log = logging.getLogger(__name__)

#: How long a get of a stored object waits before checking whether it was lost.
LOST_CHECK_S = 1.0
#: How often the owner counts dropped refs and frees what nothing references.
REFS_EVERY_S = 0.02
#: How often a process publishes its reference table (for ``tessera memory``, and so that what a driver that
#: died owned can be freed) when it changed; at least every REFS_HEARTBEAT_S (tessera.common.names).
REFS_PUBLISH_S = 2.0
#: Rows of one process's published table (the rest are counted).
REFS_ROWS = 2000
#: Most borrowed objects a published table lists one by one (about 2 MB); beyond, it says only that it is alive,
#: and the processes it borrowed from keep what it borrowed until it dies (a partial list would free too much).
REFS_HOLDS_MAX = 50_000
#: How soon a process publishes its table again once something it borrowed and listed there is let go.
REFS_PROMPT_S = 0.1
#: Borrowers' tables read at most per round (the rest wait for the next round).
BORROWERS_PER_ROUND = 200
FOREVER_S = 365 * 24 * 3600.0


class Transport(Protocol):
    def send(self, frame: pb.ClientFrame, *, idle: bool = False) -> None:
        """Send ``frame``; ``idle``: nothing else of this owner is in flight (a transport that batches may write
        it at once, from the calling thread, rather than wait for more to batch with)."""
    def close(self) -> None: ...


class ObjectRefLike(Protocol):
    @property
    def id(self) -> bytes: ...


@dataclass
class _Result:
    kind: str  # "v" inline value, "s" in the object store, "e" error, "o" a value held here (a dynamic generator)
    data: bytes = b""
    error: pb.TaskError | None = None
    name: str = ""
    obj: Any = None


#: TaskSpec.generator values.
GENERATOR_STREAMING = 1
GENERATOR_DYNAMIC = 2
#: Finished tasks whose times ``tessera.timeline`` keeps (the oldest go first).
TIMELINE_EVENTS = 100_000


@dataclass
class _Stream:
    """What has come back of a generator task: its items (by index from 1), and how it ended."""

    items: set[int]
    dynamic: bool = False
    ended: bool = False
    total: int = 0  # items it yielded in all (once ended)
    dropped: bool = False  # its ObjectRefGenerator is gone: items that come now are freed at once
    taken: int = 0  # items handed out as refs so far (streaming)


#: One finished task, for ``tessera.timeline``: (name, task id, node id, worker id, start and end in Unix
#: microseconds, whether it failed). A plain tuple: one is made per result, on the hot path.
TaskEvent = tuple[str, bytes, bytes, bytes, int, int, bool]


_derived: dict[type, type] = {}


def task_error(err: pb.TaskError, name: str) -> BaseException:
    """The exception ``get`` raises for a failed task."""
    kind = err.kind
    where = f"{name}: " if name else ""
    if kind == pb.ERROR_KIND_WORKER_CRASHED:
        return WorkerCrashedError(where + err.message)
    if kind == pb.ERROR_KIND_ACTOR_DIED:
        return ActorDiedError(where + err.message)
    if kind == pb.ERROR_KIND_CANCELLED:
        return TaskCancelledError(where + err.message)
    if kind == pb.ERROR_KIND_UNSCHEDULABLE:
        return TaskUnschedulableError(err.message)
    if kind == pb.ERROR_KIND_OBJECT_LOST:
        return ObjectLostError(where + err.message)
    cause: BaseException | None = None
    if err.exception:
        try:
            cause = pickle.loads(err.exception)
        except Exception:
            cause = None
    message = f"{name} raised {err.type_name or 'an exception'}: {err.message}"
    if isinstance(cause, TaskError):  # re-raised from a nested task: keep the innermost
        return cause
    if cause is not None and isinstance(cause, Exception):
        cls = type(cause)
        derived: type[TaskError] | None = _derived.get(cls)
        if derived is None:
            try:
                derived = type(f"TaskError({cls.__name__})", (TaskError, cls), {
                    "__init__": TaskError.__init__, "__str__": TaskError.__str__, "__reduce__": _reduce_derived,
                    "__module__": "tessera.exceptions"})
            except TypeError:  # incompatible layouts (e.g. some builtins): a plain TaskError
                derived = TaskError
            _derived[cls] = derived
        try:
            e: TaskError = Exception.__new__(derived)
            TaskError.__init__(e, message, cause=cause, traceback_str=err.traceback, function_name=name)
            return e
        except Exception:
            pass
    return TaskError(message, cause=cause, traceback_str=err.traceback, function_name=name)


def _reduce_derived(self: TaskError) -> tuple[Any, ...]:
    return (TaskError, (self.args[0] if self.args else "",), {"cause": self.cause, "traceback_str": self.traceback_str,
                                                              "function_name": self.function_name})


class Core:
    """One owner's tasks (a driver, or a worker's nested submissions)."""

    def __init__(self, *, job_id: bytes, objects: Callable[[], Any], control_store: Callable[[], Any],
                 worker: bool = False, stale_s: float = REFS_STALE_S) -> None:
        self.job_id = job_id
        self._objects = objects  # -> ObjectStoreClient (made lazily)
        self._cs = control_store  # -> control-store stub (made lazily)
        self.worker = worker
        self.transport: Transport | None = None
        self.node_id = b""
        self.cond = threading.Condition()
        self.results: dict[bytes, _Result] = {}
        self.pending: dict[bytes, pb.TaskSpec] = {}  # submitted, not finished
        self.held: dict[bytes, pb.TaskSpec] = {}  # waiting for own tasks it depends on
        self.streams: dict[bytes, _Stream] = {}  # generator tasks: their items so far
        # retry_exceptions of submitted tasks: True (any exception) or the exception types to retry
        self.retry_exceptions: dict[bytes, bool | tuple[type, ...]] = {}
        self.events: deque[TaskEvent] = deque(maxlen=TIMELINE_EVENTS)
        # the task this thread (or coroutine) runs: an actor's worker runs several at once
        self._current: contextvars.ContextVar[bytes] = contextvars.ContextVar("tessera_current_task", default=b"")
        self.closed = False
        self._rebuilding: dict[bytes, float] = {}
        self.escaped: set[bytes] = set()  # refs serialized elsewhere before their value arrived
        self.stored: set[bytes] = set()  # small values this owner put in the object store
        self.refs_key = f"{socket.gethostname()}:{os.getpid()}".encode()
        self._refs_key_str = self.refs_key.decode()
        self.refs = RefCounter(track_borrows=worker, me=self._refs_key_str)
        self._unsent: list[FreeBatch] = []  # frees the object store did not take yet (restarting)
        self._free_lock = threading.Lock()
        self._refs_thread: threading.Thread | None = None
        self._published: tuple[float, int] = (0.0, 0)  # when, and a digest of what
        self._publish_lock = threading.Lock()  # one table in flight at a time: a late put never undoes a newer one
        # a table older than this means this process is gone (its borrows end): it is refreshed well within it
        self.stale_s = stale_s
        self._heartbeat_s = min(REFS_HEARTBEAT_S, stale_s / 3)

    @property
    def current_task(self) -> bytes:
        return self._current.get()

    @current_task.setter
    def current_task(self, task_id: bytes) -> None:
        self._current.set(task_id)

    # ------------------------------------------------------------------ submit

    def submit(self, spec: pb.TaskSpec, nested: Sequence[bytes] = (), *,
               retry_exceptions: bool | tuple[type, ...] = False) -> list[bytes]:
        """Send ``spec`` (now, or once the tasks it depends on have finished); its return ids.

        ``nested``: refs serialized inside its argument values (the task holds them until it ends).
        ``retry_exceptions``: an exception it raises is retried (within ``max_retries``) if True, or if it is
        an instance of one of these types (Ray's option).
        """
        if self.closed:
            raise TesseraSDKError("tessera is shut down: call tessera.init() first")
        spec.job_id = self.job_id
        spec.owner_refs_key = self._refs_key_str  # refs returned nested in a value are lent to this table
        parent = self._current.get()
        if parent:
            spec.parent_task_id = parent
        spec.traceparent = current_traceparent()  # a task submitted under a span runs in its trace
        tid = spec.task_id
        returns = [tid + (i + 1).to_bytes(4, "big") for i in range(spec.num_returns)]
        self.refs.own_task(tid, returns, [a.object_id for a in spec.args if a.WhichOneof("kind") == "object_id"],
                           nested)
        if self._unsent or self.refs.holds_big():  # else no free could make room: the background pass counts
            self.flush_frees(records=False, urgent_only=True)
        with self.cond:
            if spec.generator:
                self.streams[tid] = _Stream(set(), dynamic=spec.generator == GENERATOR_DYNAMIC)
            if retry_exceptions:
                self.retry_exceptions[tid] = retry_exceptions
            state = self._resolve(spec) if spec.args else "ready"
            if state == "held":
                self.held[spec.task_id] = spec
                return returns
            idle = not self.pending
            self.pending[spec.task_id] = spec
        if state == "ready":
            self._send(pb.ClientFrame(submit=[spec]), idle=idle)
        return returns

    def _resolve(self, spec: pb.TaskSpec) -> str:
        """Inline arguments whose values are known; "held", "failed" (result set) or "ready". Caller holds cond."""
        held = False
        for a in spec.args:
            if a.WhichOneof("kind") != "object_id":
                continue
            oid = a.object_id
            r = self.results.get(oid)
            if r is None:
                tid = oid[: ids.TASK_ID_LEN]
                if tid in self.pending or tid in self.held:
                    held = True
                    continue
                data = self._owned_value(oid)
                if data is not None:
                    kw = a.keyword
                    a.value = data
                    a.keyword = kw
                continue
            if r.kind == "e":
                assert r.error is not None
                self._fail_locally(spec, r.error, r.name)
                return "failed"
            if r.kind == "v":
                a.value = r.data
            elif r.kind == "o":  # a dynamic generator's refs travel with it (kept for this owner's life)
                kw = a.keyword
                a.value = serialize(r.obj).to_bytes()
                a.keyword = kw
        return "held" if held else "ready"

    def _owned_value(self, oid: bytes) -> bytes | None:
        try:
            client = self._objects()
        except Exception:
            return None
        return client.owned(oid) if client is not None else None

    def _fail_locally(self, spec: pb.TaskSpec, err: pb.TaskError, name: str) -> None:
        self.retry_exceptions.pop(spec.task_id, None)
        if spec.task_id in self.streams:
            self._stream_end(pb.TaskResult(task_id=spec.task_id, error=err), name)
        else:
            for i in range(spec.num_returns):
                oid = ids.object_id(spec.task_id, i + 1)
                if self.refs.freed_reason(oid) is None:
                    self.results[oid] = _Result("e", error=err, name=name)
        self.refs.task_ended(spec.task_id)
        self.cond.notify_all()

    def _send(self, frame: pb.ClientFrame, *, idle: bool = False) -> None:
        t = self.transport
        if t is None:
            raise TesseraSDKError("not connected to a node agent: call tessera.init() first")
        t.send(frame, idle=idle)

    def pending_specs(self) -> list[pb.TaskSpec]:
        """What to send again after reconnecting to a (restarted) agent."""
        with self.cond:
            return list(self.pending.values())

    # ------------------------------------------------------------------ results

    def deliver(self, results: Sequence[pb.TaskResult]) -> None:
        """Results from the agent (called by the transport's reader thread)."""
        released: list[pb.TaskSpec] = []
        promote: list[tuple[bytes, bytes]] = []
        late: list[bytes] = []  # stored after their refs were all dropped: free them again
        refs = self.refs
        retried: list[pb.TaskSpec] = []
        with self.cond:
            for r in results:
                if r.partial:
                    late.extend(self._stream_item(r))
                    continue
                if r.HasField("error") and self._retry(r, retried):
                    continue
                spec = self.pending.pop(r.task_id, None)
                self.retry_exceptions.pop(r.task_id, None)
                name = spec.name if spec is not None else ""
                if r.end_us and spec is not None:
                    self.events.append((name, r.task_id, r.node_id, r.worker_id, r.start_us, r.end_us,
                                        r.HasField("error")))
                for v in r.returns:  # before the task's holds go: a ref it returned nested may be one it took
                    if v.contained_ids:
                        refs.contains(v.object_id, v.contained_ids)
                refs.task_ended(r.task_id, r.borrowed_object_ids, actor_id=spec.actor_id if spec is not None else b"",
                                borrower=r.borrower if r.borrower != self.refs_key.decode() else "",
                                pin_for_actor=spec is not None and spec.kind == pb.TASK_KIND_ACTOR_CREATE
                                and spec.max_restarts != 0 and not r.HasField("error"))
                if r.task_id in self.streams:
                    self._stream_end(r, name)
                    continue
                if r.HasField("error"):
                    n = spec.num_returns if spec is not None else max(1, len(r.returns))
                    for i in range(n):
                        oid = ids.object_id(r.task_id, i + 1)
                        if refs.freed_reason(oid) is None:
                            self.results[oid] = _Result("e", error=r.error, name=name)
                    continue
                for v in r.returns:
                    if refs.freed_reason(v.object_id) is not None:
                        if v.stored:
                            late.append(v.object_id)
                        continue
                    if v.stored:
                        refs.stored(v.object_id, big=True)
                    self.results[v.object_id] = _Result("s", name=name) if v.stored else _Result("v", v.value)
                    if v.object_id in self.escaped and not v.stored:
                        self.escaped.discard(v.object_id)
                        self.stored.add(v.object_id)
                        promote.append((v.object_id, v.value))
            if self.held:
                for tid, spec in list(self.held.items()):
                    state = self._resolve(spec)
                    if state != "held":
                        del self.held[tid]
                        if state == "ready":
                            self.pending[tid] = spec
                            released.append(spec)
            self.cond.notify_all()
        released.extend(retried)
        if released:
            self._send(pb.ClientFrame(submit=released))
        if promote:
            client = self._objects()
            for oid, data in promote:
                client.put_inline(oid, data)
        if late:
            with self._free_lock:
                self._unsent.append(FreeBatch(stored=late))

    def _retry(self, r: pb.TaskResult, retried: list[pb.TaskSpec]) -> bool:
        """Whether failed ``r`` is sent again (retry_exceptions, within max_retries); caller holds cond."""
        which = self.retry_exceptions.get(r.task_id)
        spec = self.pending.get(r.task_id)
        if not which or spec is None or r.error.kind != pb.ERROR_KIND_TASK:
            return False
        if 0 <= spec.max_retries <= max(spec.attempt, r.attempt):
            return False
        if which is not True:
            try:
                cause = pickle.loads(r.error.exception) if r.error.exception else None
            except Exception:
                cause = None
            if not isinstance(cause, which):  # type: ignore[arg-type]
                return False
        spec.attempt = max(spec.attempt, r.attempt) + 1
        log.info("%s raised %s: retrying (attempt %d)", spec.name, r.error.type_name, spec.attempt)
        retried.append(spec)
        return True

    def _stream_item(self, r: pb.TaskResult) -> list[bytes]:
        """A value a generator task yielded (the task runs on); what to free of it (stored values of a task
        that ended here already: cancelled before it started). Caller holds cond."""
        st = self.streams.get(r.task_id)
        if st is None or r.task_id not in self.pending:
            return [v.object_id for v in r.returns if v.stored]
        for v in r.returns:
            oid = v.object_id
            index = ids.return_index(oid) - (1 if st.dynamic else 0)
            if index in st.items or index < 1:
                continue  # sent again by a retry
            st.items.add(index)
            self.refs.add_return(r.task_id, oid, unreferenced=st.dropped)
            if v.contained_ids:
                self.refs.contains(oid, v.contained_ids)
            if v.stored:
                self.refs.stored(oid, big=True)
            self.results[oid] = _Result("s") if v.stored else _Result("v", v.value)
        self.cond.notify_all()
        return []

    def _stream_end(self, r: pb.TaskResult, name: str) -> None:
        """A generator task ended: after its last item, or with the error its next item raises. A dynamic
        one's return 1 becomes the list of its items' refs. Caller holds cond."""
        st = self.streams[r.task_id]
        st.ended = True
        # (a cancelled or crashed run does not say how many it yielded: what arrived is all there is)
        st.total = max(r.stream_items, max(st.items, default=0))
        if st.dynamic:
            oid = ids.object_id(r.task_id, 1)
            if self.refs.freed_reason(oid) is None:
                if r.HasField("error"):
                    self.results[oid] = _Result("e", error=r.error, name=name)
                else:
                    from tessera.client.objects import ObjectRef

                    refs = [ObjectRef(ids.object_id(r.task_id, i + 2)) for i in range(st.total)]
                    self.results[oid] = _Result("o", obj=DynamicObjectRefGenerator(refs), name=name)
            del self.streams[r.task_id]  # its items live as long as return 1's value
            return
        if r.HasField("error"):
            err = r.error
        elif len(st.items) < r.stream_items:
            err = pb.TaskError(kind=pb.ERROR_KIND_WORKER_CRASHED,
                               message=f"{r.stream_items - len(st.items)} of its {r.stream_items} values never arrived")
        else:
            return
        st.total += 1  # the error is its last item
        oid = ids.object_id(r.task_id, st.total)
        st.items.add(st.total)
        self.refs.add_return(r.task_id, oid, unreferenced=st.dropped)
        self.results[oid] = _Result("e", error=err, name=name)

    def stream_next(self, task_id: bytes, timeout: float | None) -> bytes | None:
        """The id of a streaming task's next item once it is ready (None: it ended), as a ref the caller
        makes. GetTimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + (timeout if timeout is not None else FOREVER_S)
        with self.cond:
            while True:
                st = self.streams.get(task_id)
                if st is None:
                    return None
                nxt = st.taken + 1
                if nxt in st.items:
                    st.taken = nxt
                    return ids.object_id(task_id, nxt)
                if st.ended:
                    del self.streams[task_id]
                    return None
                if self.closed:
                    raise TesseraSDKError("tessera was shut down while waiting")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GetTimeoutError(f"the next value of {self._describe(ids.object_id(task_id, 1))} was not "
                                          f"ready within {timeout:g}s")
                self.cond.wait(min(remaining, 1.0))

    def stream_next_ready(self, task_id: bytes) -> None:
        """Wait until ``stream_next`` would return now (or tessera shuts down)."""
        with self.cond:
            while not self.closed:
                st = self.streams.get(task_id)
                if st is None or st.ended or st.taken + 1 in st.items:
                    return
                self.cond.wait(1.0)

    def stream_ready(self, task_id: bytes) -> bool:
        """Whether ``stream_next`` would return now."""
        with self.cond:
            st = self.streams.get(task_id)
            return st is None or st.ended or st.taken + 1 in st.items

    def stream_dropped(self, task_id: bytes) -> None:
        """A streaming task's ObjectRefGenerator is gone: the items it did not hand out are freed (those
        still to come, as they come)."""
        with self.cond:
            st = self.streams.get(task_id)
            if st is None:
                return
            st.dropped = True
            left = [ids.object_id(task_id, i) for i in st.items if i > st.taken]
            if st.ended:
                del self.streams[task_id]
        self.refs.unreferenced(left)

    def escape(self, oid: bytes) -> None:
        """A ref to ``oid`` is leaving this process: small values live only here, so store them for others.

        Values too large to travel inline are in the object store already; results not
        back yet are stored when they arrive.
        """
        self.refs.escaped(oid)
        with self.cond:
            r = self.results.get(oid)
            if r is None:
                if self._known(oid):
                    self.escaped.add(oid)
                return
            if r.kind not in ("v", "o") or oid in self.stored:
                return
            self.stored.add(oid)
            data, obj = r.data, r.obj
        if obj is not None:  # a dynamic generator's refs: they leave with it (and are kept for this owner's life)
            data = serialize(obj).to_bytes()
        self.refs.stored(oid)
        self._objects().put_inline(oid, data)

    def _known(self, oid: bytes) -> bool:
        tid = oid[: ids.TASK_ID_LEN]
        return oid in self.results or tid in self.pending or tid in self.held

    # ------------------------------------------------------------------ get / wait

    def get(self, refs: Sequence[ObjectRefLike], timeout: float | None) -> list[Any]:
        deadline = time.monotonic() + (timeout if timeout is not None else FOREVER_S)
        out: list[Any] = []
        for ref in refs:
            out.append(self._get_one(ref, deadline, timeout))
        return out

    def _get_one(self, ref: ObjectRefLike, deadline: float, timeout: float | None) -> Any:
        oid = ref.id
        why = self.refs.freed_reason(oid)
        if why is not None:
            raise ObjectFreedError(f"object {oid.hex()} was freed ({why}): it cannot be read")
        with self.cond:
            r = self.results.get(oid)
            if r is None and self._known(oid):
                self._block(+1)
                try:
                    while r is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise GetTimeoutError(f"{self._describe(oid)} was not ready within {timeout:g}s")
                        self.cond.wait(min(remaining, 1.0))
                        r = self.results.get(oid)
                        if self.closed:
                            raise TesseraSDKError("tessera was shut down while waiting")
                finally:
                    self._block(-1)
        if r is not None:
            if r.kind == "v":
                return deserialize(r.data)
            if r.kind == "o":
                return r.obj
            if r.kind == "e":
                assert r.error is not None
                raise task_error(r.error, r.name)
        return self._fetch(ref, deadline, timeout)

    def _describe(self, oid: bytes) -> str:
        tid = oid[: ids.TASK_ID_LEN]
        spec = self.pending.get(tid) or self.held.get(tid)
        name = spec.name if spec is not None else ""
        return f"the result of {name}" if name else f"object {oid.hex()}"

    def _block(self, delta: int) -> None:
        if self.worker and self.transport is not None:
            try:
                self.transport.send(pb.ClientFrame(blocked=delta))
            except Exception:
                pass

    def _fetch(self, ref: ObjectRefLike, deadline: float, timeout: float | None) -> Any:
        """A value in the object store; rebuilt through lineage if every copy is gone."""
        client = self._objects()
        blocked = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GetTimeoutError(f"{self._describe(ref.id)} was not available within {timeout:g}s")
                try:
                    return client.get(ref, timeout=min(remaining, LOST_CHECK_S))
                except GetTimeoutError:
                    if not blocked:
                        self._block(+1)
                        blocked = True
                    self._maybe_rebuild(ref.id)
        finally:
            if blocked:
                self._block(-1)

    def ready(self, refs: Sequence[ObjectRefLike]) -> list[bool]:
        out = []
        foreign = []
        with self.cond:
            for i, ref in enumerate(refs):
                if ref.id in self.results:
                    out.append(True)
                elif self._known(ref.id):
                    out.append(False)
                else:
                    out.append(False)
                    foreign.append(i)
        if foreign:
            present = self._exists([refs[i].id for i in foreign])
            for i, p in zip(foreign, present, strict=True):
                out[i] = p
        return out

    def _exists(self, oids: list[bytes]) -> list[bool]:
        client = self._objects()
        owned = [client.owned(o) is not None for o in oids]
        stub = self._cs()
        objs = stub.GetObjects(cpb.GetObjectsRequest(object_ids=oids), timeout=10.0).objects
        located = {o.object_id for o in objs if o.locations}
        return [w or o in located for w, o in zip(owned, oids, strict=True)]

    def wait(self, refs: Sequence[ObjectRefLike], num_returns: int, timeout: float | None) -> tuple[list[int], list[int]]:
        deadline = time.monotonic() + (timeout if timeout is not None else FOREVER_S)
        has_foreign = False
        while True:
            flags = self.ready(refs)
            ready = [i for i, f in enumerate(flags) if f]
            if len(ready) >= num_returns or time.monotonic() >= deadline:
                ready = ready[:num_returns]
                taken = set(ready)
                return ready, [i for i in range(len(refs)) if i not in taken]
            with self.cond:
                has_foreign = any(not self._known(r.id) for r in refs)
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self.cond.wait(min(remaining, 0.05 if has_foreign else 1.0))

    # ------------------------------------------------------------------ cancel

    def cancel(self, ref: ObjectRefLike, *, force: bool, recursive: bool = True) -> None:
        """Ray's ``cancel``: a task not sent yet fails here; one sent goes to the agent (dropped if queued,
        interrupted if running). A finished (or unknown) task is left alone."""
        tid = ref.id[: ids.TASK_ID_LEN]
        with self.cond:
            spec = self.held.get(tid) or self.pending.get(tid)
            if spec is not None and force and spec.kind == pb.TaskKind.TASK_KIND_ACTOR_METHOD:
                raise ValueError("force=True is not supported for actor tasks: use tessera.kill(actor) to stop "
                                 "the actor")
            spec = self.held.pop(tid, None)
            if spec is not None:
                self._fail_locally(spec, pb.TaskError(kind=pb.ERROR_KIND_CANCELLED, message="cancelled"), spec.name)
                return
            if tid not in self.pending:
                return
        self._send(pb.ClientFrame(cancel=[tid], force=force, recursive=recursive))

    def cancel_children(self, parent: bytes, *, force: bool) -> None:
        """Cancel (recursively) the tasks ``parent`` submitted that have not finished: it was cancelled."""
        with self.cond:
            held = [s for s in self.held.values() if s.parent_task_id == parent]
            sent = [t for t, s in self.pending.items() if s.parent_task_id == parent
                    and not (force and s.kind == pb.TaskKind.TASK_KIND_ACTOR_METHOD)]
            for s in held:
                del self.held[s.task_id]
                self._fail_locally(s, pb.TaskError(kind=pb.ERROR_KIND_CANCELLED, message="cancelled (its parent was)"),
                                   s.name)
        if sent:
            self._send(pb.ClientFrame(cancel=sent, force=force, recursive=True))

    # ------------------------------------------------------------------ lineage

    def _maybe_rebuild(self, oid: bytes) -> None:
        """If every copy of ``oid`` is gone, re-run the tasks that made it (producers first)."""
        now = time.monotonic()
        if now - self._rebuilding.get(oid, 0.0) < 5.0:
            return
        stub = self._cs()
        objs = stub.GetObjects(cpb.GetObjectsRequest(object_ids=[oid]), timeout=10.0).objects
        if objs and objs[0].locations and self._still_held(oid, list(objs[0].locations)):
            return  # a copy exists: the store is fetching it
        if ids.return_index(oid) == 0:
            raise ObjectLostError(f"object {oid.hex()} was put, not computed, and no copy is left: it cannot be rebuilt")
        try:
            lineage = stub.GetLineage(cpb.GetLineageRequest(object_id=oid), timeout=10.0).tasks
        except Exception as e:
            raise ObjectLostError(f"object {oid.hex()} is lost and its lineage is unavailable: {e}") from None
        if not lineage:
            return  # not recorded yet (a task still running elsewhere): keep waiting
        self._rebuilding[oid] = now
        rerun: list[pb.TaskSpec] = []
        for rec in lineage:
            returns = [ids.object_id(rec.spec.task_id, i + 1) for i in range(rec.spec.num_returns)]
            infos = stub.GetObjects(cpb.GetObjectsRequest(object_ids=returns), timeout=10.0).objects
            have = {o.object_id for o in infos if o.locations}
            if rec.spec.task_id != oid[: ids.TASK_ID_LEN] and all(r in have for r in returns):
                continue
            if rec.state not in (cpb.TASK_STATE_FINISHED, cpb.TASK_STATE_FAILED):
                continue  # running or queued: it will produce the object
            spec = pb.TaskSpec.FromString(rec.spec.args)
            spec.attempt = rec.attempt + 1
            rerun.append(spec)
        if not rerun:
            return
        log.warning("object %s is lost: re-running %d task(s) of its lineage (%s)", oid.hex(), len(rerun),
                    ", ".join(s.name for s in rerun))
        with self.cond:
            for s in rerun:
                self.pending[s.task_id] = s
                for i in range(s.num_returns):
                    self.results.pop(ids.object_id(s.task_id, i + 1), None)
        self._send(pb.ClientFrame(submit=rerun))

    def _still_held(self, oid: bytes, nodes: list[bytes]) -> bool:
        """Whether any of ``nodes`` really holds ``oid``; forget the copies that are gone (a store restarted)."""
        import grpc

        from tessera.api.object_store.v1 import object_store_pb2 as opb
        from tessera.api.object_store.v1 import object_store_pb2_grpc as opb_grpc

        stub = self._cs()
        gone = []
        for node in nodes:
            try:
                addr = stub.GetNode(cpb.GetNodeRequest(node_id=node), timeout=5.0).node.object_store_address
                with rpc.stream_channel(addr) as ch:  # carries the token when one is set
                    present = opb_grpc.ObjectStoreServiceStub(ch).ContainsObjects(
                        opb.ContainsObjectsRequest(object_ids=[oid]), timeout=5.0).present
                if present and present[0]:
                    return True
                gone.append(node)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                    return True  # cannot tell now (restarting): look again later
                gone.append(node)
        if gone:
            stub.RemoveObjectLocations(cpb.RemoveObjectLocationsRequest(
                locations=[cpb.ObjectLocation(object_id=oid, node_id=n) for n in gone]), timeout=10.0)
        return False

    # ------------------------------------------------------------------ reference counting

    def start_refs(self) -> None:
        """Count dropped refs and free what nothing references, every REFS_EVERY_S, in the background."""
        if self._refs_thread is None:
            self._refs_thread = threading.Thread(target=self._refs_loop, name="tessera-refs", daemon=True)
            self._refs_thread.start()

    def _refs_loop(self) -> None:
        last = time.monotonic()
        while not self.closed:
            time.sleep(REFS_EVERY_S)
            try:
                self.flush_frees(records=True)
            except Exception as e:  # the store may be restarting: the frees wait in _unsent
                log.debug("could not free objects yet: %s", e)
            now = time.monotonic()
            due = now - last >= REFS_PUBLISH_S
            if due or (self.refs.holds_gone() and time.time() - self._published[0] >= REFS_PROMPT_S):
                try:
                    self.publish_refs()  # what it let go of is no longer listed: its lenders free it sooner
                except Exception as e:
                    log.debug("could not publish the reference table: %s", e)
            if due:
                last = now
                try:
                    self._check_borrowers()
                    self._check_borrowing_actors()
                except Exception as e:
                    log.debug("could not read the borrowers' tables or look up actors: %s", e)
                try:  # an idle process's dropped views would keep pinning what their owners freed
                    self._objects().release_dropped_views()
                except Exception as e:
                    log.debug("could not release dropped views: %s", e)

    def _check_borrowers(self) -> None:
        """Read the tables of the processes that borrow from this one (all at once): a borrow ends when its
        borrower's table stops listing the object, or when the borrower is gone (no table, or a stale one)."""
        import grpc

        keys = self.refs.borrower_keys()[:BORROWERS_PER_ROUND]
        if not keys:
            return
        since = time.monotonic()
        stub = self._cs()
        calls = [(k, stub.KvGet.future(cpb.KvGetRequest(namespace=REFS_NAMESPACE, key=k.encode()), timeout=5.0))
                 for k in keys]
        tables: dict[str, BorrowerTable | None] = {}
        for key, call in calls:
            try:
                raw = call.result()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    tables[key] = None  # it ended and removed its table
                continue  # cannot tell now: the next round will
            try:
                tables[key] = read_table(raw.value, time.time())
            except (ValueError, TypeError, AttributeError) as e:
                log.warning("the reference table of %s does not parse: %s", key, e)
        self.refs.borrowers_checked(tables, since)

    def _check_borrowing_actors(self) -> None:
        """Refs kept in a dead actor's state went with it: release them."""
        import grpc

        stub = self._cs()
        for a in self.refs.borrowing_actors()[:100]:
            try:
                dead = stub.GetActor(cpb.GetActorRequest(actor_id=a), timeout=5.0).actor.state == cpb.ACTOR_STATE_DEAD
            except grpc.RpcError as e:
                dead = e.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            if dead:
                self.refs.actor_died(a)

    def publish_refs(self, *, force: bool = False) -> None:
        """Put this process's reference table in the control store: ``tessera memory`` reads them all, and the
        processes this one borrowed from read there what it still holds."""
        with self._publish_lock:
            rows = self.refs.table()
            held, escaped = self.refs.holds()
            lent = self.refs.lent_on()
            digest = hash((tuple((r["object_id"], r["refs"], r["reference"]) for r in rows), tuple(held),
                           tuple(escaped), tuple((o, tuple(k)) for o, k in lent.items())))
            now = time.time()
            when, last = self._published
            if not force and digest == last and now - when < self._heartbeat_s:
                self.refs.announced(held)
                return
            if not rows and not held and not last and not force:
                self.refs.announced(held)
                return  # nothing held, nothing published before
            doc = {"process": self.refs_key.decode(), "job_id": self.job_id.hex(), "worker": self.worker,
                   "time": now, "stale_s": self.stale_s, "rows": rows[:REFS_ROWS],
                   "more": max(0, len(rows) - REFS_ROWS),
                   "holds": [o.hex() for o in held] if len(held) <= REFS_HOLDS_MAX else None,
                   "escaped": [o.hex() for o in escaped[:REFS_HOLDS_MAX]],
                   "lent": {o.hex(): keys for o, keys in lent.items()}}
            self._cs().KvPut(cpb.KvPutRequest(namespace=REFS_NAMESPACE, key=self.refs_key, overwrite=True,
                                              value=json.dumps(doc).encode()), timeout=5.0)
            self._published = (now, digest)
            self.refs.announced(held)

    def unpublish_refs(self) -> None:
        """This process ends: its table goes, unless it lists refs passed on untracked (the processes it
        borrowed them from read that there, even once the table is stale)."""
        with self._publish_lock:
            if self._published[0] and not self.refs.holds()[1]:
                self._cs().KvDelete(cpb.KvDeleteRequest(namespace=REFS_NAMESPACE, key=self.refs_key), timeout=5.0)

    def flush_frees(self, *, records: bool = True, urgent_only: bool = False) -> None:
        """Free what the refs dropped so far leave unreferenced. ``urgent_only`` (before a put or a submission):
        send now only if arena space is freed, so the next object finds room; small frees wait for the
        background thread's next batch. A store or control store that cannot take them now (restarting) is
        no error of the caller's: they wait for the next try."""
        batch = self.refs.process(records=records)
        with self._free_lock:
            if batch:
                self._drop_results(batch)
                self._unsent.append(batch)
            if not self._unsent or (urgent_only and not any(b.big for b in self._unsent)):
                return
            todo, self._unsent = self._unsent, []
            try:
                self._send_frees(todo)
            except Exception as e:
                self._unsent[:0] = todo
                log.info("freeing objects later: %s", e)

    def _drop_results(self, batch: FreeBatch) -> None:
        with self.cond:
            for oid in (*batch.local, *batch.stored, *batch.shared):
                self.results.pop(oid, None)
                self.stored.discard(oid)
                self.escaped.discard(oid)

    def _send_frees(self, todo: list[FreeBatch]) -> None:
        stored = [o for b in todo for o in b.stored]
        shared = [o for b in todo for o in b.shared]
        tasks = [t for b in todo for t in b.task_ids]
        if not (stored or shared or tasks):
            return
        client = self._objects()
        reason = next((b.reason for b in todo if b.shared), "")
        if shared:
            client.free(shared, task_ids=tasks, remember=True, reason=reason)
            tasks = []
        if stored or tasks:
            client.free(stored, task_ids=tasks)

    def free_now(self, oids: Sequence[bytes]) -> None:
        """``tessera.internal.free``: every copy goes now; gets of these objects fail with ObjectFreedError."""
        batch = self.refs.free_now(oids)
        with self._free_lock:
            self._drop_results(batch)
            self._send_frees([batch])

    def release_all(self, reason: str) -> None:
        """The owner exits: what it owns goes with it (borrowers' gets fail with OwnerDiedError)."""
        batch = self.refs.release_all(reason)
        with self._free_lock:
            todo, self._unsent = [*self._unsent, batch], []
            self._drop_results(batch)
            self._send_frees(todo)

    # ------------------------------------------------------------------ life

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def read_table(raw: bytes, now: float) -> BorrowerTable:
    """A published reference table as a lender sees it, at wall-clock time ``now``."""
    doc = json.loads(raw)
    alive = now - float(doc.get("time", 0)) <= float(doc.get("stale_s", REFS_STALE_S))
    holds = doc.get("holds")
    lent = {bytes.fromhex(h): frozenset(str(k) for k in keys) for h, keys in (doc.get("lent") or {}).items()}
    return BorrowerTable(alive=alive, holds=None if holds is None else frozenset(bytes.fromhex(h) for h in holds),
                         escaped=frozenset(bytes.fromhex(h) for h in doc.get("escaped", ())), lent=lent)


def new_task_id() -> bytes:
    return os.urandom(ids.TASK_ID_LEN)
