"""Mapping shared memory for a large write in one call (tessera.common.prefault), on a real tmpfs file."""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.common import prefault

SIZE = 16 * 2**20
SHM = Path("/dev/shm")


@pytest.fixture
def mapping(tmp_path: Path) -> Iterator[tuple[mmap.mmap, int]]:
    """A fresh shared mapping of a tmpfs file (a small arena) and its address."""
    where = SHM if SHM.is_dir() else tmp_path
    path = where / f"tessera-prefault-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        mm = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
        path.unlink()
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    try:
        yield mm, base
    finally:
        mm.close()


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _supported(mm: mmap.mmap, base: int) -> bool:
    return prefault.populate_write(base, mmap.PAGESIZE)


def test_a_prepared_range_is_written_without_a_fault_per_page(mapping: tuple[mmap.mmap, int]) -> None:
    mm, base = mapping
    if not _supported(mm, base):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")
    pages = SIZE // 2 // mmap.PAGESIZE
    sevens, fives = b"\x07" * (SIZE // 2), b"\x05" * (SIZE // 2)  # (their own pages faulted in here)
    # first, the cost it avoids: writing fresh pages faults once per page
    before = _faults()
    mm[SIZE // 2 :] = sevens
    assert _faults() - before >= pages // 2
    written = prefault.WrittenPages(base, SIZE)
    written.prepare(0, SIZE // 2)
    assert written.populated == SIZE // 2
    before = _faults()
    mm[: SIZE // 2] = fives
    assert _faults() - before < pages // 50
    assert mm[:1] == b"\x05" and mm[SIZE - 1 :] == b"\x07"


def test_prepare_writes_nothing_and_asks_once_per_block(mapping: tuple[mmap.mmap, int]) -> None:
    mm, base = mapping
    if not _supported(mm, base):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")
    mm[:] = b"\xab" * SIZE
    written = prefault.WrittenPages(base, SIZE)
    start, n = prefault.BLOCK * 3 + 100, 4 * 2**20  # not on block bounds
    written.prepare(start, n)
    assert mm[:] == b"\xab" * SIZE  # populating maps pages, it changes no byte
    assert written.populated == n
    written.prepare(start + prefault.BLOCK, n - 2 * prefault.BLOCK)  # inside what was prepared: no call
    assert written.populated == n
    written.prepare(start, n)  # the partial blocks at the ends are not remembered: from the first one on
    assert written.populated == 2 * n
    written.forget()
    written.prepare(start + prefault.BLOCK, prefault.MIN_BYTES)
    assert written.populated == 2 * n + prefault.MIN_BYTES


def test_small_or_outside_writes_are_left_alone(mapping: tuple[mmap.mmap, int]) -> None:
    _, base = mapping
    written = prefault.WrittenPages(base, SIZE)
    written.prepare(0, prefault.MIN_BYTES - 1)  # a few faults cost less than the call
    written.prepare(SIZE - prefault.MIN_BYTES + 1, prefault.MIN_BYTES)  # past the end: not this mapping's
    written.prepare(-1, prefault.MIN_BYTES)
    assert written.populated == 0
