"""Store sizing on `tessera up` with default settings: the capacity chosen and printed, clients that map lazily."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import stacks

import tessera
from tessera.common.sizing import free_bytes, object_store_size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MiB = 2**20
ARENA_DIR = Path("/dev/shm")


class Sized(stacks.Cluster):
    up_stdout = ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sized]:
    run_dir = tmp_path_factory.mktemp("sizing")
    c = Sized(run_dir, stacks.clean_env(run_dir))  # no TESSERA_OBJECT_STORE_MEMORY: the default
    r = c.cli("up", "--services", "control-store,object-store", "--timeout", "150", timeout=210)
    assert r.returncode == 0, f"tessera up failed:\n{r.stdout}\n{r.stderr}"
    c.up_stdout = r.stdout
    pids = c.pids()
    try:
        yield c
    finally:
        c.down(pids)


def _rss_shmem() -> int:
    """Bytes of shared memory mapped into this process's page tables."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"RssShmem:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def test_up_and_status_print_the_capacity_chosen(cluster: Sized) -> None:
    node = cluster.node_ids()[0]
    line = next(ln for ln in cluster.up_stdout.splitlines() if ln.startswith("object store capacity of node"))
    assert line.startswith(f"object store capacity of node {node[:8]}: ")
    chosen = cluster.record("object-store")["object_store_memory"]
    want = object_store_size(0, ARENA_DIR)  # what the launcher computed, asked again
    if want.capped:  # the free space of /dev/shm may have moved since
        assert abs(chosen - want.capacity) < 256 * MiB and "capped by the" in line
    else:
        assert chosen == want.capacity and "30% of " in line
    row = cluster.proc("object-store")
    assert row["capacity"] == chosen and row["used"] == 0
    text = cluster.cli("status").stdout
    assert re.search(rf"node {node[:8]} 0MiB/\S+ used \(0% of capacity\)", text), text


def test_the_store_warms_a_bounded_headroom_of_its_arena(cluster: Sized) -> None:
    """A store never written to holds no memory; after its first object it keeps 256 MiB (at most half the arena)
    allocated ahead of its objects, and no more."""
    capacity = cluster.proc("object-store")["capacity"]
    headroom = min(256 * MiB, capacity // 2)
    arena = ARENA_DIR / f"tessera-{cluster.node_ids()[0]}.arena"
    time.sleep(1.0)
    assert arena.stat().st_blocks * 512 < 4 * MiB, "an idle store, never written to, warmed its arena"
    with tessera.ObjectStoreClient(cluster.address("object-store")) as c:
        c.put(np.ones(MiB // 8))  # its first object
        deadline = time.monotonic() + 60
        while arena.stat().st_blocks * 512 < headroom:
            assert time.monotonic() < deadline, f"{arena.stat().st_blocks * 512} of {headroom} bytes warmed in 60s"
            time.sleep(0.1)
        time.sleep(0.5)  # an idle store goes no further
        assert arena.stat().st_blocks * 512 < headroom + 2 * MiB + 64 * MiB


def test_a_client_maps_the_arena_lazily(cluster: Sized) -> None:
    capacity = cluster.proc("object-store")["capacity"]
    assert capacity >= 512 * MiB, "the test needs a store larger than what it checks against"
    before = _rss_shmem()
    t0 = time.perf_counter()
    c = tessera.ObjectStoreClient(cluster.address("object-store"))
    opened = time.perf_counter() - t0
    try:
        mapped = _rss_shmem() - before
        assert mapped < 32 * MiB, f"opening a client mapped {mapped} bytes of a {capacity}-byte arena"
        assert opened < 3.0, f"opening a client took {opened:.2f}s"
        a = np.arange(256 * MiB // 8, dtype=np.float64)
        ref = c.put(a)
        grown = _rss_shmem() - before
        assert 256 * MiB <= grown < 256 * MiB + 32 * MiB, f"a 256 MiB put mapped {grown} bytes"
        v = c.get(ref)
        assert np.array_equal(v, a)
        del v
    finally:
        c.close()


def test_up_refuses_a_size_the_arena_cannot_hold(tmp_path: Path) -> None:
    too_big = free_bytes(ARENA_DIR) + 2**50
    c = stacks.Cluster(tmp_path, stacks.clean_env(tmp_path, TESSERA_OBJECT_STORE_MEMORY=str(too_big)))
    r = c.cli("up", "--services", "control-store,object-store", "--timeout", "30", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"TESSERA_OBJECT_STORE_MEMORY={too_big}" in r.stderr and f"does not fit in {ARENA_DIR}" in r.stderr
    assert not (tmp_path / "cluster.json").exists() and not (tmp_path / "supervisor.pid").exists()
