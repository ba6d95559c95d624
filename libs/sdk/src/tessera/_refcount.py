"""Reference counting of the objects a process owns (the ownership design of Ray's NSDI 2021 paper).

The owner of an object is the process whose ``put`` or task submission created it. It
frees the object, every copy on every node, once nothing can reach it any more:

- **local references**: live :class:`~tessera.client.objects.ObjectRef` instances in this
  process. A new ref counts at once (under a lock, in the creating thread); a finalized
  one only queues its id, since a finalizer may run in any thread at any moment, even
  one that holds the lock. Queued deaths are counted in batches (:meth:`process`).
- **submitted-task references**: tasks it submitted that take the object as an argument,
  top-level or nested in a value, and have not finished.
- **borrowers**: a task's worker reports the refs it still holds when the task ends (kept
  in an actor's state, a global, or lent on to a task it submitted), naming itself by the
  key of the reference table it publishes in the control store. The owner reads the
  tables of its borrowers every few seconds (:meth:`borrower_keys`,
  :meth:`borrowers_checked`): a borrow ends when the borrower's table stops listing the
  object, when the table is gone or stale (the borrower died), or when the borrower's
  actor died. A borrower lists an object while it holds a ref, while a task it submitted
  with it is pending, or while its own borrowers list it: the same rule, one level down,
  follows borrowers of borrowers. A ref that leaves a process in a way it cannot follow
  (captured in a closure, say) keeps the object for the owner's life: the borrower's table
  marks it ``escaped``, and the owner keeps it from then on.
- **containers**: an object whose value holds refs (``tessera.put([ref])``, a task that
  returns ``[ref]``) holds them while it lives, at its owner (:meth:`contains`). A worker
  that returns refs nested in a value lends them to the task's submitter (:meth:`lend`):
  it keeps them while the submitter's table lists them (the submitter lists them while the
  value lives). A borrower of the value that unpacked a ref and kept it becomes a borrower
  of that ref once its table lists it, so the ref outlives the value for it.
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
#: A process given refs nested in a value has this long to list them in its table before their lender reads it.
LEND_GRACE_S = 5.0
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
    contained: int = 0  # live objects whose values hold a ref to it
    freed: bool = False


@dataclass(slots=True)
class _Task:
    returns: list[bytes]
    args: list[bytes]  # owned objects it reads (a lineage reference each while its record is kept)
    holds: list[bytes] = field(default_factory=list)  # submitted-task references, released when it ends
    lent: list[bytes] = field(default_factory=list)  # objects I do not own that it takes, held until it ends
    ended: float = 0.0  # monotonic time it finished; 0: still pending


@dataclass(frozen=True, slots=True)
class BorrowerTable:
    """What a borrower's published reference table says (read by the processes it borrowed from)."""

    alive: bool  # refreshed within the staleness its publisher promised (else: it died)
    holds: frozenset[bytes] | None  # the objects it does not own and still holds; None: it does not say
    escaped: frozenset[bytes] = frozenset()  # refs it passed on in ways it cannot follow: kept for the owner's life
    lent: dict[bytes, frozenset[str]] = field(default_factory=dict)  # held object -> the tables that borrow it from it


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

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, track_borrows: bool = False,
                 me: str = "") -> None:
        self.me = me  # the key of this process's own reference table
        self._lock = threading.Lock()
        self._clock = clock
        self._local: dict[bytes, int] = {}
        self._dead: deque[bytes] = deque()
        self._owned: dict[bytes, _Owned] = {}
        self._tasks: dict[bytes, _Task] = {}
        self._due: deque[tuple[float, bytes]] = deque()  # (when, task id): its record may be droppable then
        # borrows: of objects I own, and of objects I borrowed and lent on (then my table lists them meanwhile)
        self._borrows: dict[bytes, dict[str, float]] = {}  # object -> borrower key -> when it last reported it
        self._by_key: dict[str, set[bytes]] = {}  # borrower key -> the objects it borrows from me
        self._actor_keys: dict[bytes, str] = {}  # actor -> the key of its worker (its death ends its borrows)
        self._actor_pins: dict[bytes, str] = {}  # restartable actor -> the key pinning its constructor's arguments
        self._lent: dict[bytes, int] = {}  # objects I do not own -> my pending tasks that take them
        self._kept: set[bytes] = set()  # objects I do not own whose refs I passed on untracked: held for my life
        self._containers: dict[bytes, list[bytes]] = {}  # an object of mine -> the refs its value holds
        self._inside: dict[bytes, int] = {}  # objects I do not own -> how many of my objects' values hold them
        self._announced: frozenset[bytes] = frozenset()  # the holds my published table lists
        self._holds_gone = False  # one of the announced holds may have ended: publish again soon
        self._freed: OrderedDict[bytes, str] = OrderedDict()
        self._zero: list[bytes] = []  # owned ids whose local count reached zero, to check
        # owned objects in an arena, not freed yet (at least: one owned twice counts twice): while there are
        # none, no free can make room in an arena, so a submission need not count the refs dropped meanwhile
        self._big = 0
        self._capture = threading.local()
        # a worker's view of what a task borrowed: refs born while it ran, refs it passed on
        self._track = track_borrows
        self._born: set[bytes] = set()
        self._passed: set[bytes] = set()
        self._lent_now: set[bytes] = set()  # objects I do not own lent to tasks submitted while the task ran

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
            elif oid in self._announced and not self._holds(oid):
                self._holds_gone = True

    # ------------------------------------------------------------------ ownership

    def own_put(self, oid: bytes, *, big: bool = True) -> None:
        """This process put ``oid`` (its ref is made next); ``big``: into the arena, not inline."""
        with self._lock:
            self._owned[oid] = _Owned(None, stored=True, big=big)
            if big:
                self._big += 1

    def own_task(self, task_id: bytes, returns: list[bytes], args: Iterable[bytes], nested: Iterable[bytes]) -> None:
        """This process submitted a task: it owns the returns; the task holds its owned arguments until it ends."""
        with self._lock:
            owned = self._owned
            lineage = [a for a in dict.fromkeys(args) if a in owned]
            every = list(dict.fromkeys([*args, *nested]))
            holds = [a for a in every if a in owned]
            lent = [a for a in every if a not in owned]
            for a in lineage:
                owned[a].lineage += 1
            for a in holds:
                owned[a].submitted += 1
            for a in lent:
                self._lent[a] = self._lent.get(a, 0) + 1
            if self._track:
                self._lent_now.update(lent)
            self._tasks[task_id] = _Task(returns, lineage, holds, lent)
            for r in returns:
                owned[r] = _Owned(task_id)

    def add_return(self, task_id: bytes, oid: bytes, *, unreferenced: bool = False) -> None:
        """A generator task of mine yielded ``oid``: I own it like its other returns. ``unreferenced``: no ref
        to it will be made (its generator is gone), so it is freed at the next count."""
        with self._lock:
            t = self._tasks.get(task_id)
            if t is None or oid in self._owned:
                return
            t.returns.append(oid)
            self._owned[oid] = _Owned(task_id)
            if unreferenced:
                self._zero.append(oid)

    def unreferenced(self, oids: Iterable[bytes]) -> None:
        """Owned objects no ref was ever made for and none will be: free them at the next count (unless
        something else holds them)."""
        with self._lock:
            self._zero.extend(o for o in oids if o in self._owned and self._local.get(o, 0) == 0)

    def stored(self, oid: bytes, *, big: bool = False) -> None:
        """An owned value went to the object store (a large return, a small one another process may read)."""
        with self._lock:
            o = self._owned.get(oid)
            if o is not None:
                o.stored = True
                if big and not o.big:
                    o.big = True
                    self._big += 0 if o.freed else 1

    def task_ended(self, task_id: bytes, borrowed: Iterable[bytes] = (), *, actor_id: bytes = b"",
                   borrower: str = "", pin_for_actor: bool = False) -> None:
        """One of my tasks finished (or failed); its holds are released. Its worker may still hold ``borrowed``:
        ``borrower`` names the worker's reference table, which lists them while it holds them; an actor's worker
        holds them at most until the actor dies (:meth:`actor_died`). A borrow that names neither (its worker
        could not publish its table) keeps the object for the life of this process."""
        now = self._clock()
        key = borrower or (f"actor:{actor_id.hex()}" if actor_id else "")
        with self._lock:
            for oid in borrowed:
                o = self._owned.get(oid)
                if o is not None and o.freed:
                    continue
                if not key:
                    self._keep(oid)
                    continue
                self._borrows.setdefault(oid, {})[key] = now
                self._by_key.setdefault(key, set()).add(oid)
                if actor_id:
                    self._actor_keys[actor_id] = key
            t = self._tasks.get(task_id)
            if t is None or t.ended:
                return
            t.ended = now
            if pin_for_actor and actor_id:  # a restartable actor's constructor runs again with these
                pin = f"pin:{actor_id.hex()}"
                for a in dict.fromkeys([*t.holds, *t.lent]):
                    self._borrows.setdefault(a, {})[pin] = now
                    self._by_key.setdefault(pin, set()).add(a)
                self._actor_pins[actor_id] = pin
            self._check_task(task_id)
            for a in t.holds:
                o = self._owned.get(a)
                if o is not None:
                    o.submitted -= 1
                    self._zero.append(a)
            for a in t.lent:
                self._count_down(self._lent, a)
            t.holds = []
            t.lent = []

    def _keep(self, oid: bytes) -> None:
        """A ref to ``oid`` went where no one can follow it: kept for the life of this process."""
        o = self._owned.get(oid)
        if o is not None:
            o.escaped = True
        else:
            self._kept.add(oid)

    def contains(self, container: bytes, inner: Iterable[bytes]) -> None:
        """The value of ``container`` (mine) holds refs to ``inner``: they are held while it lives (those I own
        are not freed, those I do not own are listed in my table)."""
        with self._lock:
            c = self._owned.get(container)
            if c is None or c.freed:
                return
            held = self._containers.setdefault(container, [])
            for i in dict.fromkeys(inner):
                if i == container or i in held:
                    continue
                held.append(i)
                o = self._owned.get(i)
                if o is not None:
                    o.contained += 1
                else:
                    self._inside[i] = self._inside.get(i, 0) + 1
                    self._holds_gone = True  # a new hold: publish the table soon (its lender reads it)
            if not held:
                del self._containers[container]

    def _uncontain(self, container: bytes) -> None:
        """``container`` is gone: the refs its value held are no longer held by it."""
        for i in self._containers.pop(container, ()):
            o = self._owned.get(i)
            if o is not None:
                o.contained -= 1
                self._zero.append(i)
                continue
            self._count_down(self._inside, i)

    def _count_down(self, counts: dict[bytes, int], oid: bytes) -> None:
        """One hold of ``oid`` counted in ``counts`` (tasks it is lent to, my objects holding it) ends."""
        n = counts.get(oid, 0) - 1
        if n > 0:
            counts[oid] = n
        else:
            counts.pop(oid, None)
            self._hold_may_end(oid)

    def lend(self, oids: Iterable[bytes], key: str, *, grace: float = LEND_GRACE_S) -> None:
        """Refs to ``oids`` went, nested in a value, to the process whose reference table is ``key`` (a task's
        submitter, given its return value): it borrows them while its table lists them, read from ``grace``
        seconds from now on (it publishes them meanwhile). Without a key, they are kept for my life."""
        until = self._clock() + grace
        with self._lock:
            for oid in dict.fromkeys(oids):
                o = self._owned.get(oid)
                if o is not None and o.freed:
                    continue
                if not key:
                    self._keep(oid)
                    continue
                b = self._borrows.setdefault(oid, {})
                b[key] = max(b.get(key, until), until)
                self._by_key.setdefault(key, set()).add(oid)
                if self._track and o is None:
                    self._passed.add(oid)

    def _hold_may_end(self, oid: bytes) -> None:
        if oid in self._owned:
            self._zero.append(oid)
        elif oid in self._announced and not self._holds(oid):
            self._holds_gone = True

    def _release(self, oid: bytes, key: str) -> None:
        """``key`` no longer borrows ``oid``."""
        b = self._borrows.get(oid)
        if b is not None:
            b.pop(key, None)
            if not b:
                del self._borrows[oid]
        k = self._by_key.get(key)
        if k is not None:
            k.discard(oid)
            if not k:
                del self._by_key[key]
        self._hold_may_end(oid)

    def borrower_keys(self) -> list[str]:
        """The reference tables to read: of the processes that borrow from me (actors' workers included)."""
        with self._lock:
            return [k for k in self._by_key if not k.startswith(("actor:", "pin:"))]

    def borrowers_checked(self, tables: dict[str, BorrowerTable | None], since: float) -> None:
        """The borrowers' tables, as read after ``since`` (this counter's clock): ``None`` for one that is gone.

        A borrow ends when its borrower's table does not list the object, or when the borrower is dead; a
        borrow reported after ``since`` (or still in its grace, :meth:`lend`) waits for the next read: the
        table read may be older than it. An object its table marks escaped is kept for the life of this
        process. A borrower of an object whose value holds refs, whose table lists one of those refs,
        borrows that ref too (it unpacked the value and kept the ref)."""
        with self._lock:
            for key, table in tables.items():
                if table is not None and table.alive and table.holds:
                    self._unpacked(key, table.holds, since)
                if table is not None and table.lent:  # (from a stale table too: what it lent on outlives it)
                    self._adopt(key, table.lent, since)
                for oid in list(self._by_key.get(key, ())):
                    reported = self._borrows.get(oid, {}).get(key, since)
                    if table is not None and oid in table.escaped:
                        self._keep(oid)
                        self._release(oid, key)
                    elif table is not None and table.alive and (table.holds is None or oid in table.holds):
                        continue
                    elif reported >= since:
                        continue
                    else:
                        self._release(oid, key)

    def _adopt(self, key: str, lent: dict[bytes, frozenset[str]], since: float) -> None:
        """``key`` lent objects it borrows from me on to other tables: those borrow them from me too, so the
        objects stay while they hold them even if ``key`` dies first (its borrowers are handed over)."""
        for oid in list(self._by_key.get(key, ())):
            for other in lent.get(oid, ()):
                if other == key or other == self.me:
                    continue
                b = self._borrows.setdefault(oid, {})
                if other not in b:
                    b[other] = since
                    self._by_key.setdefault(other, set()).add(oid)

    def _unpacked(self, key: str, holds: frozenset[bytes], since: float) -> None:
        """``key`` borrows objects of mine and lists refs their values hold: it borrows those refs too."""
        for oid in list(self._by_key.get(key, ())):
            for inner in self._containers.get(oid, ()):
                if inner in holds:
                    b = self._borrows.setdefault(inner, {})
                    b[key] = max(b.get(key, since), since)
                    self._by_key[key].add(inner)

    def borrowing_actors(self) -> list[bytes]:
        """Actors that keep refs to objects I own or lent on (whose death releases them): in their state, or
        as the arguments their constructor runs again with when they restart."""
        with self._lock:
            for a in [a for a, k in self._actor_keys.items() if k not in self._by_key]:
                del self._actor_keys[a]
            for a in [a for a, k in self._actor_pins.items() if k not in self._by_key]:
                del self._actor_pins[a]
            return list(dict.fromkeys([*self._actor_keys, *self._actor_pins]))

    def actor_died(self, actor_id: bytes) -> None:
        """The actor is dead: the refs its state kept, and its constructor's arguments, are gone with it."""
        with self._lock:
            for key in (self._actor_keys.pop(actor_id, None), self._actor_pins.pop(actor_id, None)):
                if key is not None:
                    for oid in list(self._by_key.get(key, ())):
                        self._release(oid, key)

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
            self._keep(oid)
            if self._track and oid not in self._owned:
                self._passed.add(oid)

    def capture(self) -> _Capture:
        """``with counter.capture() as ids:`` collects the refs serialized meanwhile in this thread."""
        return _Capture(self._capture)

    def borrowed_report(self, to: str = "") -> list[bytes]:
        """A worker, after a task: refs it still holds that arrived while the task ran, lent on, or passed on.
        Not those it holds only because ``to`` (the task's submitter, told of them) borrows them from it."""
        with self._lock:
            self._count_deaths()
            out = [o for o in self._born | self._lent_now | self._passed
                   if o not in self._owned and self._holds(o) and not self._only_lent_to(o, to)]
            self._born.clear()
            self._passed.clear()
            self._lent_now.clear()
            return out

    def _only_lent_to(self, oid: bytes, key: str) -> bool:
        """Whether ``key``'s borrow is all that holds ``oid`` here (then reporting it to ``key`` would make each
        hold it for the other)."""
        b = self._borrows.get(oid)
        if not key or not b or set(b) != {key}:
            return False
        return not (self._local.get(oid, 0) > 0 or oid in self._lent or oid in self._kept or oid in self._inside)

    def _holds(self, oid: bytes) -> bool:
        return (self._local.get(oid, 0) > 0 or oid in self._lent or oid in self._borrows or oid in self._kept
                or oid in self._inside)

    def holds(self) -> tuple[list[bytes], list[bytes]]:
        """What this process's table lists: the objects it does not own and holds, and those of them it passed
        on untracked (escaped)."""
        with self._lock:
            self._count_deaths()
            owned = self._owned
            held = [o for o in dict.fromkeys([*self._local, *self._lent, *self._borrows, *self._kept,
                                              *self._inside]) if o not in owned]
            return held, [o for o in self._kept if o not in owned]

    def lent_on(self, limit: int = 1000) -> dict[bytes, list[str]]:
        """The objects I borrowed and lent on, with the tables that borrow them from me (at most ``limit``
        objects): their owners follow those tables too, so my death does not end their borrows."""
        with self._lock:
            out: dict[bytes, list[str]] = {}
            for oid, b in self._borrows.items():
                if oid in self._owned:
                    continue
                keys = [k for k in b if not k.startswith(("actor:", "pin:"))][:8]
                if keys:
                    out[oid] = keys
                    if len(out) >= limit:
                        break
            return out

    def announced(self, held: Iterable[bytes]) -> None:
        """My table now lists ``held``: when one of them goes, :meth:`holds_gone` says so."""
        with self._lock:
            self._announced = frozenset(held)
            self._holds_gone = False

    def holds_gone(self) -> bool:
        """Whether a hold my published table lists may have ended since (then it is published again soon)."""
        with self._lock:
            self._count_deaths()
            return self._holds_gone

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

    def holds_big(self) -> bool:
        """Whether this process owns an object in an arena that is not freed yet (freeing one makes room)."""
        return self._big > 0

    def process(self, *, records: bool = True) -> FreeBatch:
        """Count queued deaths; what became free (and, with ``records``, the lineage records now droppable)."""
        batch = FreeBatch()
        with self._lock:
            self._count_deaths()
            while self._zero:  # (freeing an object whose value held refs may free those next)
                zero, self._zero = self._zero, []
                for oid in zero:
                    o = self._owned.get(oid)
                    if (o is None or o.freed or o.escaped or oid in self._borrows or o.submitted > 0
                            or o.contained > 0 or self._local.get(oid, 0) > 0):
                        continue
                    self._free(oid, o, batch, force_shared=False)
            if records:
                self._drop_records(batch, force=False)
        return batch

    def _free(self, oid: bytes, o: _Owned, batch: FreeBatch, *, force_shared: bool) -> None:
        o.freed = True
        if o.big:
            self._big -= 1
        if oid in self._containers:
            self._uncontain(oid)
        batch.big = batch.big or o.big
        lent = self._borrows.pop(oid, None)
        for key in lent or ():
            k = self._by_key.get(key)
            if k is not None:
                k.discard(oid)
                if not k:
                    del self._by_key[key]
        if o.escaped or lent or force_shared:
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
                if o.escaped or oid in self._borrows:
                    kinds.append("borrowed")
                if o.contained:
                    kinds.append("contained")
                out.append({"object_id": oid.hex(), "owned": True, "refs": self._local.get(oid, 0),
                            "reference": ",".join(kinds) or "lineage", "stored": o.stored})
            for oid in dict.fromkeys([*self._local, *self._lent, *self._borrows, *self._kept, *self._inside]):
                if oid not in self._owned:
                    out.append({"object_id": oid.hex(), "owned": False, "refs": self._local.get(oid, 0),
                                "reference": "borrowed", "stored": True})
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
