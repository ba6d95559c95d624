from __future__ import annotations

import random

import pytest

from tessera.object_store.allocator import Allocator


def test_alignment_and_rounding() -> None:
    a = Allocator(1000, align=64)
    assert a.capacity == 960  # rounded down to the alignment
    assert a.free_bytes == a.largest_hole == 960
    offs = [a.allocate(n) for n in (1, 64, 65, 100)]
    assert offs == [0, 64, 128, 256]
    assert all(o % 64 == 0 for o in offs if o is not None)
    assert a.free_bytes == 960 - (64 + 64 + 128 + 128)
    assert a.round(1) == 64 and a.round(64) == 64 and a.round(65) == 128
    with pytest.raises(ValueError):
        Allocator(1024, align=48)
    with pytest.raises(ValueError):
        a.allocate(0)


def test_exhaustion_returns_none() -> None:
    a = Allocator(256, align=64)
    assert a.allocate(256) == 0
    assert a.allocate(1) is None
    assert a.free_bytes == 0 and a.largest_hole == 0 and not a.can_fit(1)
    a.free(0, 256)
    assert a.holes() == [(0, 256)]


def test_coalescing_in_every_order() -> None:
    a = Allocator(64 * 4, align=64)
    x, y, z, w = (a.allocate(64) for _ in range(4))
    assert (x, y, z, w) == (0, 64, 128, 192)
    a.free(64, 64)  # no neighbour free
    assert a.holes() == [(64, 64)]
    a.free(192, 64)
    assert a.holes() == [(64, 64), (192, 64)]
    a.free(128, 64)  # merges with both neighbours
    assert a.holes() == [(64, 192)]
    a.free(0, 64)  # merges with the next hole
    assert a.holes() == [(0, 256)]
    assert a.largest_hole == 256 and a.free_bytes == 256

    b = Allocator(64 * 3, align=64)
    p, q, r = (b.allocate(64) for _ in range(3))
    b.free(p, 64)
    b.free(q, 64)  # merges with the previous hole
    assert b.holes() == [(0, 128)]


def test_fragmentation_best_fit() -> None:
    a = Allocator(64 * 10, align=64)
    offs = [a.allocate(64) for _ in range(10)]
    for o in offs[::2]:  # free every other block: 320 bytes free, no hole larger than 64
        assert o is not None
        a.free(o, 64)
    assert a.free_bytes == 320 and a.largest_hole == 64
    assert a.allocate(128) is None
    a.free(offs[1], 64)  # joins blocks 0..2 into one hole of 192
    assert a.largest_hole == 192
    # best fit: a 64-byte request takes a 64-byte hole, not the 192-byte one
    assert a.allocate(64) == 256
    assert a.allocate(128) == 0
    assert a.holes() == [(128, 64), (384, 64), (512, 64)]


def test_misuse_is_refused() -> None:
    a = Allocator(1024, align=64)
    o = a.allocate(100)
    assert o == 0
    a.free(0, 100)
    with pytest.raises(ValueError, match="double free"):
        a.free(0, 100)
    a.allocate(128)
    with pytest.raises(ValueError, match="aligned"):
        a.free(3, 64)
    with pytest.raises(ValueError, match="aligned"):
        a.free(1024, 64)
    with pytest.raises(ValueError, match="overlaps"):
        a.free(64, 128)  # the tail of it is free


def test_copy_is_independent() -> None:
    a = Allocator(1024)
    a.allocate(512)
    b = a.copy()
    b.free(0, 512)
    assert a.holes() == [(512, 512)] and b.holes() == [(0, 1024)]
    assert a.free_bytes == 512 and b.free_bytes == 1024


def _runs(units: bytearray) -> list[tuple[int, int]]:
    """Maximal runs of free units (0) as (start, length)."""
    runs, i, n = [], 0, len(units)
    while i < n:
        if units[i]:
            i += 1
            continue
        j = i
        while j < n and not units[j]:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_against_reference_model(seed: int) -> None:
    rng = random.Random(seed)
    align, units = 64, 512
    a = Allocator(units * align, align=align)
    model = bytearray(units)  # 1 = allocated
    live: dict[int, int] = {}
    for _ in range(4000):
        if live and (rng.random() < 0.45 or a.free_bytes == 0):
            off = rng.choice(list(live))
            size = live.pop(off)
            a.free(off, size)
            u, k = off // align, a.round(size) // align
            assert all(model[u:u + k])
            model[u:u + k] = bytes(k)
        else:
            size = rng.choice([1, 63, 64, 65, 200, 1000, rng.randrange(1, 8 * align)])
            k = a.round(size) // align
            runs = _runs(model)
            fitting = [r for r in runs if r[1] >= k]
            off = a.allocate(size)
            if not fitting:
                assert off is None
                continue
            assert off is not None and off % align == 0
            best = min(fitting, key=lambda r: (r[1], r[0]))
            assert off == best[0] * align  # best fit, lowest offset on ties
            u = off // align
            assert not any(model[u:u + k])
            model[u:u + k] = b"\x01" * k
            live[off] = size
        runs = _runs(model)
        assert a.holes() == [(s * align, n * align) for s, n in runs]  # coalesced exactly
        assert a.free_bytes == model.count(0) * align
        assert a.largest_hole == max((n for _, n in runs), default=0) * align
    for off, size in live.items():
        a.free(off, size)
    assert a.holes() == [(0, units * align)]
