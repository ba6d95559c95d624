from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tessera.common import prefault
from tessera.common.errors import InvalidArgumentError
from tessera.object_store.allocator import Allocator
from tessera.object_store.arena import Arena
from tessera.object_store.warm import Warmer, headroom_for

SHM = Path("/dev/shm")
MiB = 1 << 20


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _until(cond: Callable[[], bool], what: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline_s:g}s: {what}")
        time.sleep(0.01)


def test_warm_allocates_and_maps_a_range_and_keeps_its_bytes(shm_path: Path) -> None:
    with Arena(shm_path, 16 * MiB, reserve=False) as a:
        a.view(5 * MiB + 7, 4)[:] = b"keep"
        a.warm(4 * MiB, 4 * MiB)
        if shm_path.is_relative_to(SHM):  # tmpfs: the range (and only about it) has memory behind it now
            assert 4 * MiB <= _allocated(shm_path) < 5 * MiB
        assert bytes(a.view(5 * MiB + 7, 4)) == b"keep"
        assert bytes(a.view(4 * MiB, 8)) == bytes(8)
        assert a._written is not None
        if prefault._supported:  # mapped here too: a write into it takes no fault
            assert a._written.populated == 4 * MiB
        with pytest.raises(InvalidArgumentError):
            a.warm(12 * MiB, 8 * MiB)
        a.warm(0, 0)  # nothing to do


def test_headroom_is_at_most_half_the_arena() -> None:
    assert headroom_for(1 << 30, 8 << 30) == 1 << 30
    assert headroom_for(1 << 30, 1 << 30) == 1 << 29
    assert headroom_for(0, 8 << 30) == 0


def test_the_warmer_keeps_headroom_above_the_highest_block(shm_path: Path) -> None:
    alloc = Allocator(64 * MiB)
    with Arena(shm_path, 64 * MiB, reserve=False) as a:
        w = Warmer(a, lambda: alloc.high_water, 8 * MiB, piece=MiB, poll_s=0.01)
        w.start()
        try:
            time.sleep(0.1)  # a store never written to: nothing warmed, no memory taken
            assert w.warmed == 0 and w.failed is None
            if shm_path.is_relative_to(SHM):
                assert _allocated(shm_path) == 0
            first = alloc.allocate(MiB)
            assert first == 0
            _until(lambda: w.warmed == 9 * MiB, "8 MiB warmed above the first object")
            time.sleep(0.1)  # an idle warmer goes no further than the headroom
            assert w.warmed == 9 * MiB and w.failed is None
            if shm_path.is_relative_to(SHM):
                assert 8 * MiB <= _allocated(shm_path) < 9 * MiB
            alloc.free(first, MiB)
            off = alloc.allocate(20 * MiB)
            assert off == 0 and alloc.high_water == 20 * MiB
            a.view(off, 3)[:] = b"obj"
            _until(lambda: w.warmed == 28 * MiB, "the headroom to follow the highest block")
            assert bytes(a.view(off, 3)) == b"obj"
            if shm_path.is_relative_to(SHM):  # [9, 20) MiB was skipped (the object took it), not warmed
                assert _allocated(shm_path) < 18 * MiB
            alloc.free(off, 20 * MiB)
            alloc.allocate(60 * MiB)  # near the end: the headroom stops at the arena's end
            _until(lambda: w.warmed == 64 * MiB, "the headroom up to the end of the arena")
        finally:
            w.stop()
        assert w._thread is not None and not w._thread.is_alive()
        assert w.failed is None


def test_a_warmer_without_headroom_starts_no_thread(shm_path: Path) -> None:
    with Arena(shm_path, 4 * MiB, reserve=False) as a:
        w = Warmer(a, lambda: 0, 0)
        w.start()
        w.stop()
        assert w._thread is None and w.warmed == 0
        if shm_path.is_relative_to(SHM):
            assert _allocated(shm_path) == 0
