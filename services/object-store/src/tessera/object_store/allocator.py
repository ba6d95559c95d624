"""Offsets into the shared-memory arena: best-fit allocation over coalesced holes.

Free space is a set of holes, kept twice: sorted by offset (to find and merge
neighbours on free) and sorted by (size, offset) (to find the smallest hole that
fits on allocate). Both are plain sorted lists searched with :mod:`bisect`, so a
call costs O(log holes) comparisons plus one list insert or delete (a memmove).
A fresh arena is one hole; allocations carve it from the front.

Every block is a multiple of ``align`` bytes and starts on an ``align`` boundary,
so objects in the arena are aligned for any numeric dtype.
"""

from __future__ import annotations

from bisect import bisect_left, insort


class Allocator:
    """Allocates ``[offset, offset + size)`` ranges of ``[0, capacity)``.

    ``capacity`` is rounded down to a multiple of ``align`` (a power of two).
    Misuse (a free that overlaps free space, an unaligned offset) raises
    ``ValueError``: it is a bug of the caller, never a client's error.
    """

    __slots__ = ("align", "capacity", "high_water", "_mask", "_starts", "_sizes", "_by_size", "_free")

    def __init__(self, capacity: int, align: int = 64) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.align = align
        self._mask = align - 1
        self.capacity = capacity & ~self._mask
        self._starts: list[int] = []  # hole offsets, ascending
        self._sizes: dict[int, int] = {}  # hole offset -> hole size
        self._by_size: list[tuple[int, int]] = []  # (size, offset), ascending
        self._free = self.capacity
        self.high_water = 0  # the end of the highest block ever allocated: below it, pages have been used
        if self.capacity:
            self._add(0, self.capacity, 0)

    # ------------------------------------------------------------------ queries

    def round(self, size: int) -> int:
        """``size`` rounded up to the alignment: the bytes a block of ``size`` takes."""
        return (size + self._mask) & ~self._mask

    @property
    def free_bytes(self) -> int:
        return self._free

    @property
    def used_bytes(self) -> int:
        return self.capacity - self._free

    @property
    def largest_hole(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def can_fit(self, size: int) -> bool:
        """Whether :meth:`allocate` of ``size`` would succeed now."""
        return self.largest_hole >= self.round(size)

    def holes(self) -> list[tuple[int, int]]:
        """The holes as (offset, size), by offset."""
        return [(s, self._sizes[s]) for s in self._starts]

    def copy(self) -> Allocator:
        """An independent allocator with the same holes (to try a sequence of frees)."""
        other = Allocator.__new__(Allocator)
        other.align, other._mask, other.capacity, other._free = self.align, self._mask, self.capacity, self._free
        other.high_water = self.high_water
        other._starts = self._starts.copy()
        other._sizes = self._sizes.copy()
        other._by_size = self._by_size.copy()
        return other

    # ---------------------------------------------------------------- mutations

    def allocate(self, size: int) -> int | None:
        """The offset of a new block of ``size`` bytes (rounded up), or None when no hole fits.

        Best fit: the smallest hole that fits, the lowest such on ties.
        """
        if size <= 0:
            raise ValueError(f"allocation size must be > 0, got {size}")
        n = (size + self._mask) & ~self._mask
        by_size = self._by_size
        i = bisect_left(by_size, (n, -1))
        if i == len(by_size):
            return None
        hole, start = by_size.pop(i)
        j = bisect_left(self._starts, start)
        del self._sizes[start]
        if hole == n:
            del self._starts[j]
        else:  # the rest of the hole stays between the same neighbours
            rest = start + n
            self._starts[j] = rest
            self._sizes[rest] = hole - n
            insort(by_size, (hole - n, rest))
        self._free -= n
        if start + n > self.high_water:
            self.high_water = start + n
        return start

    def free(self, offset: int, size: int) -> None:
        """Return the block at ``offset`` (``size`` as given to :meth:`allocate`), merging it with adjacent holes."""
        if size <= 0:
            raise ValueError(f"free size must be > 0, got {size}")
        n = (size + self._mask) & ~self._mask
        end = offset + n
        if offset < 0 or offset & self._mask or end > self.capacity:
            raise ValueError(f"free of [{offset}, {end}) is not an aligned range of [0, {self.capacity})")
        starts, sizes = self._starts, self._sizes
        i = bisect_left(starts, offset)
        nxt = starts[i] if i < len(starts) else None
        prev = starts[i - 1] if i > 0 else None
        if (nxt is not None and nxt < end) or (prev is not None and prev + sizes[prev] > offset):
            raise ValueError(f"free of [{offset}, {end}) overlaps free space (a double free?)")
        merge_prev = prev is not None and prev + sizes[prev] == offset
        merge_next = nxt is not None and nxt == end
        if merge_prev:
            assert prev is not None
            psize = sizes[prev]
            self._remove_by_size(psize, prev)
            total = psize + n
            if merge_next:
                assert nxt is not None
                nsize = sizes.pop(nxt)
                self._remove_by_size(nsize, nxt)
                del starts[i]
                total += nsize
            sizes[prev] = total
            insort(self._by_size, (total, prev))
        elif merge_next:
            assert nxt is not None
            nsize = sizes.pop(nxt)
            self._remove_by_size(nsize, nxt)
            starts[i] = offset
            sizes[offset] = n + nsize
            insort(self._by_size, (n + nsize, offset))
        else:
            self._add(offset, n, i)
        self._free += n

    # ------------------------------------------------------------------ helpers

    def _add(self, offset: int, size: int, index: int) -> None:
        self._starts.insert(index, offset)
        self._sizes[offset] = size
        insort(self._by_size, (size, offset))

    def _remove_by_size(self, size: int, offset: int) -> None:
        k = bisect_left(self._by_size, (size, offset))
        del self._by_size[k]
