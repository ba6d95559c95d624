"""Task benchmark: Tessera's tasks and actors beside Ray 2.60's, in one run.

    .venv/bin/python benchmarks/tasks_bench.py [--quick] [--json PATH] [--no-ray]

Tessera: ``tessera up`` (one node, 2 CPUs) in a temporary run directory; cold
start is ``tessera up`` plus ``tessera.init()`` to the first task's result. The
row below it is the CPU time (user and system) every process spent on that cold
start: the driver, ``tessera up`` and the whole stack (Ray: the driver and every
process its ``ray.init`` started). It depends little on other load of the
machine, which can stretch the wall-clock time several times over. Idle
memory is the proportional set size (PSS) of every process of the stack (NATS,
Redis, the supervisor, the six services, the node agent's workers), each counted
once, after a few idle seconds. The last two rows measure cold start and idle
memory again on ``tessera up --services control-store,object-store,task-scheduler``
(only what tasks and actors need); the rows above are the full stack.
Ray: benchmarks/peers/ray_tasks.py with Ray's own venv (.venv-ray), run after
Tessera is down; ``ray.init(num_cpus=2)`` to the first result, and the PSS of
every Ray process. Both run the same workload (``run`` in that file).

Nothing asserts on timings: figures are reported as measured, with the ratio
Tessera / Ray (for latencies and memory, lower is better).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_JSON = ROOT / "results" / "tasks.json"
RAY_PYTHON = REPO / ".venv-ray" / "bin" / "python"
PEER = ROOT / "peers" / "ray_tasks.py"
BIN = Path(sys.executable).parent


def _workload() -> Any:
    spec = importlib.util.spec_from_file_location("ray_tasks", PEER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ray_tasks"] = mod
    spec.loader.exec_module(mod)
    cloudpickle.register_pickle_by_value(mod)  # the workers cannot import it: ship its functions by value
    return mod


def _tree(work: Any, pids: list[int]) -> list[int]:
    """``pids`` and all their descendants, each once (a service is both listed and the supervisor's child)."""
    out = dict.fromkeys(pids)
    for pid in pids:
        out.update(dict.fromkeys(work.descendants(pid)))
    return list(out)


#: ``tessera up --services`` of the second, smaller stack measured: only what tasks and actors need.
TASK_SERVICES = "control-store,object-store,task-scheduler"


def tessera_side(n: int, work: Any, services: str | None = None) -> dict[str, Any]:
    """Cold start, idle memory and (with ``n``) the workload on ``tessera up`` (``--services services`` if given)."""
    run_dir = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_RUN_DIR=str(run_dir), TESSERA_NUM_CPUS="2")
    os.environ.update(TESSERA_RUN_DIR=str(run_dir))
    import tessera
    import tessera._api  # the SDK loaded before the clock starts, as Ray's side imports ray before its clock

    t = time.perf_counter()
    cpu0, cli0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    up = subprocess.run([str(BIN / "tessera"), "up", *(["--services", services] if services else [])], env=env,
                        capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        raise SystemExit(f"tessera up failed:\n{up.stdout}\n{up.stderr}")
    try:
        tessera.init(name="tasks-bench")

        @tessera.remote
        def first() -> int:
            return 1

        assert tessera.get(first.remote()) == 1
        cold = time.perf_counter() - t
        cluster = json.loads((run_dir / "cluster.json").read_text())
        cli = resource.getrusage(resource.RUSAGE_CHILDREN)  # `tessera up` (the supervisor it left is in the stack)
        cold_cpu = (time.process_time() - cpu0 + cli.ru_utime - cli0.ru_utime + cli.ru_stime - cli0.ru_stime
                    + work.cpu_s(_tree(work, [cluster["supervisor_pid"]])))
        time.sleep(3)
        cluster = json.loads((run_dir / "cluster.json").read_text())
        pids = _tree(work, [cluster["supervisor_pid"], *(p["pid"] for p in cluster["procs"] if p["pid"])])
        idle = work.pss_mib(pids)
        arena = work.mapped_pss_mib(pids, ".arena")  # the object store's shared memory (pages touched so far)
        res = work.run(tessera, n) if n else {}
        res.update(cold_start_s=cold, cold_start_cpu_s=cold_cpu, idle_memory_mib=idle, idle_processes=len(pids),
                   idle_memory_without_arena_mib=idle - arena, arena_mib=arena)
        return res
    finally:
        tessera.shutdown()
        subprocess.run([str(BIN / "tessera"), "down"], env=env, capture_output=True, timeout=120)


def ray_side(quick: bool) -> dict[str, Any] | None:
    if not RAY_PYTHON.exists():
        print("Ray's venv is missing (make .venv-ray/bin/python): Ray column skipped", file=sys.stderr)
        return None
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [str(RAY_PYTHON), str(PEER), "--json", f.name, *(["--quick"] if quick else [])]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            print(f"Ray side failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", file=sys.stderr)
            return None
        return json.loads(Path(f.name).read_text())


ROWS = [
    ("no-op tasks, submit all then get (tasks/s)", ("tasks_async_per_s",), True),
    ("task round trip p50 (ms)", ("task_round_trip", "p50_ms"), False),
    ("task round trip p99 (ms)", ("task_round_trip", "p99_ms"), False),
    ("actor calls, submit all then get (calls/s)", ("actor_calls_async_per_s",), True),
    ("actor round trip p50 (ms)", ("actor_round_trip", "p50_ms"), False),
    ("1,000 concurrent calls on an async actor, 10 ms each (calls/s)", ("async_actor_1k_concurrent_per_s",), True),
    ("nested 10x100 (tasks/s)", ("nested_10x100_tasks_per_s",), True),
    ("wait(num_returns=1) loop over 1k (tasks/s)", ("wait_loop_1k_tasks_per_s",), True),
    ("task reading a 100 MB argument a task made, p50 (ms)", ("task_reads_100mb_arg", "p50_ms"), False),
    ("puts of 64 MiB, each ref dropped (s, all)", ("puts_64mib_dropped", "total_s"), False),
    ("  ... the last tenth's puts (ms each)", ("puts_64mib_dropped", "last_tenth_ms"), False),
    ("tasks returning 32 MiB, each read then dropped (s, all)", ("tasks_32mib_read_dropped_s",), False),
    ("cold start to first result (s)", ("cold_start_s",), False),
    ("  ... CPU time it took, all processes (s)", ("cold_start_cpu_s",), False),
    ("idle memory of the stack (MiB PSS)", ("idle_memory_mib",), False),
    ("  ... without the object arena's pages", ("idle_memory_without_arena_mib",), False),
    ("cold start, task services only (s)", ("task_services", "cold_start_s"), False),
    ("  ... CPU time it took, all processes (s)", ("task_services", "cold_start_cpu_s"), False),
    ("idle memory, task services only (MiB PSS)", ("task_services", "idle_memory_mib"), False),
]


def _get(d: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    for k in path:
        if d is None:
            return None
        d = d.get(k)  # type: ignore[assignment]
    return float(d) if d is not None else None  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2k tasks per row instead of 10k")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    work = _workload()
    n = 2000 if args.quick else 10000
    ours = tessera_side(n, work)
    ours["task_services"] = tessera_side(0, work, TASK_SERVICES)
    theirs = None if args.no_ray else ray_side(args.quick)
    print(f"{'row':48} {'Tessera':>10} {'Ray 2.60':>10} {'ratio':>7}  better")
    rows = []
    for label, path, higher in ROWS:
        a, b = _get(ours, path), _get(theirs, path)
        if path == ("idle_memory_without_arena_mib",):
            b = _get(theirs, ("idle_memory_mib",))  # Ray's object store is not touched up front
        elif path[0] == "task_services":
            b = _get(theirs, path[1:])  # Ray starts what it starts
        ratio = a / b if a is not None and b else None
        rows.append({"row": label, "tessera": a, "ray": b, "ratio": ratio, "higher_is_better": higher})
        fa = f"{a:10.2f}" if a is not None else f"{'-':>10}"
        fb = f"{b:10.2f}" if b is not None else f"{'-':>10}"
        fr = f"{ratio:7.2f}" if ratio is not None else f"{'-':>7}"
        print(f"{label:48} {fa} {fb} {fr}  {'higher' if higher else 'lower'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "tessera": ours, "ray": theirs, "tasks_per_row": n,
                                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
