from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tessera.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tessera.object_store.arena import Arena
from tessera.object_store.manager import CREATED, SEALED, SPILLED, ObjectEntry, ObjectManager

KIB = 1024
SLOT = 8 * KIB


def oid(i: int) -> bytes:
    return b"\xab" * 16 + i.to_bytes(4, "big")


def payload(i: int, size: int = SLOT) -> bytes:
    return random.Random(i).randbytes(size)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


class Store:
    """A manager over a real arena file, with the events it announced."""

    def __init__(self, tmp: Path, arena_size: int, spill_capacity: int,
                 has_other_copy: Callable[[bytes], bool] = lambda o: False) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.arena = Arena(tmp / "arena", arena_size)
        self.spill_dir = tmp / "spill"
        self.m = ObjectManager(self.arena, spill_dir=self.spill_dir, spill_capacity=spill_capacity,
                               has_other_copy=has_other_copy, on_event=self._on_event, clock=Clock())

    def _on_event(self, kind: str, e: ObjectEntry) -> None:
        self.events.append((kind, e.object_id))

    def kinds(self, kind: str) -> list[bytes]:
        return [o for k, o in self.events if k == kind]

    def put(self, i: int, size: int = SLOT) -> ObjectEntry:
        e = self.m.put_inline(oid(i), payload(i, size), "owner-1")
        self.m._verify()
        return e

    def read(self, i: int, session: str = "reader") -> bytes:
        e = self.m.pin(oid(i), session)
        assert e.offset is not None and e.offset % 64 == 0
        data = bytes(self.arena.view(e.offset, e.size))
        assert self.m.release(oid(i), session)
        self.m._verify()
        return data

    def close(self) -> None:
        self.m.close()
        self.arena.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    made: list[Store] = []

    def make(arena_size: int = 8 * SLOT, spill_capacity: int = 1 << 20, **kw: object) -> Store:
        root = tmp_path / f"s{len(made)}"
        root.mkdir()
        s = Store(root, arena_size, spill_capacity, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ------------------------------------------------------------------ lifecycle


def test_create_write_seal_pin_release(store: Callable[..., Store]) -> None:
    s = store()
    m = s.m
    off = m.create(oid(1), 1000, "owner-1", session="writer")
    assert off % 64 == 0
    e = m.get_entry(oid(1))
    assert e is not None and e.state == CREATED and e.offset == off and e.owner == "owner-1"
    assert not m.contains(oid(1))
    with pytest.raises(FailedPreconditionError, match="not sealed yet"):
        m.pin(oid(1), "reader")
    s.arena.view(off, 1000)[:] = payload(1, 1000)
    assert m.stats()["created"] == 1000
    sealed = m.seal(oid(1))
    assert sealed is e and e.state == SEALED and s.events == [("sealed", oid(1))]
    assert m.contains(oid(1))
    p = m.pin(oid(1), "reader")
    assert p.pins == {"reader": 1} and p.pin_count == 1
    m.pin(oid(1), "reader")
    m.pin(oid(1), "other")
    assert p.pins == {"reader": 2, "other": 1}
    assert bytes(s.arena.view(p.offset or 0, p.size)) == payload(1, 1000)
    st = m.stats()
    assert st["pinned"] == 1000 and st["used"] == 1024 and st["objects"] == 1 and st["created"] == 0
    m._verify()
    assert m.release(oid(1), "reader") and m.release(oid(1), "reader") and m.release(oid(1), "other")
    assert not m.release(oid(1), "reader")  # holds none any more
    assert not m.release(oid(2), "reader")  # unknown object
    assert p.pins == {} and m.stats()["pinned"] == 0
    m._verify()


def test_double_seal(store: Callable[..., Store]) -> None:
    s = store()
    s.put(1)
    with pytest.raises(FailedPreconditionError, match=f"object {oid(1).hex()} is already sealed"):
        s.m.seal(oid(1))


def test_abort(store: Callable[..., Store]) -> None:
    s = store()
    m = s.m
    m.create(oid(1), SLOT, "o")
    assert m.stats()["used"] == SLOT
    m.abort(oid(1))
    assert m.get_entry(oid(1)) is None and m.stats()["used"] == 0 and m.stats()["created"] == 0
    assert s.kinds("aborted") == [oid(1)]
    with pytest.raises(NotFoundError):
        m.abort(oid(1))
    with pytest.raises(NotFoundError):
        m.pin(oid(1), "r")
    s.put(2)
    with pytest.raises(FailedPreconditionError, match="sealed"):
        m.abort(oid(2))
    m.create(oid(1), SLOT, "o")  # the id is free again
    m._verify()


def test_unknown_and_malformed_ids(store: Callable[..., Store]) -> None:
    m = store().m
    for call in (m.seal, m.abort, lambda o: m.pin(o, "r")):
        with pytest.raises(NotFoundError, match=f"object {oid(9).hex()} not found"):
            call(oid(9))
    assert m.delete(oid(9)) is False
    assert m.contains(oid(9)) is False
    assert m.get_entry(oid(9)) is None
    bad = b"short"
    for call in (m.seal, m.abort, m.delete, m.contains, lambda o: m.pin(o, "r"), lambda o: m.release(o, "r"),
                 lambda o: m.create(o, 10, "o"), lambda o: m.put_inline(o, b"x", "o")):
        with pytest.raises(InvalidArgumentError, match="object_id must be 20 bytes, got 5 bytes"):
            call(bad)
    with pytest.raises(InvalidArgumentError, match="session"):
        m.pin(oid(9), "")


def test_sizes_and_duplicates(store: Callable[..., Store]) -> None:
    s = store(arena_size=8 * SLOT)
    m = s.m
    with pytest.raises(InvalidArgumentError, match="size must be > 0"):
        m.create(oid(1), 0, "o")
    with pytest.raises(InvalidArgumentError):
        m.put_inline(oid(1), b"", "o")
    with pytest.raises(ResourceExhaustedError,
                       match=f"object of {8 * SLOT + 1} bytes is larger than the store's capacity of {8 * SLOT} bytes"):
        m.create(oid(1), 8 * SLOT + 1, "o")
    assert m.create(oid(1), 8 * SLOT, "o") == 0  # exactly the capacity fits
    with pytest.raises(AlreadyExistsError, match="already exists \\(created\\)"):
        m.create(oid(1), 10, "o")
    m.abort(oid(1))
    s.put(1)
    with pytest.raises(AlreadyExistsError, match="sealed"):
        m.put_inline(oid(1), b"x", "o")
    s.put(2, 8 * SLOT - SLOT)
    s.put(3)  # spills 1
    assert m.get_entry(oid(1)).state == SPILLED  # type: ignore[union-attr]
    with pytest.raises(AlreadyExistsError, match="spilled"):
        m.create(oid(1), 10, "o")
    m._verify()


def test_put_inline_of_typed_buffers(store: Callable[..., Store]) -> None:
    s = store()
    arr = np.arange(100, dtype=np.float64)
    e = s.m.put_inline(oid(1), memoryview(arr), "o")
    assert e.size == 800
    got = np.frombuffer(s.arena.view(e.offset or 0, e.size), dtype=np.float64)
    assert (got == arr).all()
    del got
    e2 = s.m.put_inline(oid(2), bytearray(b"abc"), "o")
    assert bytes(s.arena.view(e2.offset or 0, 3)) == b"abc"


# ------------------------------------------------------------ spill and restore


def test_spill_and_restore_byte_for_byte(store: Callable[..., Store]) -> None:
    s = store(arena_size=8 * SLOT, spill_capacity=64 * SLOT)
    m = s.m
    n = 24
    for i in range(n):
        s.put(i)
    st = m.stats()
    assert st["spills"] == n - 8 and st["spilled_objects"] == n - 8 and st["spilled_bytes"] == (n - 8) * SLOT
    assert st["evictions"] == 0 and st["objects"] == n
    assert s.kinds("spilled") == [oid(i) for i in range(n - 8)]  # least recently used first
    spilled = sorted(p.name for p in s.spill_dir.iterdir())
    assert spilled == sorted(oid(i).hex() for i in range(n - 8))
    for i in range(n):
        assert m.contains(oid(i))
    for i in reversed(range(n)):  # every read of a spilled object restores it (and spills another)
        assert s.read(i) == payload(i), f"object {i} changed"
    assert m.stats()["restores"] >= n - 8
    assert len(s.kinds("restored")) == m.stats()["restores"]
    for i in range(n):
        assert s.read(i) == payload(i)
    assert sum(1 for _ in s.spill_dir.iterdir()) == m.stats()["spilled_objects"] == n - 8


def test_pinned_objects_never_leave(store: Callable[..., Store]) -> None:
    s = store(arena_size=8 * SLOT, spill_capacity=64 * SLOT, has_other_copy=lambda o: True)
    m = s.m
    pinned = {}
    for i in range(4):
        e = s.put(i)
        m.pin(oid(i), "holder")
        pinned[i] = e.offset
    m.create(oid(50), SLOT, "o")  # being written: never moves either
    for i in range(4, 40):
        s.put(i)
    for i in range(4):
        e = m.get_entry(oid(i))
        assert e is not None and e.state == SEALED and e.offset == pinned[i]
        assert bytes(s.arena.view(e.offset, e.size)) == payload(i)
    assert m.get_entry(oid(50)).state == CREATED  # type: ignore[union-attr]
    assert oid(50) not in s.kinds("evicted") and not set(map(oid, range(4))) & set(s.kinds("evicted"))
    assert m.stats()["spills"] == 0  # every candidate had another copy
    m._verify()


def test_evicted_when_another_copy_exists(store: Callable[..., Store]) -> None:
    elsewhere = {oid(i) for i in range(0, 20, 2)}
    s = store(arena_size=8 * SLOT, spill_capacity=64 * SLOT, has_other_copy=elsewhere.__contains__)
    m = s.m
    for i in range(20):
        s.put(i)
    evicted, spilled = set(s.kinds("evicted")), set(s.kinds("spilled"))
    assert evicted and evicted <= elsewhere
    assert spilled and not spilled & elsewhere
    for o in evicted:
        assert m.get_entry(o) is None and not m.contains(o)
    for o in spilled:
        assert m.get_entry(o).state == SPILLED  # type: ignore[union-attr]
    assert m.stats()["evictions"] == len(evicted) and m.stats()["spills"] == len(spilled)
    assert len(evicted) + len(spilled) == 12


def test_resource_exhausted_only_beyond_pins_and_spill_space(store: Callable[..., Store]) -> None:
    s = store(arena_size=8 * SLOT, spill_capacity=2 * SLOT)
    m = s.m
    for i in range(5):
        s.put(i)
        m.pin(oid(i), "holder")
    for i in range(5, 8):
        s.put(i)  # the arena is full now
    assert m.alloc.free_bytes == 0
    s.put(8)  # spills 5
    s.put(9)  # spills 6: the spill space is full
    assert m.stats()["spilled_bytes"] == 2 * SLOT
    before = m.stats()
    with pytest.raises(ResourceExhaustedError) as err:
        m.put_inline(oid(10), payload(10), "o")
    msg = str(err.value)
    assert f"{SLOT} bytes" in msg and f"{5 * SLOT} bytes are pinned" in msg
    assert f"capacity of {8 * SLOT} bytes" in msg and f"spill space used {2 * SLOT} of {2 * SLOT} bytes" in msg
    assert m.stats() == before and m.get_entry(oid(10)) is None  # nothing moved
    m._verify()
    m.release(oid(0), "holder")  # unpinned, but there is no spill space for it
    with pytest.raises(ResourceExhaustedError):
        m.create(oid(10), SLOT, "o")
    assert m.delete(oid(5))  # a spilled object: frees spill space
    assert not (s.spill_dir / oid(5).hex()).exists()
    s.put(10)
    assert m.stats()["spilled_bytes"] == 2 * SLOT
    m._verify()


def test_resource_exhausted_by_pins_alone(store: Callable[..., Store]) -> None:
    s = store(arena_size=8 * SLOT, spill_capacity=1 << 30)
    m = s.m
    for i in range(7):
        s.put(i)
        m.pin(oid(i), "holder")
    s.put(7)
    with pytest.raises(ResourceExhaustedError, match=f"{7 * SLOT} bytes are pinned"):
        m.create(oid(8), 2 * SLOT, "o")  # 7 pinned slots + 2 > 8
    assert m.stats()["spills"] == 0
    m.create(oid(8), SLOT, "o")  # 7 pinned + 1 fits: spills object 7
    assert m.get_entry(oid(7)).state == SPILLED  # type: ignore[union-attr]


def test_fragmentation_plans_before_moving(store: Callable[..., Store]) -> None:
    s = store(arena_size=4 * SLOT, spill_capacity=1 << 20)
    m = s.m
    for i in range(4):
        s.put(i)
    m.pin(oid(1), "h")
    m.pin(oid(3), "h")
    # 2 slots are unpinned but no two adjacent: no hole of 2 slots can be made
    with pytest.raises(ResourceExhaustedError, match="largest free block"):
        m.create(oid(9), 2 * SLOT, "o")
    assert m.stats()["spills"] == 0 and s.kinds("spilled") == []  # nothing was moved for nothing
    m.release(oid(3), "h")
    # now objects 2 and 3 (adjacent) can leave; LRU is 0, 2, 3: 0 goes first, then 2, then 3 makes the hole
    off = m.create(oid(9), 2 * SLOT, "o")
    assert off == 2 * SLOT
    assert s.kinds("spilled") == [oid(0), oid(2), oid(3)]
    m._verify()


def test_fragmentation_keeps_evicting_until_a_hole_fits(store: Callable[..., Store]) -> None:
    s = store(arena_size=4 * SLOT, spill_capacity=1 << 20)
    m = s.m
    for i in range(4):
        s.put(i)
    m.pin(oid(2), "h")
    # LRU 0, 1, 3: after 0 there are 8 KiB free but no 16 KiB hole; 1 completes [0, 16K)
    assert m.create(oid(9), 2 * SLOT, "o") == 0
    assert s.kinds("spilled") == [oid(0), oid(1)]
    assert m.get_entry(oid(3)).state == SEALED  # type: ignore[union-attr]


def test_window_when_lru_order_cannot_make_a_hole(store: Callable[..., Store]) -> None:
    s = store(arena_size=4 * SLOT, spill_capacity=2 * SLOT)
    m = s.m
    for i in range(4):
        s.put(i)
    m.pin(oid(1), "h")
    # in LRU order (0, 2, 3) the spill space goes to 0 and 2 without giving a hole of two slots;
    # the window [2, 4) (objects 2 and 3) fits the spill space
    assert m.create(oid(9), 2 * SLOT, "o") == 2 * SLOT
    assert s.kinds("spilled") == [oid(2), oid(3)]
    assert m.get_entry(oid(0)).state == SEALED  # type: ignore[union-attr]
    m._verify()


def test_unspillable_candidates_are_passed_over(store: Callable[..., Store]) -> None:
    s = store(arena_size=5 * SLOT, spill_capacity=0, has_other_copy=lambda o: o in {oid(3), oid(4)})
    m = s.m
    for i in range(5):
        s.put(i)
    m.pin(oid(2), "h")
    # LRU order 0, 1, 3, 4: 0 and 1 cannot be spilled (no spill space), 3 and 4 are evicted
    assert m.create(oid(9), 2 * SLOT, "o") == 3 * SLOT
    assert s.kinds("evicted") == [oid(3), oid(4)] and s.kinds("spilled") == []


def test_lru_order(store: Callable[..., Store]) -> None:
    s = store(arena_size=3 * SLOT, spill_capacity=1 << 20)
    m = s.m
    for i in range(3):  # a=0, b=1, c=2
        s.put(i)
    assert s.read(0) == payload(0)  # touch a: b is now the least recently used
    s.put(3)
    assert s.kinds("spilled") == [oid(1)]
    s.put(4)
    assert s.kinds("spilled") == [oid(1), oid(2)]
    m.pin(oid(0), "h")  # pinned: skipped though the oldest
    s.put(5)
    assert s.kinds("spilled") == [oid(1), oid(2), oid(3)]
    m.release(oid(0), "h")  # released last: most recently used
    s.put(6)
    assert s.kinds("spilled")[-1] == oid(4)
    m._verify()


def test_failed_restore_leaves_the_object_spilled(store: Callable[..., Store]) -> None:
    s = store(arena_size=4 * SLOT, spill_capacity=1 << 20)
    m = s.m
    s.put(0)
    for i in range(1, 5):
        s.put(i)
        m.pin(oid(i), "h")
    e = m.get_entry(oid(0))
    assert e is not None and e.state == SPILLED
    path = e.spill_path
    with pytest.raises(ResourceExhaustedError):
        m.pin(oid(0), "r")
    assert e.state == SPILLED and e.spill_path == path and path is not None and path.exists()
    assert e.pins == {} and m.stats()["restores"] == 0
    m._verify()
    m.release(oid(4), "h")
    assert s.read(0) == payload(0)  # restored by spilling 4
    assert m.get_entry(oid(4)).state == SPILLED  # type: ignore[union-attr]
    assert not path.exists()


def test_lost_spill_file(store: Callable[..., Store]) -> None:
    s = store(arena_size=SLOT, spill_capacity=1 << 20)
    m = s.m
    s.put(0)
    s.put(1)
    e = m.get_entry(oid(0))
    assert e is not None and e.spill_path is not None
    e.spill_path.write_bytes(b"truncated")
    with pytest.raises(NotFoundError, match="lost"):
        m.pin(oid(0), "r")
    assert m.get_entry(oid(0)) is None and s.kinds("lost") == [oid(0)]
    # making room for the restore had spilled object 1
    assert m.stats()["spilled_objects"] == 1 and m.stats()["spilled_bytes"] == SLOT
    assert [p.name for p in s.spill_dir.iterdir()] == [oid(1).hex()]
    assert s.read(1) == payload(1)
    m._verify()


def test_no_spill_space_means_no_spill(store: Callable[..., Store]) -> None:
    s = store(arena_size=2 * SLOT, spill_capacity=0)
    s.put(0)
    s.put(1)
    with pytest.raises(ResourceExhaustedError, match="spill space used 0 of 0 bytes"):
        s.put(2)


# ----------------------------------------------------------- sessions, delete


def test_release_session(store: Callable[..., Store]) -> None:
    s = store()
    m = s.m
    for i in range(3):
        s.put(i)
    m.pin(oid(0), "a")
    m.pin(oid(0), "a")
    m.pin(oid(1), "a")
    m.pin(oid(1), "b")
    m.create(oid(7), 100, "o", session="a")  # left unsealed by the session
    m.create(oid(8), 100, "o", session="a")
    m.seal(oid(8))
    assert m.release_session("a") == 3
    assert m.get_entry(oid(0)).pins == {}  # type: ignore[union-attr]
    assert m.get_entry(oid(1)).pins == {"b": 1}  # type: ignore[union-attr]
    assert m.get_entry(oid(7)) is None and s.kinds("aborted") == [oid(7)]
    assert m.contains(oid(8))  # sealed before the session ended: stays
    assert m.stats()["pinned"] == SLOT
    assert m.release_session("a") == 0 and m.release_session("nobody") == 0
    assert m.delete(oid(0))
    m._verify()


def test_delete(store: Callable[..., Store]) -> None:
    s = store()
    m = s.m
    s.put(0)
    m.pin(oid(0), "a")
    m.pin(oid(0), "a")
    m.pin(oid(0), "b")
    with pytest.raises(FailedPreconditionError, match="pinned 3 time\\(s\\) by 2 session\\(s\\)"):
        m.delete(oid(0))
    m.release_session("a")
    m.release_session("b")
    used = m.stats()["used"]
    assert m.delete(oid(0)) and s.kinds("deleted") == [oid(0)]
    assert m.stats()["used"] == used - SLOT and not m.contains(oid(0))
    assert m.delete(oid(0)) is False
    m.create(oid(1), 10, "o")
    with pytest.raises(FailedPreconditionError, match="being written"):
        m.delete(oid(1))
    m._verify()


def test_event_handler_errors_are_contained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def boom(kind: str, e: ObjectEntry) -> None:
        raise RuntimeError("handler broke")

    with Arena(tmp_path / "arena", 4 * SLOT) as arena:
        m = ObjectManager(arena, spill_dir=tmp_path / "spill", spill_capacity=0, on_event=boom)
        with caplog.at_level(logging.ERROR):
            m.put_inline(oid(1), b"x" * 10, "o")
        assert m.contains(oid(1)) and "event handler failed on sealed" in caplog.text


def test_spill_files_of_an_earlier_run_are_adopted(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / oid(1).hex()).write_bytes(b"old object")  # complete: written then renamed
    (spill / (oid(2).hex() + ".partial")).write_bytes(b"half")  # a spill cut short by a crash
    (spill / "keep.txt").write_bytes(b"not ours")
    with Arena(tmp_path / "arena", SLOT) as arena:
        m = ObjectManager(arena, spill_dir=spill, spill_capacity=SLOT)
        assert m.contains(oid(1)) and not m.contains(oid(2))
        assert m.stats()["spilled_objects"] == 1
        e = m.pin(oid(1), "s")  # restored from disk into the arena; it stays durable: its file stays
        assert e.offset is not None and bytes(arena.view(e.offset, e.size)) == b"old object"
        assert sorted(p.name for p in spill.iterdir()) == [oid(1).hex(), "keep.txt"]
        m.release(oid(1), "s")
        assert m.delete(oid(1))
        m._verify()
    assert sorted(p.name for p in spill.iterdir()) == ["keep.txt"]


def test_durable_objects_outlive_a_crash_of_the_store(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    with Arena(tmp_path / "arena", 4 * SLOT) as arena:
        m = ObjectManager(arena, spill_dir=spill, spill_capacity=0)  # no spill space: durable files don't use it
        m.put_inline(oid(1), b"kept" * 100, "serving", durable=True)
        off = m.create(oid(2), 3000, "compiler", session="w")
        arena.view(off, 3000)[:] = b"k" * 3000
        m.seal(oid(2), durable=True)
        m.put_inline(oid(3), b"not kept", "driver")
        m._verify()
        assert sorted(p.name for p in spill.iterdir()) == sorted([oid(1).hex(), oid(2).hex()])
        assert m.stats()["spilled_bytes"] == 0
        # crash: no close(); a new manager over the same directory
    with Arena(tmp_path / "arena2", 4 * SLOT) as arena:
        m = ObjectManager(arena, spill_dir=spill, spill_capacity=0)
        assert m.contains(oid(1)) and m.contains(oid(2)) and not m.contains(oid(3))
        e = m.pin(oid(2), "r")
        assert e.offset is not None and bytes(arena.view(e.offset, e.size)) == b"k" * 3000
        m.release(oid(2), "r")
        m._verify()
        # it can leave memory again with nothing written, and a graceful stop keeps durable files
        m.put_inline(oid(4), b"x" * (4 * SLOT - 64), "driver")
        assert m.get_entry(oid(2)).state == SPILLED  # type: ignore[union-attr]
        m._verify()
        m.close()
        assert m.delete(oid(1)) and not (spill / oid(1).hex()).exists()
        assert (spill / oid(2).hex()).exists()


def test_spill_is_written_atomically(tmp_path: Path) -> None:
    with Arena(tmp_path / "arena", SLOT) as arena:
        m = ObjectManager(arena, spill_dir=tmp_path / "spill", spill_capacity=4 * SLOT)
        m.put_inline(oid(1), b"a" * (SLOT // 2), "o")
        m.put_inline(oid(2), b"b" * (SLOT // 2 + 64), "o")  # forces oid(1) out to disk
        names = sorted(p.name for p in (tmp_path / "spill").iterdir())
        assert names == [oid(1).hex()], names


# ---------------------------------------------------------------- interleavings


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_interleavings(store: Callable[..., Store], seed: int) -> None:
    rng = random.Random(seed)
    s = store(arena_size=16 * KIB, spill_capacity=24 * KIB,
              has_other_copy=lambda o: o[-1] % 5 == 0)
    m = s.m
    expected: dict[int, bytes] = {}
    writing: dict[int, int] = {}
    sessions = ["s1", "s2", "s3"]
    errors = (ResourceExhaustedError, FailedPreconditionError, AlreadyExistsError, NotFoundError)
    for step in range(1500):
        i = rng.randrange(60)
        op = rng.random()
        try:
            if op < 0.25:
                size = rng.choice([1, 100, 1000, 3000, 5000])
                data = rng.randbytes(size)
                m.put_inline(oid(i), data, "o", durable=rng.random() < 0.3)
                expected[i] = data
            elif op < 0.35:
                size = rng.choice([64, 2000])
                off = m.create(oid(i), size, "o", session=rng.choice(sessions))
                s.arena.view(off, size)[:] = bytes([i]) * size
                writing[i] = size
            elif op < 0.45 and writing:
                j = rng.choice(list(writing))
                if rng.random() < 0.8:
                    m.seal(oid(j), durable=rng.random() < 0.3)
                    expected[j] = bytes([j]) * writing.pop(j)
                else:
                    m.abort(oid(j))
                    writing.pop(j)
            elif op < 0.7:
                e = m.pin(oid(i), rng.choice(sessions))
                assert e.offset is not None
                assert bytes(s.arena.view(e.offset, e.size)) == expected[i], f"step {step}: object {i} changed"
            elif op < 0.85:
                m.release(oid(i), rng.choice(sessions))
            elif op < 0.95:
                if m.delete(oid(i)):
                    del expected[i]
            else:
                sess = rng.choice(sessions)
                for j in [j for j in writing if m.get_entry(oid(j)).creator == sess]:  # type: ignore[union-attr]
                    writing.pop(j)
                m.release_session(sess)
        except errors:
            pass
        for o in s.kinds("evicted") + s.kinds("lost"):
            expected.pop(int.from_bytes(o[-4:], "big"), None)
        s.events.clear()
        m._verify()
        assert {int.from_bytes(o[-4:], "big") for o, e in m._objects.items() if e.state != CREATED} == set(expected)
    for sess in sessions:
        m.release_session(sess)
    s.events.clear()
    # read back and delete: the objects in the arena first, then the spilled ones (into an emptied arena)
    for i in sorted(expected, key=lambda i: m.get_entry(oid(i)).state == SPILLED):  # type: ignore[union-attr]
        assert s.read(i) == expected[i]
        assert m.delete(oid(i))
    assert s.kinds("evicted") == []
    assert m.stats()["objects"] == m.stats()["spilled_bytes"] == m.stats()["used"] == 0
