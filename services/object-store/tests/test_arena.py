from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tessera.common.errors import InvalidArgumentError, ResourceExhaustedError
from tessera.object_store.arena import Arena

SHM = Path("/dev/shm")


def test_two_maps_of_one_file_share_bytes(shm_path: Path) -> None:
    size = 1 << 20
    with Arena(shm_path, size) as a, Arena.attach(shm_path, writable=True) as b:
        assert b.size == a.size == size == shm_path.stat().st_size
        a.view(4096, 5)[:] = b"hello"
        assert bytes(b.view(4096, 5)) == b"hello"
        b.view(size - 3, 3)[:] = b"end"
        assert bytes(a.view(size - 3, 3)) == b"end"
        # numpy over a view reads in place, no copy
        arr = np.frombuffer(a.view(0, 4096 * 2), dtype=np.uint8)
        b.view(10, 1)[:] = b"\x07"
        assert arr[10] == 7
        del arr


def test_read_only_map_refuses_writes(shm_path: Path) -> None:
    with Arena(shm_path, 1 << 16) as a:
        a.view(0, 3)[:] = b"abc"
        with Arena.attach(shm_path) as ro:
            assert not ro.writable
            v = ro.view(0, 3)
            assert bytes(v) == b"abc" and v.readonly
            with pytest.raises(TypeError):
                v[0] = 1
            with pytest.raises(TypeError):
                ro._mm[0] = 1  # type: ignore[index]  # the mapping itself is PROT_READ
            with pytest.raises(ValueError):
                np.frombuffer(v, dtype=np.uint8)[0] = 1
            with pytest.raises(ValueError, match="not mapped writable"):
                ro.prefault()
            del v


def test_view_bounds(shm_path: Path) -> None:
    with Arena(shm_path, 4096) as a:
        assert len(a.view(0, 4096)) == 4096
        assert len(a.view(4096, 0)) == 0
        with pytest.raises(InvalidArgumentError):
            a.view(4000, 100)
        with pytest.raises(InvalidArgumentError):
            a.view(-1, 1)
    with pytest.raises(InvalidArgumentError):
        Arena(shm_path, 0)


def test_prefault_allocates_every_page_and_keeps_data(shm_path: Path) -> None:
    size = 8 << 20
    with Arena(shm_path, size, reserve=False) as a:
        a.view(12345, 4)[:] = b"keep"
        method = a.prefault()
        assert method in ("madvise", "touch")
        if shm_path.is_relative_to(SHM):  # tmpfs: every page now has memory behind it
            assert os.stat(shm_path).st_blocks * 512 >= size
        assert bytes(a.view(12345, 4)) == b"keep"
        a._touch()  # the fallback path, on any kernel
        assert bytes(a.view(12345, 4)) == b"keep"
        assert bytes(a.view(0, 8)) == bytes(8)


def test_reserve_allocates_up_front(shm_path: Path) -> None:
    if not shm_path.is_relative_to(SHM):
        pytest.skip("no tmpfs at /dev/shm")
    size = 4 << 20
    with Arena(shm_path, size):
        assert os.stat(shm_path).st_blocks * 512 >= size


def test_stale_file_is_replaced_and_unlink(shm_path: Path) -> None:
    shm_path.write_bytes(b"stale")
    with Arena(shm_path, 1 << 16) as a:
        assert bytes(a.view(0, 5)) == bytes(5)
        a.unlink()
        assert not shm_path.exists()
        a.view(0, 1)[:] = b"x"  # the mapping outlives the name
        a.unlink()  # again: no error


def test_close_with_live_views(shm_path: Path) -> None:
    a = Arena(shm_path, 1 << 16)
    v = a.view(0, 16)
    a.close()  # the mapping stays until the view goes
    assert a.closed
    v[:4] = b"live"
    assert bytes(v[:4]) == b"live"
    with pytest.raises(ValueError, match="closed"):
        a.view(0, 1)
    del v
    a.close()  # idempotent



def test_without_reserve_pages_come_on_first_write(shm_path: Path) -> None:
    if not shm_path.is_relative_to(SHM):
        pytest.skip("no tmpfs at /dev/shm")
    size = 4 << 20
    with Arena(shm_path, size, reserve=False) as a:
        assert os.stat(shm_path).st_blocks * 512 < size  # nothing taken yet
        a.view(0, 4)[:] = b"page"
        assert 0 < os.stat(shm_path).st_blocks * 512 < size


def test_without_reserve_a_file_system_too_small_is_resource_exhausted(shm_path: Path) -> None:
    free = os.statvfs(shm_path.parent).f_bavail * os.statvfs(shm_path.parent).f_frsize
    with pytest.raises(ResourceExhaustedError, match="no room"):
        Arena(shm_path, free + (1 << 40), reserve=False)
    assert not shm_path.exists()
