"""Ray 2.60 peer of benchmarks/object_store_bench.py: the same object rows, measured on Ray.

    .venv-ray/bin/python benchmarks/peers/ray_objects.py [--quick] [--memory BYTES] [--no-two-node]
        [--no-client] [--only same-node-get|node-to-node|client] [--sizes ...] [--put-1gb]

Runs in Ray's own virtual environment (Ray is never a Tessera dependency) and
prints one JSON object on stdout; Ray's own messages go to stderr.

This file also holds the system-neutral workload (:class:`Workload`, the
sizes, the plan, the checksum): object_store_bench.py loads it by path and runs
the very same loops against Tessera, so both columns of its table come from the
same code. Only numpy and the standard library are imported at the top; ray is
imported in :func:`main`.

Single node: ``ray.init(num_cpus=2, object_store_memory=...)``. The same-node
"second process" row is a Ray task (a worker process on the same node) reading a
ref the driver put. The node-to-node row uses ``ray.cluster_utils.Cluster``: a
head and a second raylet on this machine, each with its own plasma store, the
object put by the driver on the head and read by a task pinned to the second
node (custom resource), so the bytes cross the two object managers over loopback.

The remote-driver row uses Ray Client: a head started by ``ray.cluster_utils.Cluster``
with its client server on a free port, and ``ray.init("ray://127.0.0.1:PORT")`` in
this process. Ray Client needs grpcio (``ray[client]``); a minimal ``pip install ray``
lacks it, and the row is then reported as n/a with that reason.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Object sizes, in bytes (decimal units: GB/s below is 1e9 bytes per second).
SIZES: dict[str, int] = {"1KB": 1_000, "1MB": 1_000_000, "100MB": 100_000_000, "1GB": 1_000_000_000}
LARGE = ("1MB", "100MB", "1GB")
GIB = 1024**3


@dataclass
class Plan:
    small_ops: int = 2000  # operations per small (1 KB) loop
    small_reps: int = 3  # repetitions of each small loop (medians reported)
    small_warmup: int = 100  # untimed operations before the small loops
    put_reps: dict[str, int] = field(default_factory=lambda: {"1MB": 30, "100MB": 7, "1GB": 4})
    get_reps: dict[str, int] = field(default_factory=lambda: {"1MB": 50, "100MB": 30, "1GB": 20})
    reader_gets: int = 20  # gets of 1 GB in the second process
    same_node_gets: int = 200  # gets of each size in the second process (same-node get row)
    same_node_sizes: tuple[str, ...] = ("1KB", "1MB", "100MB", "1GB")
    node_to_node_reps: int = 3  # 1 GB pulls between two nodes
    copy_reps: int = 7  # numpy copies of each size (warm destination)
    remote_reps: int = 5  # 100 MB put+get pairs through a driver that maps no store memory

    @classmethod
    def quick(cls) -> Plan:
        return cls(small_ops=300, small_reps=2, small_warmup=30,
                   put_reps={"1MB": 10, "100MB": 3, "1GB": 2}, get_reps={"1MB": 20, "100MB": 10, "1GB": 10},
                   reader_gets=10, same_node_gets=50, node_to_node_reps=1, copy_reps=3, remote_reps=2)


def source_array(nbytes: int = SIZES["1GB"]) -> np.ndarray:
    """Real data: uniform float64 from a fixed seed (every size is a prefix of this array)."""
    return np.random.default_rng(0).random(nbytes // 8)


def checksum(a: Any) -> list[int]:
    """Wrapping uint64 sum and xor of the array's bytes: exact, and fast enough for 1 GB."""
    u = np.ascontiguousarray(a).reshape(-1).view(np.uint64)
    return [int(u.sum(dtype=np.uint64)), int(np.bitwise_xor.reduce(u))]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def timed_gets(get: Callable[[Any], Any], ref: Any, n: int) -> dict[str, Any]:
    """``n`` gets of ``ref`` (each value dropped before the next); checksum of the first value."""
    t0 = time.perf_counter()
    v = get(ref)
    first = time.perf_counter() - t0
    cs = checksum(v)
    del v
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        v = get(ref)
        lat.append(time.perf_counter() - t0)
        del v
    return {"first_s": first, "get_s": lat, "checksum": cs}


def _address(a: Any) -> int:
    return int(np.asarray(a).__array_interface__["data"][0])


def read_each(get: Callable[[Any], Any], refs: Sequence[Any], warmup: int) -> dict[str, Any]:
    """Get every ref once (the first ``warmup`` untimed); checksum of the last value."""
    for r in refs[:warmup]:
        v = get(r)
        del v
    lat = []
    t_start = time.perf_counter()
    for r in refs[warmup:]:
        t0 = time.perf_counter()
        v = get(r)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    return {"get_s": lat, "wall_s": wall, "checksum": checksum(v)}


def _settle(size: int) -> None:
    """After freeing a large object: give a store that frees asynchronously (Ray) time to do it,
    so the next put can reuse the same memory (a warm put) rather than fresh pages."""
    if size >= SIZES["100MB"]:
        time.sleep(0.2)


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"benchmark: wrong data: {what}")


class Workload:
    """The rows, against any system given as an adapter with:

    ``put(value) -> ref``, ``get(ref) -> value``, ``free(refs)`` (the caller has
    dropped every value read from them), ``reader(ref, n) -> dict`` (a second
    process on the same node runs :func:`timed_gets`), ``reader_small(refs, warmup)
    -> dict`` (a second process runs :func:`read_each`), optionally ``sync()``
    (return once every object put so far is in the store) and
    ``node_to_node(value, reps) -> list[dict]`` (``{"get_s", "checksum"}`` per
    pull of ``value`` put on one node and read on another).

    Every figure lands in ``self.m`` (name -> number); ``self.notes`` says what
    was checked.
    """

    def __init__(self, plan: Plan, src: np.ndarray, log: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.src = src
        self.log = log
        self.m: dict[str, float] = {}
        self.verified: dict[str, bool] = {}

    # ------------------------------------------------------------- put 1 GB on a fresh store

    def fresh_put_rows(self, sys_: Any, first: Callable[[], Any]) -> None:
        """The 1 GB put of a store that was just started with its default size, beside memcpy.

        ``first()`` does the very first put of the store's life (timed by the caller's
        adapter: nothing else may have run against the store). Then: np.copyto of the
        same 1 GB into a fresh destination (its pages faulted on first write, as the
        store's are) and into a warm one, and warm puts (after one untimed). Ratios:
        the first put over the fresh-destination copy, warm puts over the warm copy.
        """
        p = self.plan
        name, size = "1GB", SIZES["1GB"]
        x = self.src[: size // 8]
        want = checksum(x)
        gc.collect()
        t0 = time.perf_counter()
        r = first()
        cold = time.perf_counter() - t0
        _expect(checksum(sys_.get(r)) == want, "get of the first 1 GB put")
        sys_.free([r])
        del r
        _settle(size)
        fresh = []
        for _ in range(2):
            dst = np.empty_like(x)  # fresh pages
            t0 = time.perf_counter()
            np.copyto(dst, x)
            fresh.append(time.perf_counter() - t0)
            del dst
        dst = np.empty_like(x)
        dst.fill(0.0)
        warm_copy = []
        for _ in range(p.copy_reps):
            t0 = time.perf_counter()
            np.copyto(dst, x)
            warm_copy.append(time.perf_counter() - t0)
        del dst
        r = sys_.put(x)  # untimed
        sys_.free([r])
        del r
        _settle(size)
        warm = []
        for _ in range(p.put_reps[name]):
            t0 = time.perf_counter()
            r = sys_.put(x)
            warm.append(time.perf_counter() - t0)
            sys_.free([r])
            del r
            _settle(size)
        m = self.m
        m["fresh_put_1GB_first_gbps"] = size / cold / 1e9
        m["fresh_put_1GB_gbps"] = size / median(warm) / 1e9
        m["fresh_copy_1GB_cold_gbps"] = size / median(fresh) / 1e9
        m["fresh_copy_1GB_gbps"] = size / median(warm_copy) / 1e9
        m["fresh_put_1GB_first_x_memcpy"] = m["fresh_put_1GB_first_gbps"] / m["fresh_copy_1GB_cold_gbps"]
        m["fresh_put_1GB_x_memcpy"] = m["fresh_put_1GB_gbps"] / m["fresh_copy_1GB_gbps"]
        self.verified["fresh_1GB"] = True
        self.log(f"   1 GB put on a fresh store: first {m['fresh_put_1GB_first_gbps']:.2f} GB/s "
                 f"({m['fresh_put_1GB_first_x_memcpy']:.2f}x memcpy into fresh pages, "
                 f"{m['fresh_copy_1GB_cold_gbps']:.2f} GB/s), warm {m['fresh_put_1GB_gbps']:.2f} GB/s "
                 f"({m['fresh_put_1GB_x_memcpy']:.2f}x memcpy into warm pages, {m['fresh_copy_1GB_gbps']:.2f} GB/s)")

    # ------------------------------------------------------------- numpy

    def copy_rows(self, sizes: Sequence[str] = ("100MB", "1GB")) -> None:
        """np.copyto of each large size into a warm destination (the physical limit of a put), and one cold
        of 1 GB (when 1 GB is among ``sizes``)."""
        for name in sizes:
            n = SIZES[name] // 8
            src = self.src[:n]
            dst = np.empty_like(src)
            dst.fill(0.0)  # fault every page in: the destination is warm
            t = []
            for _ in range(self.plan.copy_reps):
                t0 = time.perf_counter()
                np.copyto(dst, src)
                t.append(time.perf_counter() - t0)
            _expect(checksum(dst) == checksum(src), f"numpy copy of {name}")
            self.m[f"copy_{name}_gbps"] = SIZES[name] / median(t) / 1e9
            del dst
        if "1GB" not in sizes:
            self.log(f"   numpy copyto 100 MB: {self.m['copy_100MB_gbps']:.2f} GB/s warm")
            return
        cold = []
        for _ in range(2):
            dst = np.empty_like(self.src)  # fresh pages: every page faults on first write
            t0 = time.perf_counter()
            np.copyto(dst, self.src)
            cold.append(time.perf_counter() - t0)
            del dst
        self.m["copy_1GB_cold_gbps"] = SIZES["1GB"] / median(cold) / 1e9
        self.log(f"   numpy copyto 1 GB: {self.m['copy_1GB_gbps']:.2f} GB/s warm, "
                 f"{self.m['copy_1GB_cold_gbps']:.2f} GB/s into fresh pages")

    # ------------------------------------------------------------- small

    def small_rows(self, sys_: Any) -> None:
        """1 KB put loop, get loop, put+get loop (this process), and a get loop in a second process.

        A put loop's time runs until the store holds every object (``sync``): a
        put that returns before its object is stored is not counted as done.
        """
        p = self.plan
        x = self.src[: SIZES["1KB"] // 8]
        sync = getattr(sys_, "sync", lambda: None)
        warm = [sys_.put(x) for _ in range(p.small_warmup)]
        for r in warm:
            v = sys_.get(r)
            del v
        sync()
        sys_.free(warm)
        del warm
        put_ops, put_p50, get_ops, get_p50, pg_ops, pg_p50 = [], [], [], [], [], []
        for _ in range(p.small_reps):
            gc.collect()
            refs, lat = [], []
            t_start = time.perf_counter()
            for _ in range(p.small_ops):
                t0 = time.perf_counter()
                refs.append(sys_.put(x))
                lat.append(time.perf_counter() - t0)
            sync()
            wall = time.perf_counter() - t_start
            put_ops.append(p.small_ops / wall)
            put_p50.append(median(lat))
            lat = []
            t_start = time.perf_counter()
            for r in refs:
                t0 = time.perf_counter()
                v = sys_.get(r)
                lat.append(time.perf_counter() - t0)
            wall = time.perf_counter() - t_start
            get_ops.append(p.small_ops / wall)
            get_p50.append(median(lat))
            _expect(np.array_equal(v, x), "1 KB get")
            del v
            pg = []
            t_start = time.perf_counter()
            for _ in range(p.small_ops):
                t0 = time.perf_counter()
                r = sys_.put(x)
                v = sys_.get(r)
                pg.append(time.perf_counter() - t0)
                refs.append(r)
            sync()
            wall = time.perf_counter() - t_start
            pg_ops.append(p.small_ops / wall)
            pg_p50.append(median(pg))
            _expect(np.array_equal(v, x), "1 KB put+get")
            del v, r
            sys_.free(refs)
            del refs
        # the same objects read by another process on the node: through the store, never a local copy
        refs = [sys_.put(x) for _ in range(p.small_warmup + p.small_ops)]
        sync()
        out = sys_.reader_small(refs, p.small_warmup)
        _expect(out["checksum"] == checksum(x), "1 KB get in a second process")
        sys_.free(refs)
        del refs
        self.verified["1KB"] = True
        self.m.update({
            "put_1KB_ops": median(put_ops), "put_1KB_p50_us": median(put_p50) * 1e6,
            "get_1KB_ops": median(get_ops), "get_1KB_p50_us": median(get_p50) * 1e6,
            "putget_1KB_ops": median(pg_ops), "putget_1KB_p50_us": median(pg_p50) * 1e6,
            "reader_1KB_ops": len(out["get_s"]) / out["wall_s"], "reader_1KB_p50_us": median(out["get_s"]) * 1e6,
        })
        self.log(f"   1 KB: put {self.m['put_1KB_ops']:,.0f}/s, get {self.m['get_1KB_ops']:,.0f}/s, "
                 f"put+get {self.m['putget_1KB_ops']:,.0f}/s; get in a second process "
                 f"{self.m['reader_1KB_ops']:,.0f}/s")

    # ------------------------------------------------------------- large

    def large_rows(self, sys_: Any) -> None:
        p = self.plan
        for name in LARGE:
            size = SIZES[name]
            x = self.src[: size // 8]
            want = checksum(x)
            gc.collect()
            # the first put of this size since the store started: cold where the store's pages are
            t0 = time.perf_counter()
            r = sys_.put(x)
            cold = time.perf_counter() - t0
            g = timed_gets(sys_.get, r, p.get_reps[name])
            _expect(g["checksum"] == want, f"get of {name}")
            sys_.free([r])
            del r
            _settle(size)
            r = sys_.put(x)  # untimed: the pages the timed puts reuse have all been written once
            sys_.free([r])
            del r
            _settle(size)
            warm = []
            for i in range(p.put_reps[name]):
                t0 = time.perf_counter()
                r = sys_.put(x)
                warm.append(time.perf_counter() - t0)
                if i == 0:
                    v = sys_.get(r)
                    _expect(checksum(v) == want, f"get of {name} after a warm put")
                    # where the put's copy landed relative to its source, modulo a page: the
                    # bandwidth of memcpy depends on it (see aligned_copy_row)
                    self.m[f"put_{name}_dst_src_mod4096"] = (_address(v) - _address(x)) % 4096
                    del v
                sys_.free([r])
                del r
                _settle(size)
            self.verified[name] = True
            self.m[f"put_{name}_gbps"] = size / median(warm) / 1e9
            self.m[f"put_{name}_cold_gbps"] = size / cold / 1e9
            self.m[f"put_{name}_best_gbps"] = size / min(warm) / 1e9
            self.m[f"get_{name}_us"] = median(g["get_s"]) * 1e6
            self.m[f"get_{name}_first_us"] = g["first_s"] * 1e6
            self.log(f"   {name}: put {self.m[f'put_{name}_gbps']:.2f} GB/s warm, "
                     f"{self.m[f'put_{name}_cold_gbps']:.2f} GB/s first; get {self.m[f'get_{name}_us']:.0f} us")

    def aligned_copy_row(self) -> None:
        """np.copyto of 1 GB with the destination placed, relative to the source and modulo 4 KiB,
        where this system's 1 GB put placed it: memcpy's own speed for that placement."""
        rel = self.m.get("put_1GB_dst_src_mod4096")
        if rel is None:
            return
        x = self.src.view(np.uint8)
        n = x.nbytes
        raw = np.empty(n + 8192, dtype=np.uint8)
        raw.fill(0)  # warm
        o = (int(rel) + _address(x) - _address(raw)) % 4096
        dst = raw[o : o + n]
        t = []
        for _ in range(self.plan.copy_reps):
            t0 = time.perf_counter()
            np.copyto(dst, x)
            t.append(time.perf_counter() - t0)
        _expect(bool(np.array_equal(dst[:4096], x[:4096])) and bool(np.array_equal(dst[-4096:], x[-4096:])),
                "aligned numpy copy")
        self.m["copy_1GB_put_alignment_gbps"] = n / median(t) / 1e9
        del dst, raw
        self.log(f"   numpy copyto 1 GB with the put's placement (dst - src = {int(rel)} mod 4096): "
                 f"{self.m['copy_1GB_put_alignment_gbps']:.2f} GB/s")

    def reader_row(self, sys_: Any) -> None:
        """1 GB read by a second process on the same node."""
        x = self.src
        r = sys_.put(x)
        out = sys_.reader(r, self.plan.reader_gets)
        _expect(out["checksum"] == checksum(x), "1 GB get in a second process")
        sys_.free([r])
        del r
        self.verified["1GB second process"] = True
        self.m["reader_1GB_get_us"] = median(out["get_s"]) * 1e6
        self.m["reader_1GB_first_us"] = out["first_s"] * 1e6
        if "connect_s" in out:
            self.m["reader_connect_ms"] = out["connect_s"] * 1e3
        self.log(f"   1 GB in a second process: get {self.m['reader_1GB_get_us']:.0f} us "
                 f"(first {self.m['reader_1GB_first_us']:.0f} us)")

    def same_node_row(self, sys_: Any) -> None:
        """Same-node get from another process: an object of each size put here, read (zero-copy) by a second
        process on the same node; p50 of its gets (the value dropped before the next get)."""
        for size in self.plan.same_node_sizes:
            x = self.src[: SIZES[size] // 8]
            r = sys_.put(x)
            sync = getattr(sys_, "sync", None)
            if sync is not None:
                sync()
            out = sys_.reader(r, self.plan.same_node_gets)
            _expect(out["checksum"] == checksum(x), f"{size} get in a second process")
            sys_.free([r])
            del r
            _settle(SIZES[size])
            self.verified[f"{size} same-node get, second process"] = True
            self.m[f"same_node_{size}_p50_us"] = median(out["get_s"]) * 1e6
            lat = sorted(out["get_s"])
            self.m[f"same_node_{size}_p90_us"] = lat[int(0.9 * (len(lat) - 1))] * 1e6
            self.log(f"   same-node get from another process, {size}: p50 {self.m[f'same_node_{size}_p50_us']:.0f} us, "
                     f"p90 {self.m[f'same_node_{size}_p90_us']:.0f} us")

    def node_to_node_row(self, sys_: Any) -> None:
        pulls = sys_.node_to_node(self.src, self.plan.node_to_node_reps)
        want = checksum(self.src)
        for p in pulls:
            if p.get("checksum") is not None:
                _expect(p["checksum"] == want, "1 GB pulled from another node")
        _expect(any(p.get("checksum") is not None for p in pulls), "no pull was checked")
        self.verified["1GB node to node"] = True
        t = median([p["get_s"] for p in pulls])
        self.m["n2n_1GB_gbps"] = SIZES["1GB"] / t / 1e9
        self.m["n2n_1GB_s"] = t
        self.log(f"   1 GB node to node: {self.m['n2n_1GB_gbps']:.2f} GB/s ({t:.2f} s)")


    def remote_driver_row(self, sys_: Any) -> None:
        """100 MB put, then get, through a driver that maps no store memory (the bytes travel over gRPC):
        GB/s each way, medians of ``remote_reps`` pairs, every value read checked."""
        size = SIZES["100MB"]
        x = self.src[: size // 8]
        want = checksum(x)
        puts, gets = [], []
        for _ in range(self.plan.remote_reps):
            gc.collect()
            t0 = time.perf_counter()
            r = sys_.put(x)
            puts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            v = sys_.get(r)
            gets.append(time.perf_counter() - t0)
            _expect(checksum(v) == want, "100 MB get through a remote driver")
            del v
            sys_.free([r])
            del r
            _settle(size)
        self.verified["100MB remote driver"] = True
        self.m["remote_put_100MB_gbps"] = size / median(puts) / 1e9
        self.m["remote_get_100MB_gbps"] = size / median(gets) / 1e9
        self.log(f"   100 MB through a remote driver: put {self.m['remote_put_100MB_gbps']:.2f} GB/s, "
                 f"get {self.m['remote_get_100MB_gbps']:.2f} GB/s")


# ---------------------------------------------------------------------- Ray


class RaySystem:
    def __init__(self, ray: Any) -> None:
        self.ray = ray

        @ray.remote(num_cpus=0)
        def read(refs: list[Any], n: int) -> dict[str, Any]:
            return timed_gets(ray.get, refs[0], n)

        @ray.remote(num_cpus=0)
        def read_small(refs: list[Any], warmup: int) -> dict[str, Any]:
            return read_each(ray.get, refs, warmup)

        @ray.remote(num_cpus=0)
        def noop() -> int:
            return os.getpid()

        self._read, self._read_small, self._noop = read, read_small, noop

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def get(self, ref: Any) -> Any:
        return self.ray.get(ref)

    def free(self, refs: list[Any]) -> None:
        refs.clear()  # the last reference goes: Ray frees the object (asynchronously)

    def reader(self, ref: Any, n: int) -> dict[str, Any]:
        self.ray.get(self._noop.remote())  # a warm worker process, numpy imported
        return self.ray.get(self._read.remote([ref], n))  # in a list: the task gets the ref, not the value

    def reader_small(self, refs: list[Any], warmup: int) -> dict[str, Any]:
        self.ray.get(self._noop.remote())
        return self.ray.get(self._read_small.remote(list(refs), warmup))


def ray_client_row(ray: Any, w: Workload, memory: int) -> str:
    """The remote-driver row through Ray Client: a head with its client server, this process its client."""
    import socket

    from ray.cluster_utils import Cluster

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": memory, "include_dashboard": False, "ray_client_server_port": port})
    try:
        ray.init(f"ray://127.0.0.1:{port}", logging_level="warning")
        try:
            w.remote_driver_row(RaySystem(ray))
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
    return f"Ray Client: ray.init('ray://127.0.0.1:{port}') to a head (ray.cluster_utils.Cluster) on this machine"


def node_to_node(ray: Any, src: np.ndarray, reps: int, memory: int,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Two raylets on this machine (ray.cluster_utils.Cluster); the driver puts on the head, a task on node 2 gets."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": memory, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=memory, resources={"second_node": 1})
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        cluster.wait_for_nodes()
        head = ray.get_runtime_context().get_node_id()

        @ray.remote(num_cpus=0, resources={"second_node": 0.01})
        def pull(refs: list[Any], check: bool) -> dict[str, Any]:
            node = ray.get_runtime_context().get_node_id()
            t0 = time.perf_counter()
            v = ray.get(refs[0])
            dt = time.perf_counter() - t0
            return {"get_s": dt, "checksum": checksum(v) if check else None, "node": node}

        ray.get(pull.remote([ray.put(np.zeros(1))], False))  # a warm worker on node 2
        out = []
        for i in range(reps):
            ref = ray.put(src)
            r = ray.get(pull.remote([ref], i == 0))
            if r["node"] == head:
                raise SystemExit("the pull task ran on the head node")
            out.append(r)
            del ref
            log(f"   [ray] 1 GB node to node: {1e9 / r['get_s'] / 1e9:.2f} GB/s")
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


def fresh_put_main(ray: Any, w: Workload, log: Callable[[str], None]) -> int:
    """``--put-1gb``: ray.init with Ray's default object store size; its first put is 1 GB."""
    tmp = tempfile.mkdtemp(prefix="rayb-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    result: dict[str, Any] = {"system": "ray", "version": ray.__version__, "numpy": np.__version__}
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
        try:
            result["object_store_memory"] = int(ray.available_resources().get("object_store_memory", 0))
            s = RaySystem(ray)
            w.fresh_put_rows(s, lambda: ray.put(w.src))
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["metrics"] = w.m
    result["verified"] = w.verified
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory", type=int, default=int(2.5 * GIB), help="object_store_memory per node, bytes")
    ap.add_argument("--no-two-node", action="store_true", help="skip the two-raylet node-to-node row")
    ap.add_argument("--no-client", action="store_true", help="skip the Ray Client (remote driver) row")
    ap.add_argument("--put-1gb", action="store_true",
                    help="only the 1 GB put on a fresh ray.init with Ray's default object store size, beside memcpy")
    ap.add_argument("--only", choices=["same-node-get", "node-to-node", "client"],
                    help="run this row alone (client: the Ray Client / remote driver row)")
    ap.add_argument("--sizes", help="comma-separated sizes of the same-node get row (default: all)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import ray

    plan = Plan.quick() if args.quick else Plan()
    if args.sizes:
        plan.same_node_sizes = tuple(args.sizes.split(","))
    only = args.only
    t0 = time.perf_counter()
    nbytes = {"same-node-get": max(SIZES[s] for s in plan.same_node_sizes), "client": SIZES["100MB"]}
    src = source_array(nbytes.get(only or "", SIZES["1GB"]))
    log(f"   [ray] source array: {time.perf_counter() - t0:.1f} s")
    w = Workload(plan, src, log=lambda s: log("   [ray]" + s[2:]))
    if args.put_1gb:
        return fresh_put_main(ray, w, log)
    if only in (None, "client"):
        w.copy_rows(("100MB",) if only == "client" else ("100MB", "1GB"))
    # Ray's sessions, sockets and address file go under a directory of this run (short: socket paths
    # must stay under 108 bytes), not the machine's shared /tmp/ray
    tmp = tempfile.mkdtemp(prefix="rayb-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    result: dict[str, Any] = {"system": "ray", "version": ray.__version__, "numpy": np.__version__,
                              "object_store_memory": args.memory}
    try:
        if only in (None, "same-node-get"):
            t0 = time.perf_counter()
            ray.init(num_cpus=2, object_store_memory=args.memory, include_dashboard=False, log_to_driver=False,
                     logging_level="warning")
            result["init_s"] = time.perf_counter() - t0
            try:
                s = RaySystem(ray)
                if only is None:
                    w.small_rows(s)
                    w.large_rows(s)
                    w.aligned_copy_row()
                    w.reader_row(s)
                w.same_node_row(s)
            finally:
                ray.shutdown()
            result["reader"] = "a Ray task (a worker process on the same node), the refs passed inside a list"
        if only not in (None, "node-to-node"):
            pass
        elif args.no_two_node:
            result["node_to_node"] = "skipped (--no-two-node)"
        else:
            try:
                pulls = node_to_node(ray, src, plan.node_to_node_reps, args.memory, log)

                class _Pulls:
                    def node_to_node(self, value: Any, reps: int) -> list[dict[str, Any]]:
                        return pulls

                w.node_to_node_row(_Pulls())
                result["node_to_node"] = ("ray.cluster_utils.Cluster: head + a second raylet on 127.0.0.1, each "
                                          "with its own plasma store; driver puts on the head, a task on node 2 gets")
            except Exception as e:  # report the row as n/a, with the reason, rather than losing the others
                result["node_to_node"] = f"n/a: {type(e).__name__}: {e}"
                log(f"   [ray] node-to-node row failed: {e}")
        if only in (None, "client") and not args.no_client:
            try:
                result["remote_driver"] = ray_client_row(ray, w, args.memory)
            except Exception as e:  # e.g. no grpcio in this venv: the row is n/a, with the reason
                result["remote_driver"] = f"n/a: {type(e).__name__}: {e}"
                log(f"   [ray] Ray Client row failed: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["metrics"] = w.m
    result["verified"] = w.verified
    result["plan"] = asdict(plan)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
