"""How much shared memory a node's object store takes, sized as Ray sizes its object store.

By default a store takes 30% of the node's memory, capped by the free space of the
file system that holds its arena (``/dev/shm``, a tmpfs, by default): an arena larger
than that file system could hold would fail later, with SIGBUS, at the first write
that finds no page. ``TESSERA_OBJECT_STORE_MEMORY`` overrides the default; a size the
file system cannot hold is refused at start with a message that says so.

"The node's memory" is the machine's physical memory, or the memory limit of the
process's cgroup where one is set (cgroup v2 ``memory.max``, or v1
``memory.limit_in_bytes``), whichever is smaller: in a container limited to 8 GiB on
a 512 GiB host, 30% of the host would be killed by the OOM killer, not used.

This module reads files only (``/proc``, ``/sys/fs/cgroup``, ``statvfs``); the roots
are parameters so that tests can point them at trees of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tessera.common.errors import InvalidArgumentError

#: Share of the node's memory a store takes by default (Ray's default too).
DEFAULT_FRACTION = 0.30
#: Capacities are whole pages, so every page of the arena can hold objects.
PAGE = 4096
#: cgroup limits at or above this mean "no limit" (v1 writes a page-rounded 2**63 - 1).
_UNLIMITED = 2**62

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")


def human(n: int) -> str:
    """Bytes as MiB below a GiB, GiB from there (one decimal)."""
    return f"{n / 2**20:.0f}MiB" if n < 2**30 else f"{n / 2**30:.1f}GiB"


@dataclass(frozen=True)
class NodeMemory:
    """The memory a node may use: ``bytes``, and where the figure came from (``source``)."""

    bytes: int
    source: str  # "physical memory", "cgroup v2 memory.max", "cgroup v1 memory.limit_in_bytes" or "... hierarchical_memory_limit"


@dataclass(frozen=True)
class StoreSize:
    """The capacity chosen for one object store, with the figures it was chosen from."""

    capacity: int
    requested: int  # TESSERA_OBJECT_STORE_MEMORY; 0: the default was computed
    memory: NodeMemory
    arena_dir: Path
    arena_free: int  # free bytes of the arena's file system
    capped: bool  # the default was cut to the file system's free space
    share: int = 1  # stores of one machine the default is split between

    def describe(self) -> str:
        """One line for people: the capacity and why it is that."""
        if self.requested:
            return f"{human(self.capacity)} (TESSERA_OBJECT_STORE_MEMORY; {self.arena_dir} has {human(self.arena_free)} free)"
        split = f", split over {self.share} nodes on this machine" if self.share > 1 else ""
        why = (f"{DEFAULT_FRACTION:.0%} of {human(self.memory.bytes)} ({self.memory.source}){split}")
        if self.capped:
            return f"{human(self.capacity)} (capped by the {human(self.arena_free)} free in {self.arena_dir}; {why})"
        return f"{human(self.capacity)} ({why}; {self.arena_dir} has {human(self.arena_free)} free)"


def physical_memory(meminfo: Path = MEMINFO) -> int:
    """The machine's memory in bytes: MemTotal of /proc/meminfo, else sysconf (macOS)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def _read_limit(path: Path) -> int | None:
    """A cgroup memory limit file's value; None for "max", an unlimited figure, or no file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def _hierarchical_limit(d: Path) -> int | None:
    """cgroup v1: ``hierarchical_memory_limit`` of ``memory.stat`` (None if absent or unlimited)."""
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "hierarchical_memory_limit":
                n = int(value)
                return n if 0 < n < _UNLIMITED else None
    except (OSError, ValueError):
        pass
    return None


def cgroup_memory_limit(proc_self_cgroup: Path = PROC_SELF_CGROUP,
                        cgroup_root: Path = CGROUP_ROOT) -> tuple[int, str] | None:
    """The memory limit of this process's cgroup, and the file it came from; None when none is set.

    cgroup v2: the smallest ``memory.max`` of the process's cgroup and its ancestors (a
    parent's limit binds its children). cgroup v1: ``memory.limit_in_bytes`` of the
    memory controller's cgroup, or the ``hierarchical_memory_limit`` of its ``memory.stat``
    (its ancestors' limits) when smaller, looked up under ``<root>/memory``; inside a container the
    controller's mount is usually the container's own cgroup, so the file at the
    mount's root is read when the process's path does not exist there.
    """
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "" and parts[0] == "0":
            v2_path = rel
        elif "memory" in controllers.split(","):
            v1_path = rel
    if v1_path is not None:
        base = cgroup_root / "memory"
        here = base / v1_path.lstrip("/")
        for d in ((here, base) if here != base else (base,)):
            if not (d / "memory.limit_in_bytes").exists():
                continue
            # memory.stat's hierarchical_memory_limit is the tightest limit of the cgroup and its ancestors
            found = [(x, src) for x, src in ((_read_limit(d / "memory.limit_in_bytes"), "cgroup v1 memory.limit_in_bytes"),
                                             (_hierarchical_limit(d), "cgroup v1 hierarchical_memory_limit"))
                     if x is not None]
            return min(found) if found else None
    if v2_path is not None:
        d = cgroup_root / v2_path.lstrip("/")
        if not d.is_dir():  # a cgroup namespace: the mount's root is the process's cgroup
            d = cgroup_root
        limits = []
        while True:
            limit = _read_limit(d / "memory.max")
            if limit is not None:
                limits.append(limit)
            if d == cgroup_root or cgroup_root not in d.parents:
                break
            d = d.parent
        if limits:
            return min(limits), "cgroup v2 memory.max"
    return None


def node_memory(*, meminfo: Path = MEMINFO, proc_self_cgroup: Path = PROC_SELF_CGROUP,
                cgroup_root: Path = CGROUP_ROOT) -> NodeMemory:
    """The node's memory: physical memory, or the cgroup's limit where that is smaller."""
    total = physical_memory(meminfo)
    limit = cgroup_memory_limit(proc_self_cgroup, cgroup_root)
    if limit is not None and limit[0] < total:
        return NodeMemory(limit[0], limit[1])
    return NodeMemory(total, "physical memory")


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write to ``directory``'s file system."""
    try:
        st = os.statvfs(directory)
    except FileNotFoundError:
        raise InvalidArgumentError(f"the object store's arena directory {directory} does not exist "
                                   f"(TESSERA_OBJECT_STORE_ARENA_DIR)") from None
    return st.f_bavail * st.f_frsize


def object_store_size(requested: int, arena_dir: Path, *, share: int = 1, reclaim: int = 0,
                      memory: NodeMemory | None = None) -> StoreSize:
    """The capacity of one object store whose arena lives in ``arena_dir``.

    Args:
        requested: TESSERA_OBJECT_STORE_MEMORY (``Settings.object_store_memory``); 0: the default.
        share: stores of one machine that split the default (``tessera up --nodes N``).
        reclaim: bytes the arena's file system gets back before the arena is made (a stale
            arena of this node that is about to be replaced).
        memory: the node's memory, if already known (default: :func:`node_memory`).

    Raises:
        InvalidArgumentError: ``requested`` is more than the file system has free, or the
            file system has no room for even a page; the message names both figures.
    """
    if requested < 0:
        raise InvalidArgumentError(f"TESSERA_OBJECT_STORE_MEMORY must be >= 0 (0: the default), got {requested}")
    if share < 1:
        raise InvalidArgumentError(f"share must be >= 1, got {share}")
    mem = memory or node_memory()
    free = free_bytes(arena_dir) + max(0, reclaim)
    if requested:
        if requested > free:
            raise InvalidArgumentError(
                f"TESSERA_OBJECT_STORE_MEMORY={requested} ({human(requested)}) does not fit in {arena_dir}: its "
                f"file system has {free} bytes ({human(free)}) free; ask for less, or give {arena_dir} more room "
                f"(e.g. docker run --shm-size), or point TESSERA_OBJECT_STORE_ARENA_DIR elsewhere")
        return StoreSize(requested, requested, mem, arena_dir, free, capped=False, share=share)
    want = int(mem.bytes * DEFAULT_FRACTION) // share
    capacity = min(want, free) // PAGE * PAGE
    if capacity <= 0:
        raise InvalidArgumentError(f"no room for an object store in {arena_dir}: its file system has {free} bytes free")
    return StoreSize(capacity, 0, mem, arena_dir, free, capped=free < want, share=share)
