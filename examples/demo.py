"""The Tessera demo: bring the platform up, write, read back and watch a record,
move objects through shared memory and between two nodes, then run tasks and train
a policy with rollout actors and a parameter server.

    python examples/demo.py [--keep]

Uses the cluster that ``tessera up`` started if one is running; otherwise starts
one (embedded NATS and Redis, all six services) and stops it at the end unless
``--keep``. With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (e.g. Jaeger on :4317) the
trace printed at the end can be opened in Jaeger.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from opentelemetry import trace

import tessera
from tessera.common.telemetry import current_trace_id, setup_tracing, shutdown_tracing

BIN = Path(sys.executable).parent


def tessera_cli(*args: str) -> int:
    return subprocess.call([str(BIN / "tessera"), *args])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = ap.parse_args()

    started_here = False
    if tessera_cli("status") != 0:
        print("== bringing Tessera up")
        if tessera_cli("up", "--nodes", "2", "--gpus-per-node", "1") != 0:
            return 1
        started_here = True
    try:
        return run_demo()
    finally:
        if started_here and not args.keep:
            print("\n== stopping Tessera")
            tessera_cli("down")


def run_demo() -> int:
    setup_tracing("tessera-demo")
    tracer = trace.get_tracer("tessera.demo")
    client = tessera.connect()
    print(f"\n== connected to the control store at {client.address}")
    services = sorted({i.service for i in client.instances()})
    print(f"   registered services: {', '.join(services)}")

    namespace, key = "demo", f"greeting-{os.getpid()}".encode()
    seen: list[tessera.Event] = []
    ready = threading.Event()

    def watch() -> None:
        for event in client.watch("kv", namespace=namespace, timeout=10, ready=ready):
            if event.key == key:
                seen.append(event)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if not ready.wait(10):
        print("the watch did not start", file=sys.stderr)
        return 1

    with tracer.start_as_current_span("demo: write, read back, watch"):
        trace_id = current_trace_id()
        t0 = time.perf_counter()
        created = client.kv_put(namespace, key, b"hello from tessera")
        value = client.kv_get(namespace, key)
        watcher.join(10)
        elapsed = (time.perf_counter() - t0) * 1000

    print(f"\n== wrote {namespace}/{key.decode()} (new: {created}), read back {value!r}")
    if not seen:
        print("the change event did not arrive", file=sys.stderr)
        return 1
    ev = seen[0]
    print(f"   watched: tessera.events.kv.{ev.namespace}.{ev.op} key={ev.key.decode()} value={ev.value!r}")
    client.kv_delete(namespace, key)
    client.close()

    steps: list[tuple[str, str, float, str]] = []

    def step(name: str, service: str, fn: Any, result: Any) -> None:
        t = time.perf_counter()
        out = fn()
        steps.append((name, service, time.perf_counter() - t, result(out)))

    step("objects: 64 MiB put, zero-copy get, pull to node 2", "object-store", run_objects,
         lambda o: f"put {o['put_gbs']:.1f} GB/s, get {o['get_us']:.0f} us"
                   + (f", pull {o['pull_gbs']:.2f} GB/s" if "pull_gbs" in o else ""))
    step("tasks and actors: ES on CartPole", "task-scheduler", run_tasks,
         lambda o: f"return {o['score']:.0f} after {o['iterations']} iterations, 100 tasks in {o['tasks_s'] * 1e3:.0f} ms")
    step("compile a CNN, run it on the service", "compiler", lambda: _step("compiler_demo", "compiler"),
         lambda o: "ran; figures above")
    step("two training jobs time-sliced on one GPU slot", "gpu-scheduler", lambda: _step("gpu_demo", "gpu"),
         lambda o: "ran; job states above")
    step("register and query pipelines", "serving", lambda: _step("serving_demo", "serving"),
         lambda o: f"equals scikit-learn: {o.get('matches_sklearn')}" if isinstance(o, dict) else "answered")
    shutdown_tracing()

    print("\n== summary")
    print(f"   services SERVING : {len(services)}; write+read+event {elapsed:.1f} ms")
    width = max(len(n) for n, *_ in steps)
    print(f"   {'step'.ljust(width)}  {'service':14} {'time':>7}  result")
    for name, service, dt, result in steps:
        print(f"   {name.ljust(width)}  {service:14} {dt:6.1f}s  {result}")
    print(f"   trace id: {trace_id}")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        print(f"   spans exported to {endpoint}; in Jaeger: http://localhost:16686/trace/{trace_id}")
    else:
        print("   (set OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 with Jaeger running to see the trace)")
    return 0


def _step(module: str, service: str) -> Any:
    """Run ``examples/<module>.py``'s ``run(print_row)``."""
    import importlib

    print(f"\n== {service}")
    return importlib.import_module(module).run(lambda *parts: print("   " + str(parts[-1]).strip("\n"), flush=True))


def run_tasks() -> dict[str, float]:
    """Tasks fan out; rollout actors and a parameter-server actor train a policy (examples/rl_rollouts.py)."""
    import rl_rollouts

    print("\n== tasks and actors: evolution strategies on CartPole")
    tessera.init(name="tessera-demo")
    try:
        summary: dict[str, float] = rl_rollouts.run(lambda line: print(line, flush=True))
    finally:
        tessera.shutdown()
    if summary["score"] < 195:
        raise RuntimeError(f"training stopped at mean return {summary['score']:.0f} (target 195)")
    return summary


def run_objects() -> dict[str, float | bool]:
    """Put a numpy array, read it back zero-copy, and pull it to a second node if there is one."""
    import numpy as np

    from tessera._launcher.rundir import RunDir
    from tessera.common.config import Settings

    out: dict[str, float | bool] = {}
    data = np.random.default_rng(0).random(8 * 2**20)  # 64 MiB
    print("\n== objects")
    with tessera.ObjectStoreClient(tessera._objects.local_object_store_address()) as store:
        store.put(data)  # warm the arena pages once
        t0 = time.perf_counter()
        ref = store.put(data)
        t1 = time.perf_counter()
        view = store.get(ref)
        t2 = time.perf_counter()
        out.update(put_ms=(t1 - t0) * 1e3, put_gbs=data.nbytes / (t1 - t0) / 1e9, get_us=(t2 - t1) * 1e6,
                   zero_copy=bool(np.shares_memory(view, store._arena) and not view.flags.writeable))
        print(f"   put {ref} ({data.nbytes >> 20} MiB), read back: equal={np.array_equal(view, data)}")
        cluster = RunDir(Settings().run_dir).read()
        other = cluster.services.get("object-store-1") if cluster else None
        if other:
            with tessera.ObjectStoreClient(str(other["address"])) as remote:
                t0 = time.perf_counter()
                copy = remote.get(ref, timeout=60)
                dt = time.perf_counter() - t0
                out.update(pull_ms=dt * 1e3, pull_gbs=data.nbytes / dt / 1e9)
                print(f"   node {str(other['node_id'])[:8]} pulled it: equal={np.array_equal(copy, data)}")
                del copy
        del view
    return out


if __name__ == "__main__":
    sys.exit(main())
