"""Reference counting of the objects a process owns (the ownership design of Ray's NSDI 2021 paper).

The owner of an object is the process whose ``put`` or task submission created it. It
frees the object, every copy on every node, once nothing can reach it any more:

- **local references**: live :class:`~tessera.client.objects.ObjectRef` instances in this
  process. A new ref counts at once (under a lock, in the creating thread); a finalized
  one only queues its id, since a finalizer may run in any thread at any moment, even
  one that holds the lock. Queued deaths are counted in batches (:meth:`process`).
- **submitted-task references**: tasks it submitted that take the object as an argument,
  top-level or nested in a value, and have not finished.
- **borrowers**: a task's worker reports the refs it still holds when the task ends
  (kept in an actor's state, a global) or passed on (nested in its return value, a put, a
  task it submitted). Such an object is kept for the life of its owner, as is any object
  whose ref was serialized outside a task's arguments (``tessera.put([ref])``): the owner
  cannot see those copies go.
- **lineage**: the record of the task that made an object stays while the object lives,
  or while a kept record of a task that read it may have to re-run it. Records nothing
  needs are dropped (a few seconds after the task ends, once its node wrote the record).

When the owner exits, what it owns goes with it: a borrower's get then fails with
OwnerDiedError. Nothing here talks to the network: the caller sends what
:meth:`process` returns.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

#: A task's record is dropped this long after the task ended at the earliest (its node writes it meanwhile).
RECORD_DELAY_S = 5.0
#: Freed ids remembered here, so a get of one fails at once with ObjectFreedError.
FREED_MEMORY = 10_000
FREED = "freed"


@dataclass(slots=True)
class _Owned:
    task_id: bytes | None  # the task of mine that makes it; None: put
    stored: bool = False  # may have copies in object stores (else it lives only in this process)
    big: bool = False  # stored in an arena (not inline): freeing it makes room for the next put
    submitted: int = 0  # pending tasks of mine that take it as an argument
    lineage: int = 0  # kept records of my tasks that take it as an argument
    escaped: bool = False  # a ref left this process in a way it cannot follow: kept until the owner exits
    freed: bool = False
    actors: set[bytes] | None = None  # actors that keep a ref in their state: kept until each is dead


@dataclass(slots=True)
class _Task:
    returns: list[bytes]
    args: list[bytes]  # owned objects it reads (a lineage reference each while its record is kept)
    holds: list[bytes] = field(default_factory=list)  # submitted-task references, released when it ends
    ended: float = 0.0  # monotonic time it finished; 0: still pending


@dataclass
class FreeBatch:
    """What the owner sends: objects whose copies and records go, and lineage records nothing needs."""

    stored: list[bytes] = field(default_factory=list)  # in object stores, refs only here: forget quietly
    shared: list[bytes] = field(default_factory=list)  # refs may exist elsewhere: the cluster remembers them
    local: list[bytes] = field(default_factory=list)  # held only in this process (inline values): drop them
    task_ids: list[bytes] = field(default_factory=list)
    reason: str = FREED
    big: bool = False  # frees arena space: send it before the next put or submission

    def __bool__(self) -> bool:
        return bool(self.stored or self.shared or self.local or self.task_ids)


class RefCounter:
    """One process's reference counts: of every ref it holds, and of the objects it owns."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, track_borrows: bool = False) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._local: dict[bytes, int] = {}
        self._dead: deque[bytes] = deque()
        self._owned: dict[bytes, _Owned] = {}
        self._tasks: dict[bytes, _Task] = {}
        self._due: deque[tuple[float, bytes]] = deque()  # (when, task id): its record may be droppable then
        self._actors: dict[bytes, set[bytes]] = {}  # actor id -> owned objects it keeps a ref to
        self._freed: OrderedDict[bytes, str] = OrderedDict()
        self._zero: list[bytes] = []  # owned ids whose local count reached zero, to check
        self._capture = threading.local()
        # a worker's view of what a task borrowed: refs born while it ran, refs it passed on
        self._track = track_borrows
        self._born: set[bytes] = set()
        self._passed: set[bytes] = set()

    # ------------------------------------------------------------------ ObjectRef lifetimes

    def born(self, oid: bytes) -> None:
        with self._lock:
            self._local[oid] = self._local.get(oid, 0) + 1
            if self._track and oid not in self._owned:
                self._born.add(oid)

    def died(self, oid: bytes) -> None:
        """From a finalizer: no lock, no allocation beyond the append."""
        self._dead.append(oid)

    def local_count(self, oid: bytes) -> int:
        with self._lock:
            self._count_deaths()
            return self._local.get(oid, 0)

    def _count_deaths(self) -> None:
        dead, local, owned = self._dead, self._local, self._owned
        while dead:
            oid = dead.popleft()
            n = local.get(oid, 0) - 1
            if n > 0:
                local[oid] = n
                continue
            local.pop(oid, None)
            if oid in owned:
                self._zero.append(oid)

    # ------------------------------------------------------------------ ownership

    def own_put(self, oid: bytes, *, big: bool = True) -> None:
        """This process put ``oid`` (its ref is made next); ``big``: into the arena, not inline."""
        with self._lock:
            self._owned[oid] = _Owned(None, stored=True, big=big)

    def own_task(self, task_id: bytes, returns: list[bytes], args: Iterable[bytes], nested: Iterable[bytes]) -> None:
        """This process submitted a task: it owns the returns; the task holds its owned arguments until it ends."""
        with self._lock:
            owned = self._owned
            lineage = [a for a in dict.fromkeys(args) if a in owned]
            holds = lineage + [a for a in dict.fromkeys(nested) if a in owned]
            for a in lineage:
                owned[a].lineage += 1
            for a in holds:
                owned[a].submitted += 1
            self._tasks[task_id] = _Task(returns, lineage, holds)
            for r in returns:
                owned[r] = _Owned(task_id)

    def stored(self, oid: bytes, *, big: bool = False) -> None:
        """An owned value went to the object store (a large return, a small one another process may read)."""
        with self._lock:
            o = self._owned.get(oid)
            if o is not None:
                o.stored = True
                o.big = o.big or big

    def task_ended(self, task_id: bytes, borrowed: Iterable[bytes] = (), *, actor_id: bytes = b"") -> None:
        """One of my tasks finished (or failed): its worker may still hold ``borrowed`` (an actor's worker: until
        the actor dies, see :meth:`actor_died`); its holds are released."""
        with self._lock:
            for oid in borrowed:
                o = self._owned.get(oid)
                if o is None:
                    continue
                if actor_id:
                    if o.actors is None:
                        o.actors = set()
                    o.actors.add(actor_id)
                    self._actors.setdefault(actor_id, set()).add(oid)
                else:
                    o.escaped = True
            t = self._tasks.get(task_id)
            if t is None or t.ended:
                return
            t.ended = self._clock()
            self._check_task(task_id)
            for a in t.holds:
                o = self._owned.get(a)
                if o is not None:
                    o.submitted -= 1
                    self._zero.append(a)
            t.holds = []

    def borrowing_actors(self) -> list[bytes]:
        """Actors that keep refs to objects this process owns (whose death releases them)."""
        with self._lock:
            return list(self._actors)

    def actor_died(self, actor_id: bytes) -> None:
        """The actor is dead: the refs its state kept are gone with it."""
        with self._lock:
            for oid in self._actors.pop(actor_id, ()):
                o = self._owned.get(oid)
                if o is not None and o.actors is not None:
                    o.actors.discard(actor_id)
                    if not o.actors:
                        o.actors = None
                        self._zero.append(oid)

    def owns(self, oid: bytes) -> bool:
        with self._lock:
            return oid in self._owned

    def freed_reason(self, oid: bytes) -> str | None:
        with self._lock:
            o = self._owned.get(oid)
            if o is not None:
                return FREED if o.freed else None
            return self._freed.get(oid)

    # ------------------------------------------------------------------ serialization

    def escaped(self, oid: bytes) -> None:
        """A ref to ``oid`` was serialized (nested in a value leaving this process)."""
        captured: list[bytes] | None = getattr(self._capture, "ids", None)
        if captured is not None:  # into a task's arguments: that task holds it
            captured.append(oid)
            return
        with self._lock:
            o = self._owned.get(oid)
            if o is not None:
                o.escaped = True
            elif self._track:
                self._passed.add(oid)

    def capture(self) -> _Capture:
        """``with counter.capture() as ids:`` collects the refs serialized meanwhile in this thread."""
        return _Capture(self._capture)

    def borrowed_report(self) -> list[bytes]:
        """A worker, after a task: refs it still holds that arrived while the task ran, or that it passed on."""
        with self._lock:
            self._count_deaths()
            out = {o for o in self._born if self._local.get(o, 0) > 0}
            out |= self._passed
            self._born.clear()
            self._passed.clear()
            return list(out)

    # ------------------------------------------------------------------ freeing

    def free_now(self, oids: Iterable[bytes]) -> FreeBatch:
        """``tessera.internal.free``: these go now, whoever still holds a ref (their gets fail)."""
        batch = FreeBatch()
        with self._lock:
            for oid in oids:
                o = self._owned.get(oid)
                if o is not None and o.freed:
                    continue
                if o is None and oid in self._freed:
                    continue
                if o is not None:
                    self._free(oid, o, batch, force_shared=True)
                else:  # not mine: the cluster frees it all the same
                    self._remember(oid, FREED)
                    batch.shared.append(oid)
            self._drop_records(batch, force=False)
        return batch

    def release_all(self, reason: str) -> FreeBatch:
        """The owner exits: everything it owns goes, and every record it kept."""
        batch = FreeBatch(reason=reason)
        with self._lock:
            for oid, o in list(self._owned.items()):
                if not o.freed:
                    self._free(oid, o, batch, force_shared=False)
            self._drop_records(batch, force=True)
            for oid in batch.shared:
                self._freed[oid] = reason
        return batch

    def process(self, *, records: bool = True) -> FreeBatch:
        """Count queued deaths; what became free (and, with ``records``, the lineage records now droppable)."""
        batch = FreeBatch()
        with self._lock:
            self._count_deaths()
            zero, self._zero = self._zero, []
            for oid in zero:
                o = self._owned.get(oid)
                if (o is None or o.freed or o.escaped or o.actors or o.submitted > 0
                        or self._local.get(oid, 0) > 0):
                    continue
                self._free(oid, o, batch, force_shared=False)
            if records:
                self._drop_records(batch, force=False)
        return batch

    def _free(self, oid: bytes, o: _Owned, batch: FreeBatch, *, force_shared: bool) -> None:
        o.freed = True
        batch.big = batch.big or o.big
        if o.actors:
            for a in o.actors:
                self._actors.get(a, set()).discard(oid)
        if o.escaped or o.actors or force_shared:
            batch.shared.append(oid)
        elif o.stored:
            batch.stored.append(oid)
        else:
            batch.local.append(oid)
        if o.task_id is not None:
            self._check_task(o.task_id)
        elif o.lineage == 0:
            del self._owned[oid]
            self._remember(oid, FREED)

    def _remember(self, oid: bytes, reason: str) -> None:
        self._freed[oid] = reason
        self._freed.move_to_end(oid)
        while len(self._freed) > FREED_MEMORY:
            self._freed.popitem(last=False)

    def _check_task(self, tid: bytes) -> None:
        """The record of ended task ``tid`` can go once its returns are all freed and no kept record reads them."""
        t = self._tasks.get(tid)
        if t is None or not t.ended:
            return
        owned = self._owned
        for r in t.returns:
            o = owned.get(r)
            if o is not None and not (o.freed and o.lineage == 0):
                return
        self._due.append((t.ended + RECORD_DELAY_S, tid))

    def _drop_records(self, batch: FreeBatch, *, force: bool) -> None:
        """Drop the records whose time came (all of them, with ``force``)."""
        if force:
            self._due.clear()
            for tid, task in list(self._tasks.items()):
                self._drop_task(tid, task, batch)
            return
        now = self._clock()
        due = self._due
        while due and due[0][0] <= now:
            _, tid = due.popleft()
            t = self._tasks.get(tid)
            if t is not None:
                self._drop_task(tid, t, batch)

    def _drop_task(self, tid: bytes, t: _Task, batch: FreeBatch) -> None:
        del self._tasks[tid]
        if t.ended:
            batch.task_ids.append(tid)
        for r in t.returns:
            if self._owned.pop(r, None) is not None:
                self._remember(r, FREED)
        for a in t.args:  # the lineage references it held
            o = self._owned.get(a)
            if o is None:
                continue
            o.lineage -= 1
            if o.freed and o.lineage == 0:
                if o.task_id is not None:
                    self._check_task(o.task_id)
                else:
                    del self._owned[a]
                    self._remember(a, FREED)

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._count_deaths()
            return {"owned": len(self._owned), "refs": len(self._local), "tasks": len(self._tasks),
                    "escaped": sum(1 for o in self._owned.values() if o.escaped and not o.freed)}

    def table(self) -> list[dict[str, object]]:
        """What this process owns or holds, for ``tessera memory``."""
        with self._lock:
            self._count_deaths()
            out: list[dict[str, object]] = []
            for oid, o in self._owned.items():
                if o.freed:
                    continue
                kinds = []
                if self._local.get(oid):
                    kinds.append("local")
                if o.submitted:
                    kinds.append("argument")
                if o.escaped or o.actors:
                    kinds.append("borrowed")
                out.append({"object_id": oid.hex(), "owned": True, "refs": self._local.get(oid, 0),
                            "reference": ",".join(kinds) or "lineage", "stored": o.stored})
            for oid, n in self._local.items():
                if oid not in self._owned:
                    out.append({"object_id": oid.hex(), "owned": False, "refs": n, "reference": "borrowed",
                                "stored": True})
            return out


class _Capture:
    def __init__(self, slot: threading.local) -> None:
        self._slot = slot
        self.ids: list[bytes] = []

    def __enter__(self) -> list[bytes]:
        self._outer = getattr(self._slot, "ids", None)
        self._slot.ids = self.ids
        return self.ids

    def __exit__(self, *exc: object) -> None:
        self._slot.ids = self._outer
