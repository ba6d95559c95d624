"""The object table of one node's store: create, seal, pin, release, delete; spill, restore, evict.

This module is the domain: it validates requests, enforces the object state
machine (created -> sealed <-> spilled) and decides what leaves memory when room
is needed. It knows nothing of gRPC or NATS; changes are announced through the
``on_event`` callback.

Memory management: a sealed object that no session pins is a candidate to leave
the arena, least recently used first. A candidate with a copy on another node
(``has_other_copy``) is evicted (dropped); any other is spilled to a file in the
spill directory and restored into the arena by the next pin. Objects being
written (created, not sealed) and pinned objects never move.

Calls are synchronous and meant for one thread (the service's event loop). A
call that raises leaves the table as it was, except for spills and evictions it
completed while making room, which are valid states of their own.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.common import ids as idc
from tessera.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tessera.object_store.allocator import Allocator
from tessera.object_store.arena import Arena

log = logging.getLogger(__name__)

CREATED = "created"  # allocated in the arena, being written by its creator
SEALED = "sealed"  # immutable and readable, in the arena
SPILLED = "spilled"  # sealed, on local disk only

_PARTIAL = ".partial"
_SPILL_NAME = re.compile(rf"^[0-9a-f]{{{2 * idc.OBJECT_ID_LEN}}}$")
_IO_CHUNK = 1 << 30  # one read/write call moves at most this much (Linux caps a call near 2 GiB)


@dataclass(eq=False, slots=True)
class ObjectEntry:
    """One object of the table. Owned by the manager: read it, never change it."""

    object_id: bytes
    size: int
    state: str  # CREATED | SEALED | SPILLED
    offset: int | None  # in the arena; None when spilled
    owner: str
    pins: dict[str, int] = field(default_factory=dict)  # session id -> pin count
    last_access: float = 0.0
    spill_path: Path | None = None
    creator: str | None = None  # the session writing a created object, if known
    durable: bool = False  # its file in the spill directory is kept while it is in the arena too
    doomed: bool = False  # freed while pinned or being written: deleted once unpinned (sealed)

    @property
    def pin_count(self) -> int:
        return sum(self.pins.values())


def _noop_event(kind: str, entry: ObjectEntry) -> None:
    pass


class ObjectManager:
    """The object table over one arena, with spilling to ``spill_dir`` (at most ``spill_capacity`` bytes).

    ``on_event(kind, entry)`` is called after each change is complete, with kind
    one of ``sealed``, ``aborted``, ``deleted``, ``evicted``, ``spilled``,
    ``restored`` and ``lost`` (a spill file could not be read back). It should not
    raise; if it does, the error is logged and the call goes on.

    ``spill_dir`` belongs to the manager. A spill file is written under a
    temporary name and renamed when complete, so files named like an object id
    (40 hex digits) are whole objects: those left by an earlier run of this node
    are adopted at start as spilled objects (they survive a crash of the store);
    half-written ones are removed. A *durable* object (sealed with ``durable=True``)
    has that file written at its seal and kept while it is in the arena as well, so
    it survives a crash of the store even when it never had to be spilled; adopted
    objects stay durable. Durable files count in ``durable_bytes``, not against the
    spill capacity.
    """

    def __init__(self, arena: Arena, *, spill_dir: Path, spill_capacity: int,
                 has_other_copy: Callable[[bytes], bool] = lambda oid: False,
                 on_event: Callable[[str, ObjectEntry], None] = _noop_event,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if spill_capacity < 0:
            raise InvalidArgumentError(f"spill_capacity must be >= 0, got {spill_capacity}")
        if not arena.writable:
            raise InvalidArgumentError(f"arena {arena.path} is mapped read-only")
        self.arena = arena
        self.alloc = Allocator(arena.size)
        self.capacity = self.alloc.capacity
        self.spill_dir = Path(spill_dir)
        self.spill_capacity = spill_capacity
        self.has_other_copy = has_other_copy
        self.on_event = on_event
        self.clock = clock
        self._objects: dict[bytes, ObjectEntry] = {}
        # sealed, in the arena, unpinned: the candidates to leave memory, least recently used first
        self._lru: OrderedDict[bytes, ObjectEntry] = OrderedDict()
        # session -> object ids it pins / is writing (dicts as ordered sets: a deterministic order)
        self._session_pins: dict[str, dict[bytes, None]] = {}
        self._session_creates: dict[str, dict[bytes, None]] = {}
        self._pinned_bytes = 0
        self._created_bytes = 0
        self._spilled_bytes = 0
        self._spilled_objects = 0
        self._durable_bytes = 0
        self.evictions = 0
        self.spills = 0
        self.restores = 0
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.spill_dir.iterdir()):
            if p.name.endswith(_PARTIAL) and p.is_file():
                p.unlink(missing_ok=True)
            elif _SPILL_NAME.match(p.name) and p.is_file():
                self._adopt(p)

    def _adopt(self, path: Path) -> None:
        size = path.stat().st_size
        if size <= 0:
            path.unlink(missing_ok=True)
            return
        oid = bytes.fromhex(path.name)
        e = ObjectEntry(oid, size, SPILLED, None, "", last_access=self.clock(), spill_path=path, durable=True)
        self._objects[oid] = e
        self._spilled_objects += 1
        self._durable_bytes += size

    # ================================================================= writes

    def create(self, object_id: bytes, size: int, owner: str, *, session: str | None = None) -> int:
        """Allocate ``size`` bytes for a new object and return its arena offset; the caller writes, then seals.

        ``session`` names the creating session: when it ends
        (:meth:`release_session`) an object it left unsealed is aborted.
        """
        idc.check_id("object_id", object_id)
        if size <= 0:
            raise InvalidArgumentError(f"object size must be > 0, got {size}")
        if size > self.capacity:
            raise ResourceExhaustedError(
                f"object of {size} bytes is larger than the store's capacity of {self.capacity} bytes")
        old = self._objects.get(object_id)
        if old is not None:
            raise AlreadyExistsError(f"object {object_id.hex()} already exists ({old.state})")
        offset = self._allocate(size)
        e = ObjectEntry(object_id, size, CREATED, offset, owner, last_access=self.clock(), creator=session)
        self._objects[object_id] = e
        self._created_bytes += size
        if session is not None:
            self._session_creates.setdefault(session, {})[object_id] = None
        return offset

    def put_inline(self, object_id: bytes, data: bytes | bytearray | memoryview, owner: str, *,
                   durable: bool = False) -> ObjectEntry:
        """Create, copy ``data`` in and seal: a whole small object in one call."""
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        self.create(object_id, mv.nbytes, owner)
        e = self._objects[object_id]
        assert e.offset is not None
        try:
            with self.arena.view(e.offset, e.size) as dst:
                dst[:] = mv
            return self.seal(object_id, durable=durable)
        except BaseException:
            self.abort(object_id)
            raise

    def seal(self, object_id: bytes, *, durable: bool = False) -> ObjectEntry:
        """Make a created object immutable and readable; ``durable``: also write it to disk first."""
        e = self._get(object_id)
        if e.state != CREATED:
            raise FailedPreconditionError(f"object {object_id.hex()} is already sealed")
        if durable:
            assert e.offset is not None
            e.spill_path = self._write_file(e.object_id, e.offset, e.size, what="keep")
            e.durable = True
            self._durable_bytes += e.size
        e.state = SEALED
        e.last_access = self.clock()
        self._created_bytes -= e.size
        self._forget_creator(e)
        self._lru[object_id] = e
        self._emit("sealed", e)
        if e.doomed:  # freed while it was being written: nothing can read it
            self.delete(object_id)
        return e

    def abort(self, object_id: bytes) -> None:
        """Drop an object that was created and not sealed, freeing its space."""
        e = self._get(object_id)
        if e.state != CREATED:
            raise FailedPreconditionError(f"object {object_id.hex()} is sealed; it can only be deleted")
        assert e.offset is not None
        self.alloc.free(e.offset, e.size)
        self._created_bytes -= e.size
        self._forget_creator(e)
        del self._objects[object_id]
        self._emit("aborted", e)

    def delete(self, object_id: bytes) -> bool:
        """Drop a sealed or spilled object; False if there is none. Refused while pinned or being written."""
        idc.check_id("object_id", object_id)
        e = self._objects.get(object_id)
        if e is None:
            return False
        if e.pins:
            raise FailedPreconditionError(
                f"object {object_id.hex()} is pinned {e.pin_count} time(s) by {len(e.pins)} session(s)")
        if e.state == CREATED:
            raise FailedPreconditionError(f"object {object_id.hex()} is being written; abort it instead")
        if e.state == SEALED:
            assert e.offset is not None
            self.alloc.free(e.offset, e.size)
            del self._lru[object_id]
        self._drop_spill_file(e)
        del self._objects[object_id]
        self._emit("deleted", e)
        return True

    def free(self, object_id: bytes) -> bool:
        """Reference counting freed the object: drop it now, or once its last pin is released (once sealed,
        if being written). True if it was dropped now. Unknown objects and repeated frees change nothing."""
        idc.check_id("object_id", object_id)
        e = self._objects.get(object_id)
        if e is None:
            return False
        if e.pins or e.state == CREATED:
            e.doomed = True
            return False
        return self.delete(object_id)

    # ================================================================== reads

    def pin(self, object_id: bytes, session: str) -> ObjectEntry:
        """Pin a sealed object for ``session`` (a get), restoring it into the arena first if spilled.

        While pinned the object stays at ``entry.offset``. An object not sealed
        yet raises FailedPreconditionError: wait for its ``sealed`` event and retry.
        """
        if not session:
            raise InvalidArgumentError("session is required to pin an object")
        e = self._get(object_id)
        if e.state == CREATED:
            raise FailedPreconditionError(f"object {object_id.hex()} is not sealed yet")
        if e.state == SPILLED:
            self._restore(e)
        elif not e.pins:
            del self._lru[object_id]
        if not e.pins:
            self._pinned_bytes += e.size
        e.pins[session] = e.pins.get(session, 0) + 1
        e.last_access = self.clock()
        self._session_pins.setdefault(session, {})[object_id] = None
        return e

    def release(self, object_id: bytes, session: str) -> bool:
        """Drop one pin of ``session`` on the object; False if the session holds none (or the object is unknown)."""
        idc.check_id("object_id", object_id)
        e = self._objects.get(object_id)
        if e is None or session not in e.pins:
            return False
        n = e.pins[session] - 1
        if n:
            e.pins[session] = n
        else:
            del e.pins[session]
            self._forget_pin(session, object_id)
            if not e.pins:
                self._unpinned(e)
        return True

    def release_session(self, session: str) -> int:
        """A session ended: drop all its pins and abort the objects it created and left unsealed.

        Returns the number of pins dropped.
        """
        dropped = 0
        for oid in self._session_pins.pop(session, ()):
            e = self._objects[oid]
            dropped += e.pins.pop(session)
            if not e.pins:
                self._unpinned(e)
        for oid in list(self._session_creates.get(session, ())):
            self.abort(oid)
        return dropped

    def contains(self, object_id: bytes) -> bool:
        """Whether the object is here and readable (sealed, in the arena or spilled)."""
        idc.check_id("object_id", object_id)
        e = self._objects.get(object_id)
        return e is not None and e.state != CREATED

    def is_spilled(self, object_id: bytes) -> bool:
        """Whether the object is here on disk only (spilled; a pin restores it)."""
        e = self._objects.get(object_id)
        return e is not None and e.state == SPILLED

    def get_entry(self, object_id: bytes) -> ObjectEntry | None:
        return self._objects.get(object_id)

    def stats(self) -> dict[str, int]:
        """Counters named as in GetStatsResponse (byte counts of the arena are of aligned blocks)."""
        return {
            "capacity": self.capacity,
            "used": self.alloc.used_bytes,
            "pinned": self._pinned_bytes,
            "created": self._created_bytes,
            "spilled_bytes": self._spilled_bytes,
            "spill_capacity": self.spill_capacity,
            "objects": len(self._objects),
            "spilled_objects": self._spilled_objects,
            "evictions": self.evictions,
            "spills": self.spills,
            "restores": self.restores,
        }

    def close(self) -> None:
        """Remove every spill file (the table lives in memory only; the files mean nothing without it)."""
        for e in list(self._objects.values()):
            if e.state == SPILLED and e.spill_path is not None and not e.durable:
                e.spill_path.unlink(missing_ok=True)

    # ======================================================== memory management

    def _allocate(self, size: int, spill_credit: int = 0) -> int:
        offset = self.alloc.allocate(size)
        if offset is None:
            self._make_room(size, spill_credit)
            offset = self.alloc.allocate(size)
            assert offset is not None, "made room but the allocation failed"
        return offset

    def _make_room(self, size: int, spill_credit: int = 0) -> None:
        """Evict or spill candidates until a hole of ``size`` bytes exists.

        The whole plan is made before anything moves, so a request that cannot be
        met raises ResourceExhaustedError having moved nothing. ``spill_credit``:
        spill bytes about to be freed (a restore swaps its own file for others), so
        the spill space may exceed its capacity by that much until the restore
        completes.
        """
        for e, evict in self._plan(size, spill_credit):
            if evict:
                self._evict(e)
            else:
                self._spill(e)

    def _plan(self, size: int, spill_credit: int) -> list[tuple[ObjectEntry, bool]]:
        """Least recently used candidates first, until a hole fits (simulated on a copy of the allocator).

        When that fails (fragmentation, or spill space spent on candidates that
        did not help), the cheapest contiguous window of candidates and holes is
        looked for instead.
        """
        sim = self.alloc.copy()
        spill_left = self.spill_capacity - self._spilled_bytes + spill_credit
        budget = spill_left
        other: dict[bytes, bool] = {}
        plan: list[tuple[ObjectEntry, bool]] = []
        for oid, e in self._lru.items():
            evict = other[oid] = not e.durable and self.has_other_copy(oid)  # a durable one keeps its file
            if not evict and not e.durable:  # a durable one is on disk already: spilling it costs nothing
                if e.size > spill_left:
                    continue
                spill_left -= e.size
            plan.append((e, evict))
            assert e.offset is not None
            sim.free(e.offset, e.size)
            if sim.can_fit(size):
                return plan
        window = self._plan_window(self.alloc.round(size), budget, other)
        if window is not None:
            return window
        raise ResourceExhaustedError(
            f"cannot make room for an object of {size} bytes: {self._pinned_bytes} bytes are pinned and "
            f"{self._created_bytes} bytes are being written, of a capacity of {self.capacity} bytes "
            f"(largest free block {sim.largest_hole} bytes); spill space used {self._spilled_bytes} of "
            f"{self.spill_capacity} bytes")

    def _plan_window(self, need: int, budget: int,
                     other: dict[bytes, bool]) -> list[tuple[ObjectEntry, bool]] | None:
        """The candidates overlapping the window of ``need`` bytes that costs the fewest spill bytes (<= budget).

        A window lies between two immovable objects (pinned or being written); it
        may start at a segment's start or at a candidate's start or end. O(objects).
        """
        rnd = self.alloc.round
        blocks = sorted((e for e in self._objects.values() if e.offset is not None),
                        key=lambda e: e.offset)  # type: ignore[arg-type,return-value]
        best: tuple[int, list[ObjectEntry]] | None = None
        seg_start, movable = 0, []
        for e in [*blocks, None]:
            if e is not None and e.object_id in self._lru:
                movable.append(e)
                continue
            seg_end = self.capacity if e is None else e.offset
            assert seg_end is not None
            if seg_end - seg_start >= need:
                found = self._cheapest_window(seg_start, seg_end, need, movable, budget, other)
                if found is not None and (best is None or found[0] < best[0]):
                    best = found
            if e is not None:
                assert e.offset is not None
                seg_start, movable = e.offset + rnd(e.size), []
        if best is None:
            return None
        return [(e, other[e.object_id]) for e in best[1]]

    def _cheapest_window(self, seg_start: int, seg_end: int, need: int, objs: list[ObjectEntry], budget: int,
                         other: dict[bytes, bool]) -> tuple[int, list[ObjectEntry]] | None:
        rnd = self.alloc.round
        offs = [e.offset or 0 for e in objs]
        ends = [o + rnd(e.size) for o, e in zip(offs, objs, strict=True)]
        cost = []
        for e in objs:
            if e.object_id not in other:
                other[e.object_id] = not e.durable and self.has_other_copy(e.object_id)
            cost.append(0 if other[e.object_id] or e.durable else e.size)
        best: tuple[int, int, int] | None = None  # (cost, lo, hi)
        lo = hi = run = 0
        for b in sorted({seg_start, *offs, *ends}):
            if b + need > seg_end:
                break
            while hi < len(objs) and offs[hi] < b + need:
                run += cost[hi]
                hi += 1
            while lo < hi and ends[lo] <= b:
                run -= cost[lo]
                lo += 1
            if run <= budget and (best is None or run < best[0]):
                best = (run, lo, hi)
                if run == 0:
                    break
        if best is None:
            return None
        return best[0], objs[best[1]:best[2]]

    def _evict(self, e: ObjectEntry) -> None:
        assert e.offset is not None
        self.alloc.free(e.offset, e.size)
        del self._lru[e.object_id]
        del self._objects[e.object_id]
        self.evictions += 1
        self._emit("evicted", e)

    def _write_file(self, object_id: bytes, offset: int, size: int, *, what: str) -> Path:
        """Write an object's bytes to its file in the spill directory (whole, or not at all)."""
        path = self.spill_dir / object_id.hex()
        partial = path.with_name(path.name + _PARTIAL)
        try:
            with self.arena.view(offset, size) as src, open(partial, "wb", buffering=0) as f:
                for i in range(0, size, _IO_CHUNK):
                    chunk = src[i:i + _IO_CHUNK]
                    done = 0
                    while done < len(chunk):
                        done += f.write(chunk[done:]) or 0
            os.replace(partial, path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise ResourceExhaustedError(
                f"cannot {what} object {object_id.hex()} of {size} bytes to {path}: {err}") from err
        return path

    def _spill(self, e: ObjectEntry) -> None:
        assert e.offset is not None
        if e.durable:  # its file is there already
            path = e.spill_path
        else:
            path = self._write_file(e.object_id, e.offset, e.size, what="spill")
            self._spilled_bytes += e.size
        self.alloc.free(e.offset, e.size)
        del self._lru[e.object_id]
        e.state, e.offset, e.spill_path = SPILLED, None, path
        self._spilled_objects += 1
        self.spills += 1
        self._emit("spilled", e)

    def _restore(self, e: ObjectEntry) -> None:
        assert e.spill_path is not None
        offset = self._allocate(e.size, spill_credit=e.size)
        try:
            with self.arena.view(offset, e.size) as dst, open(e.spill_path, "rb", buffering=0) as f:
                done = 0
                while done < e.size:
                    n = f.readinto(dst[done:done + _IO_CHUNK])
                    if not n:
                        raise OSError(f"the file ends after {done} bytes")
                    done += n
                if f.read(1):
                    raise OSError("the file is longer than the object")
        except OSError as err:
            self.alloc.free(offset, e.size)
            path = e.spill_path
            self._drop_spill_file(e)
            del self._objects[e.object_id]
            self._emit("lost", e)
            raise NotFoundError(f"object {e.object_id.hex()} is lost: its spill file {path} could not be "
                                f"read ({err})") from err
        if e.durable:  # the file stays: it is what survives a crash
            self._spilled_objects -= 1
        else:
            self._drop_spill_file(e)
        e.state, e.offset = SEALED, offset  # the caller pins it at once (not a candidate in between)
        self.restores += 1
        self._emit("restored", e)

    # ================================================================ helpers

    def _get(self, object_id: bytes) -> ObjectEntry:
        idc.check_id("object_id", object_id)
        e = self._objects.get(object_id)
        if e is None:
            raise NotFoundError(f"object {object_id.hex()} not found")
        return e

    def _unpinned(self, e: ObjectEntry) -> None:
        self._pinned_bytes -= e.size
        e.last_access = self.clock()
        self._lru[e.object_id] = e
        if e.doomed:  # freed while viewed: its last view is gone
            self.delete(e.object_id)

    def _forget_pin(self, session: str, object_id: bytes) -> None:
        oids = self._session_pins.get(session)
        if oids is not None:
            oids.pop(object_id, None)
            if not oids:
                del self._session_pins[session]

    def _forget_creator(self, e: ObjectEntry) -> None:
        if e.creator is None:
            return
        oids = self._session_creates.get(e.creator)
        if oids is not None:
            oids.pop(e.object_id, None)
            if not oids:
                del self._session_creates[e.creator]

    def _drop_spill_file(self, e: ObjectEntry) -> None:
        """Remove the object's file (if any) and its share of the spill counters."""
        if e.spill_path is not None:
            try:
                os.unlink(e.spill_path)
            except FileNotFoundError:
                pass
            e.spill_path = None
        if e.durable:
            self._durable_bytes -= e.size
            e.durable = False
        elif e.state == SPILLED:
            self._spilled_bytes -= e.size
        if e.state == SPILLED:
            self._spilled_objects -= 1

    def _emit(self, kind: str, e: ObjectEntry) -> None:
        try:
            self.on_event(kind, e)
        except Exception:
            log.exception("object event handler failed on %s of %s", kind, e.object_id.hex())

    def _verify(self) -> dict[str, Any]:
        """Check the table's invariants (O(objects)); raises AssertionError on the first broken one."""
        used = pinned = created = spilled = nspilled = durable = 0
        blocks = []
        for oid, e in self._objects.items():
            assert oid == e.object_id
            assert all(c > 0 for c in e.pins.values()), e
            if e.durable:
                assert e.spill_path is not None and e.spill_path.stat().st_size == e.size, e
                durable += e.size
            if e.state == SPILLED:
                assert e.offset is None and e.spill_path is not None and not e.pins, e
                assert e.spill_path.stat().st_size == e.size, e
                spilled += 0 if e.durable else e.size
                nspilled += 1
            else:
                assert e.offset is not None and (e.spill_path is None) == (not e.durable), e
                blocks.append((e.offset, self.alloc.round(e.size)))
                used += self.alloc.round(e.size)
                if e.state == CREATED:
                    assert not e.pins, e
                    created += e.size
            if e.pins:
                pinned += e.size
            assert (oid in self._lru) == (e.state == SEALED and not e.pins), e
        assert len(self._lru) == sum(1 for e in self._objects.values() if e.state == SEALED and not e.pins)
        lru_times = [e.last_access for e in self._lru.values()]
        assert lru_times == sorted(lru_times), "LRU order does not follow last access"
        blocks.sort()
        for (a, n), (b, _) in zip(blocks, blocks[1:], strict=False):
            assert a + n <= b, "two objects overlap in the arena"
        assert used == self.alloc.used_bytes, (used, self.alloc.used_bytes)
        assert (pinned, created, spilled, nspilled, durable) == (
            self._pinned_bytes, self._created_bytes, self._spilled_bytes, self._spilled_objects, self._durable_bytes)
        for session, oids in self._session_pins.items():
            for oid in oids:
                assert session in self._objects[oid].pins
        assert sum(len(e.pins) for e in self._objects.values()) == sum(map(len, self._session_pins.values()))
        return {"blocks": blocks}
