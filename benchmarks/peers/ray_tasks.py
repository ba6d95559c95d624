"""The task benchmark's workload, and its Ray side.

    .venv-ray/bin/python benchmarks/peers/ray_tasks.py --json OUT [--quick]

``run(api, n)`` is the workload, written against the names Tessera shares with
Ray (``remote``, ``get``, ``wait``); benchmarks/tasks_bench.py runs the same
function with ``tessera`` as ``api``. Run as a script, it starts Ray
(``ray.init(num_cpus=2)``), times ``ray.init`` to the first result, measures the
idle memory of Ray's processes, runs the workload, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any


def pss_mib(pids: list[int]) -> float:
    """Proportional set size of ``pids`` in MiB (shared pages split between their users)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user and system) that ``pids`` used, with their children that already ended and were reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (not ``pid`` itself), each once."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out: dict[int, None] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p not in out:
            out[p] = None
            todo += children.get(p, [])
    return list(out)


def mapped_pss_mib(pids: list[int], marker: str) -> float:
    """PSS in MiB of the mappings of ``pids`` whose path contains ``marker`` (e.g. a shared-memory arena)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps") as f:
                inside = False
                for line in f:
                    if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
                        inside = marker in line
                    elif inside and line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def make(api: Any) -> dict[str, Any]:
    """The remote functions and actor class of the workload, declared through ``api``."""

    @api.remote
    def noop() -> None:
        return None

    @api.remote
    def parent(n: int) -> int:
        return len(api.get([noop.remote() for _ in range(n)]))

    @api.remote
    class Actor:
        def __init__(self) -> None:
            self.n = 0

        def call(self) -> int:
            self.n += 1
            return self.n

    @api.remote
    class AsyncActor:
        """Each call awaits a short sleep, so only calls that overlap finish 1,000 quickly."""

        async def call(self, delay_s: float) -> int:
            import asyncio

            await asyncio.sleep(delay_s)
            return 1

    @api.remote
    def produce(nbytes: int, value: int) -> Any:
        import numpy as np

        return np.full(nbytes, value, dtype=np.uint8)

    @api.remote
    def consume(a: Any) -> int:
        return int(a[::4096].sum())  # touches every page's first byte: the argument is really read

    return {"noop": noop, "parent": parent, "Actor": Actor, "AsyncActor": AsyncActor, "produce": produce,
            "consume": consume}


def _pcts(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": xs[len(xs) // 2] * 1e3, "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3}


def run(api: Any, n: int) -> dict[str, Any]:
    """Each row's figure for the system behind ``api`` (the best of three repetitions where it says so)."""
    f = make(api)
    noop, parent, actor_cls = f["noop"], f["parent"], f["Actor"]
    api.get([noop.remote() for _ in range(200)])  # warm the workers
    out: dict[str, Any] = {}

    rates = []
    for _ in range(3):
        t = time.perf_counter()
        api.get([noop.remote() for _ in range(n)])
        rates.append(n / (time.perf_counter() - t))
    out["tasks_async_per_s"] = max(rates)

    lat = []
    for _ in range(max(200, n // 10)):
        t = time.perf_counter()
        api.get(noop.remote())
        lat.append(time.perf_counter() - t)
    out["task_round_trip"] = _pcts(lat)

    a = actor_cls.remote()
    api.get(a.call.remote())
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        api.get([a.call.remote() for _ in range(n)])
        rates.append(n / (time.perf_counter() - t))
    out["actor_calls_async_per_s"] = max(rates)
    lat = []
    for _ in range(max(200, n // 10)):
        t = time.perf_counter()
        api.get(a.call.remote())
        lat.append(time.perf_counter() - t)
    out["actor_round_trip"] = _pcts(lat)

    # 1,000 calls in flight on one async actor (max_concurrency 1000, the default for async actors in both),
    # each awaiting 10 ms: the rate counts how well calls overlap and how cheaply each is carried.
    aa = f["AsyncActor"].remote()
    api.get(aa.call.remote(0.0))
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        assert sum(api.get([aa.call.remote(0.01) for _ in range(1000)])) == 1000
        rates.append(1000 / (time.perf_counter() - t))
    out["async_actor_1k_concurrent_per_s"] = max(rates)

    rates = []
    for _ in range(3):
        t = time.perf_counter()
        got = api.get([parent.remote(100) for _ in range(10)])
        assert got == [100] * 10
        rates.append(1010 / (time.perf_counter() - t))
    out["nested_10x100_tasks_per_s"] = max(rates)

    m = min(1000, n)
    t = time.perf_counter()
    pending = [noop.remote() for _ in range(m)]
    done = 0
    while pending:
        ready, pending = api.wait(pending, num_returns=1)
        done += len(ready)
    assert done == m
    out["wait_loop_1k_tasks_per_s"] = m / (time.perf_counter() - t)
    out.update(objects(api, f, quick=n < 10000))
    return out


def objects(api: Any, f: dict[str, Any], *, quick: bool) -> dict[str, Any]:
    """Objects that live and die: a task reading a 100 MB argument another task produced; puts and task
    results dropped in a loop (without freeing, the store fills, then spills)."""
    import numpy as np

    produce, consume = f["produce"], f["consume"]
    out: dict[str, Any] = {}
    lat = []
    for _ in range(5):
        r = produce.remote(100 * 2**20, 1)
        api.wait([r], num_returns=1)
        t = time.perf_counter()
        assert api.get(consume.remote(r)) == (100 * 2**20) // 4096
        lat.append(time.perf_counter() - t)
        del r
    out["task_reads_100mb_arg"] = _pcts(lat)
    loops = 50 if quick else 200
    a = np.ones(64 * 2**20, dtype=np.uint8)
    times = []
    t0 = time.perf_counter()
    for _ in range(loops):
        t = time.perf_counter()
        ref = api.put(a)
        del ref
        times.append(time.perf_counter() - t)
    out["puts_64mib_dropped"] = {"total_s": time.perf_counter() - t0, "loops": loops,
                                 "first_tenth_ms": 1e3 * sum(times[: loops // 10]) / (loops // 10),
                                 "last_tenth_ms": 1e3 * sum(times[-(loops // 10):]) / (loops // 10)}
    t0 = time.perf_counter()
    for i in range(loops):
        x = api.get(produce.remote(32 * 2**20, i % 250))
        assert x[0] == i % 250
        del x
    out["tasks_32mib_read_dropped_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import ray

    t = time.perf_counter()
    cpu0 = time.process_time()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @ray.remote
    def first() -> int:
        return 1

    assert ray.get(first.remote()) == 1
    cold = time.perf_counter() - t
    cold_cpu = time.process_time() - cpu0 + cpu_s(descendants(os.getpid()))
    time.sleep(3)  # idle
    pids = descendants(os.getpid())  # ray.init started them; another run's Ray on this machine is not ours
    idle = pss_mib(pids)
    res = run(ray, 2000 if args.quick else 10000)
    res.update(cold_start_s=cold, cold_start_cpu_s=cold_cpu, idle_memory_mib=idle, idle_processes=len(pids),
               version=ray.__version__, python=sys.version.split()[0])
    ray.shutdown()
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items()}, default=statistics.mean))


if __name__ == "__main__":
    main()
