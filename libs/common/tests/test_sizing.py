"""The object store's default size: the node's memory (cgroup limits included), the arena's free space, overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera.common.errors import InvalidArgumentError
from tessera.common.sizing import (
    DEFAULT_FRACTION,
    PAGE,
    NodeMemory,
    cgroup_memory_limit,
    free_bytes,
    node_memory,
    object_store_size,
    physical_memory,
)

GiB = 2**30


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    return write(tmp_path / "meminfo", "MemTotal:       16777216 kB\nMemFree:         1000 kB\n")  # 16 GiB


def test_physical_memory_reads_memtotal(meminfo: Path) -> None:
    assert physical_memory(meminfo) == 16 * GiB


def test_physical_memory_of_this_machine_is_sysconf_where_there_is_no_meminfo(tmp_path: Path) -> None:
    assert physical_memory(tmp_path / "absent") == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_cgroup_v2_the_smallest_limit_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory.max", "max\n")
    write(root / "kubepods" / "memory.max", f"{6 * GiB}\n")
    write(root / "kubepods" / "pod1" / "memory.max", f"{8 * GiB}\n")  # looser than its parent: the parent binds
    write(root / "kubepods" / "pod1" / "ctr" / "memory.max", "max\n")
    cg = write(tmp_path / "self-cgroup", "0::/kubepods/pod1/ctr\n")
    assert cgroup_memory_limit(cg, root) == (6 * GiB, "cgroup v2 memory.max")


def test_cgroup_v2_namespace_reads_the_mount_root(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory.max", f"{3 * GiB}\n")
    cg = write(tmp_path / "self-cgroup", "0::/\n")
    assert cgroup_memory_limit(cg, root) == (3 * GiB, "cgroup v2 memory.max")
    cg.write_text("0::/some/host/path/not/mounted/here\n")  # a namespaced view: the root is our own cgroup
    assert cgroup_memory_limit(cg, root) == (3 * GiB, "cgroup v2 memory.max")


def test_cgroup_v2_without_a_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "user.slice" / "memory.max", "max\n")
    cg = write(tmp_path / "self-cgroup", "0::/user.slice\n")
    assert cgroup_memory_limit(cg, root) is None


def test_cgroup_v1_limit_in_bytes(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory" / "memory.limit_in_bytes", f"{2 * GiB}\n")  # a container: the mount is its own cgroup
    cg = write(tmp_path / "self-cgroup", "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_memory_limit(cg, root) == (2 * GiB, "cgroup v1 memory.limit_in_bytes")
    write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", f"{GiB}\n")  # a host: the full path exists
    assert cgroup_memory_limit(cg, root) == (GiB, "cgroup v1 memory.limit_in_bytes")


def test_cgroup_v1_a_parent_limit_binds_through_memory_stat(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    d = root / "memory" / "user.slice" / "job"
    write(d / "memory.limit_in_bytes", "9223372036854771712\n")
    write(d / "memory.stat", f"cache 0\nrss 4096\nhierarchical_memory_limit {5 * GiB}\nhierarchical_memsw_limit 1\n")
    cg = write(tmp_path / "self-cgroup", "4:memory:/user.slice/job\n")
    assert cgroup_memory_limit(cg, root) == (5 * GiB, "cgroup v1 hierarchical_memory_limit")
    (d / "memory.limit_in_bytes").write_text(f"{3 * GiB}\n")  # its own, tighter
    assert cgroup_memory_limit(cg, root) == (3 * GiB, "cgroup v1 memory.limit_in_bytes")


def test_cgroup_v1_unlimited_is_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's page-rounded "no limit"
    cg = write(tmp_path / "self-cgroup", "4:memory:/\n")
    assert cgroup_memory_limit(cg, root) is None


def test_node_memory_is_the_cgroup_limit_when_smaller(tmp_path: Path, meminfo: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory.max", f"{4 * GiB}\n")
    cg = write(tmp_path / "self-cgroup", "0::/\n")
    assert node_memory(meminfo=meminfo, proc_self_cgroup=cg, cgroup_root=root) == NodeMemory(4 * GiB,
                                                                                             "cgroup v2 memory.max")
    (root / "memory.max").write_text(f"{64 * GiB}\n")  # a limit above the machine's memory binds nothing
    assert node_memory(meminfo=meminfo, proc_self_cgroup=cg, cgroup_root=root) == NodeMemory(16 * GiB,
                                                                                             "physical memory")
    assert node_memory(meminfo=meminfo, proc_self_cgroup=tmp_path / "absent", cgroup_root=root).bytes == 16 * GiB


def test_node_memory_of_this_machine() -> None:
    mem = node_memory()
    assert 0 < mem.bytes <= physical_memory()


def test_default_is_30_percent_of_the_node_memory(tmp_path: Path) -> None:
    mem = NodeMemory(GiB + 123, "physical memory")
    s = object_store_size(0, tmp_path, memory=mem)
    if s.capped:
        pytest.skip(f"{tmp_path} has less than {GiB * DEFAULT_FRACTION:.0f} bytes free")
    assert s.capacity == int((GiB + 123) * DEFAULT_FRACTION) // PAGE * PAGE
    assert s.capacity % PAGE == 0 and s.requested == 0
    assert "30% of 1.0GiB (physical memory)" in s.describe()
    half = object_store_size(0, tmp_path, memory=mem, share=2)
    assert half.capacity == int((GiB + 123) * DEFAULT_FRACTION) // 2 // PAGE * PAGE
    assert "split over 2 nodes" in half.describe()


def test_default_is_capped_by_the_arena_file_system(tmp_path: Path) -> None:
    huge = NodeMemory(2**60, "physical memory")  # 30% of it is more than any disk here holds
    s = object_store_size(0, tmp_path, memory=huge)
    assert s.capped
    assert s.capacity == s.arena_free // PAGE * PAGE
    assert 0 < s.capacity <= free_bytes(tmp_path) + 64 * 2**20  # what the file system has (others write meanwhile)
    assert "capped by the" in s.describe() and f"free in {tmp_path}" in s.describe()


def test_reclaimed_bytes_count_as_free(tmp_path: Path) -> None:
    huge = NodeMemory(2**60, "physical memory")
    plain = object_store_size(0, tmp_path, memory=huge)
    more = object_store_size(0, tmp_path, memory=huge, reclaim=GiB)
    assert abs(more.capacity - plain.capacity - GiB) < 64 * 2**20


def test_an_override_is_taken_as_given(tmp_path: Path) -> None:
    s = object_store_size(3 * 2**20 + 1, tmp_path, memory=NodeMemory(2**60, "physical memory"))
    assert s.capacity == s.requested == 3 * 2**20 + 1 and not s.capped
    assert "TESSERA_OBJECT_STORE_MEMORY" in s.describe()


def test_an_override_the_file_system_cannot_hold_is_refused(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    too_big = free + 2**50
    with pytest.raises(InvalidArgumentError) as e:
        object_store_size(too_big, tmp_path)
    msg = str(e.value)
    assert f"TESSERA_OBJECT_STORE_MEMORY={too_big}" in msg and f"does not fit in {tmp_path}" in msg
    assert "bytes" in msg and "free" in msg


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        object_store_size(0, tmp_path / "absent")
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        object_store_size(-1, tmp_path)
    with pytest.raises(InvalidArgumentError, match="share"):
        object_store_size(0, tmp_path, share=0)


def test_settings_default_means_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.common.config import Settings

    monkeypatch.delenv("TESSERA_OBJECT_STORE_MEMORY", raising=False)
    assert Settings().object_store_memory == 0
    monkeypatch.setenv("TESSERA_OBJECT_STORE_MEMORY", str(2 * GiB))
    assert Settings().object_store_memory == 2 * GiB
