"""GPU scheduler figures measured on real jobs (torch on CPU here):

1. suspend + resume latency of a ResNet-18-sized job (11.7M parameters + SGD momentum) through
   the tessera.gpu hook: checkpoint to the node-local ramdisk at a mini-batch boundary, then restore;
2. packing: throughput of two small training jobs sharing one slot vs each alone;
3. the simulator on both Pollux traces (64 GPUs, 4 per node): gandiva vs LAS vs FIFO;
4. with --live: migration of a ResNet-18-sized job between the node agents of a
   `tessera up --nodes 2 --gpus-per-node 1` stack (started and stopped by the benchmark): from the
   MigrateJob call to the job's first mini-batch on the other node, with the target process started
   while the source checkpoints vs. once it has exited (the peer, a second stack in the same run), and
   the median time of each step (the scheduler's and agents' timeline log lines): decided, stop,
   checkpoint written, uploaded, source exited; target start command, process, waiting (model built),
   checkpoint fetched, restore begun and done, first mini-batch.

    .venv/bin/python benchmarks/gpu_scheduler_bench.py [--repeat 5] [--live] [--only suspend migration ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "services" / "gpu-scheduler" / "traces"


def suspend_resume(repeat: int) -> dict[str, float]:
    import torch

    from tessera.gpu import _ckpt
    from tessera.gpu._job import Job
    from tessera.gpu_scheduler.examples import resnet18_like

    model = resnet18_like()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    opt.step()
    d = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    job = Job(model=model, optimizer=opt, env={"TESSERA_GPU_JOB_ID": "bench", "TESSERA_GPU_CKPT_DIR": str(d / "tessera-gpu-bench")})
    fresh_model = resnet18_like()
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.01, momentum=0.9)
    fresh_job = Job(model=fresh_model, optimizer=fresh_opt, env={"TESSERA_GPU_JOB_ID": "bench-fresh"})
    saves, loads, fresh = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        path = job.checkpoint()
        t1 = time.perf_counter()
        job.restore_in_place(path)
        t2 = time.perf_counter()
        fresh_job.load_state(_ckpt.load(path))  # what a new process on another node does (migration)
        t3 = time.perf_counter()
        saves.append(t1 - t0)
        loads.append(t2 - t1)
        fresh.append(t3 - t2)
    size = path.stat().st_size
    import shutil

    shutil.rmtree(job.ckpt_dir, ignore_errors=True)
    # the peer: torch.save / torch.load of the same state to the same ramdisk
    ts, tl = [], []
    for _ in range(repeat):
        p = d / "tessera-gpu-bench-peer.pt"
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, p)
        t1 = time.perf_counter()
        st = torch.load(p)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        t2 = time.perf_counter()
        ts.append(t1 - t0)
        tl.append(t2 - t1)
        p.unlink()
    return {"params_m": params / 1e6, "checkpoint_mb": size / 2**20,
            "suspend_ms": 1e3 * statistics.median(saves), "resume_ms": 1e3 * statistics.median(loads),
            "suspend_resume_ms": 1e3 * (statistics.median(saves) + statistics.median(loads)),
            "fresh_load_ms": 1e3 * statistics.median(fresh),
            "torch_save_load_ms": 1e3 * (statistics.median(ts) + statistics.median(tl))}


def restart(repeat: int) -> dict[str, float]:
    """A migrated job's restart on its new node, from the checkpoint to "restored" (model built, optimizer
    made, state loaded): in a ready runner (torch and the first optimizer's lazy imports already paid) vs
    in a freshly started process (the peer), both measured here."""
    import asyncio

    import torch

    from tessera.gpu._job import Job
    from tessera.gpu_scheduler.examples import resnet18_like
    from tessera.gpu_scheduler.executors import spawn_process

    d = Path(tempfile.mkdtemp(prefix="tessera-gpu-restart-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    torch.manual_seed(0)
    model = resnet18_like(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    job = Job(model=model, optimizer=opt, env={"TESSERA_GPU_JOB_ID": "r", "TESSERA_GPU_CKPT_DIR": str(d)})
    ckpt = job.checkpoint()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACEPARENT", "TRACESTATE"))}
    job_env = {"TESSERA_GPU_JOB_ID": "r", "TESSERA_GPU_CKPT_DIR": str(d), "TESSERA_GPU_RESTORE": str(ckpt),
               "TESSERA_GPU_ENTRY": "tessera.gpu_scheduler.examples:train_resnet", "TESSERA_GPU_ARGS": json.dumps(["0"])}

    async def until(reader: asyncio.StreamReader, event: str) -> None:
        while line := await reader.readline():
            if json.loads(line)["event"] == event:
                return
        raise RuntimeError(f"the job process ended before {event!r}; see {d / 'r.log'}")

    async def reports(run: Any) -> tuple[asyncio.StreamReader, Any]:
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(run.report_fd, "rb", 0))
        return reader, transport

    async def ready_runner() -> float:
        run = await spawn_process({**env, "TESSERA_GPU_WARM": "1"}, d / "r.log")
        reader, transport = await reports(run)
        await until(reader, "ready")
        t0 = time.perf_counter()
        run.send(json.dumps({"env": job_env}))
        await until(reader, "restored")
        dt = time.perf_counter() - t0
        await run.wait()
        transport.close()
        return dt

    async def fresh() -> float:
        t0 = time.perf_counter()
        run = await spawn_process({**env, **job_env}, d / "r.log")
        reader, transport = await reports(run)
        await until(reader, "restored")
        dt = time.perf_counter() - t0
        await run.wait()
        transport.close()
        return dt

    warm = [asyncio.run(ready_runner()) for _ in range(repeat)]
    cold = [asyncio.run(fresh()) for _ in range(repeat)]
    import shutil

    shutil.rmtree(d, ignore_errors=True)
    return {"ready_runner_s": statistics.median(warm), "fresh_process_s": statistics.median(cold)}


def _train_proc(steps: int, seed: int, threads: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TESSERA_GPU_ENTRY="tessera.gpu_scheduler.examples:train",
               TESSERA_GPU_ARGS=json.dumps([str(steps), str(seed)]))
    return subprocess.Popen([sys.executable, "-c", "import torch, time, sys; torch.set_num_threads(int(sys.argv[1]));"
                             "from tessera.gpu._runner import main; t=time.perf_counter(); main(); print(time.perf_counter()-t)",
                             str(threads)], env=env, stdout=subprocess.PIPE)


def packing(steps: int) -> dict[str, float]:
    alone = []
    for seed in (0, 1):
        p = _train_proc(steps, seed, 1)
        alone.append(float(p.communicate()[0]))
    ps = [_train_proc(steps, s, 1) for s in (0, 1)]
    packed = [float(p.communicate()[0]) for p in ps]
    solo_rate = statistics.fmean(steps / t for t in alone)
    combined = sum(steps / t for t in packed)
    return {"alone_steps_s": solo_rate, "packed_combined_steps_s": combined, "packing_gain": combined / solo_rate}


def simulate() -> list[dict[str, object]]:
    from tessera.gpu_scheduler.policy import make_policy
    from tessera.gpu_scheduler.simulator import simulate as sim
    from tessera.gpu_scheduler.trace import read_trace

    out = []
    for f in sorted(TRACES.glob("*.csv")):
        trace = read_trace(f)
        for pol in ("fifo", "las", "gandiva"):
            r = sim(trace, make_policy(pol), gpus=64, gpus_per_node=4, seed=0).summary()
            r["trace"] = f.name
            out.append(r)
    return out


TIMELINE = re.compile(r"job (\w+) timeline (\w+) ([0-9.]+)")
SOURCE_EVENTS = ("decided", "stop", "checkpoint_begin", "checkpointed", "uploaded", "exited")
TARGET_EVENTS = ("start", "process", "waiting", "fetched", "restore_begin", "restored", "first_step")


def _timeline(run_dir: Path, jid: str, t0: float, t1: float) -> dict[str, float]:
    """The migration's timestamps (scheduler and node agents' timeline log lines) between t0 and t1, relative to t0:
    the source's ``stop`` to ``exited`` as ``src.*``, the target's ``start`` to ``first_step`` as ``dst.*``."""
    out: dict[str, float] = {}
    for log_file in sorted((run_dir / "logs").glob("gpu-*.log")):
        marks = [(ev, float(t)) for j, ev, t in TIMELINE.findall(log_file.read_text(errors="replace"))
                 if j == jid and t0 <= float(t) <= t1]
        events = {ev for ev, _ in marks}
        role = "src" if "stop" in events or "decided" in events else "dst" if "start" in events else ""
        for ev, t in marks:
            if role and f"{role}.{ev}" not in out:
                out[f"{role}.{ev}"] = t - t0
    return out


def migration(repeat: int, *, ahead: bool = True, deadline_s: float = 120.0) -> dict[str, Any]:
    """Migrations of a ResNet-18-sized job between the two node agents of a fresh stack: the MigrateJob call to
    the job's first mini-batch on the other node, seen through GetJob. ``ahead``: the scheduler starts the target
    process while the source checkpoints (TESSERA_GPU_SCHEDULER_MIGRATE_AHEAD); else only once the source exited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    run_dir = Path(tempfile.mkdtemp(prefix="tessera-gpu-bench-"))
    env.update(TESSERA_RUN_DIR=str(run_dir), OTEL_TRACES_EXPORTER="none", TESSERA_OBJECT_STORE_MEMORY=str(512 * 2**20),
               TESSERA_GPU_SCHEDULER_TICK_S="0.05", TESSERA_GPU_SCHEDULER_MIGRATE_AHEAD=str(ahead).lower())
    tessera = str(Path(sys.executable).parent / "tessera")
    up = subprocess.run([tessera, "up", "--nodes", "2", "--gpus-per-node", "1"], env=env, capture_output=True, text=True)
    if up.returncode:
        raise SystemExit(f"tessera up failed: {up.stderr}")
    old_run_dir = os.environ.get("TESSERA_RUN_DIR")
    os.environ["TESSERA_RUN_DIR"] = str(run_dir)
    from tessera.gpu import GpuClient

    times: list[float] = []
    marks: list[dict[str, float]] = []
    lost = 0  # migrations whose job went on from an older checkpoint than the stop's
    try:
        with GpuClient() as c:
            deadline = time.monotonic() + 60
            while sum(n.alive for n in c.cluster().nodes) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            jid = c.submit(entry_point="tessera.gpu_scheduler.examples:train_resnet", args=["100000", "0"])
            while c.status(jid).step < 3:
                time.sleep(0.05)
            for _ in range(repeat):
                # let the destination's ready runner come up (it imports torch once the node's jobs made their first
                # mini-batch: seconds on a loaded host); without one, the target's start-up is a fresh process's
                time.sleep(8.0)
                info = c.status(jid)
                node, step = info.node_id, info.step
                w0, t0 = time.time(), time.perf_counter()
                c.migrate(jid)
                while True:
                    info = c.status(jid)
                    if info.node_id not in ("", node) and info.state == 2 and info.step > info.checkpoint_step:
                        break
                    if time.perf_counter() - t0 > deadline_s:
                        raise SystemExit(f"migration not done after {deadline_s:g}s: {info}; logs in {run_dir}")
                    time.sleep(0.01)
                times.append(time.perf_counter() - t0)
                lost += info.checkpoint_step < step
                time.sleep(0.5)  # the last timeline lines reach the logs
                marks.append(_timeline(run_dir, jid, w0, time.time()))
            c.kill(jid)
    finally:
        subprocess.run([tessera, "down"], env=env, capture_output=True)
        if old_run_dir is None:
            os.environ.pop("TESSERA_RUN_DIR", None)
        else:
            os.environ["TESSERA_RUN_DIR"] = old_run_dir
    keys = [f"src.{e}" for e in SOURCE_EVENTS] + [f"dst.{e}" for e in TARGET_EVENTS]
    phases = {k: statistics.median(m[k] for m in marks if k in m) for k in keys if any(k in m for m in marks)}
    return {"migration_s_median": statistics.median(times), "migration_s_min": min(times), "lost_checkpoints": lost,
            "phases": phases, "times": sorted(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--live", action="store_true", help="also time migrations between two node agents")
    ap.add_argument("--only", nargs="+", choices=("suspend", "restart", "packing", "migration", "simulate"),
                    help="run only these parts (migration implies --live)")
    args = ap.parse_args()
    parts = set(args.only or ("suspend", "restart", "packing", "simulate", *(("migration",) if args.live else ())))
    if "suspend" in parts:
        sr = suspend_resume(args.repeat)
        print(f"suspend/resume, ResNet-18-sized ({sr['params_m']:.1f}M params, checkpoint {sr['checkpoint_mb']:.0f} MiB incl. momentum):"
              f" suspend {sr['suspend_ms']:.1f} ms + resume {sr['resume_ms']:.1f} ms = {sr['suspend_resume_ms']:.1f} ms"
              f" (torch.save + torch.load of the same state: {sr['torch_save_load_ms']:.1f} ms); "
              f"restoring it into a freshly built model and optimizer, as a migrated process does: {sr['fresh_load_ms']:.1f} ms")
    if "restart" in parts:
        rs = restart(args.repeat)
        print(f"restart of a migrated ResNet-18-sized job, checkpoint to restored: in the node's ready runner "
              f"{rs['ready_runner_s']:.2f} s, in a fresh process {rs['fresh_process_s']:.2f} s "
              f"(x{rs['fresh_process_s'] / rs['ready_runner_s']:.1f})")
    if "packing" in parts:
        pk = packing(args.steps)
        print(f"packing two tiny jobs on one slot: alone {pk['alone_steps_s']:.0f} steps/s, packed combined "
              f"{pk['packed_combined_steps_s']:.0f} steps/s (gain x{pk['packing_gain']:.2f})")
    if "migration" in parts:
        # the peer, measured in the same run: the target started only once the source has exited
        for ahead in (True, False):
            mg = migration(args.repeat, ahead=ahead)
            how = "target started ahead, waiting for the checkpoint" if ahead else "target started after the source exited"
            print(f"migration of a ResNet-18-sized job between two node agents ({how}): median "
                  f"{mg['migration_s_median']:.2f} s, best {mg['migration_s_min']:.2f} s (MigrateJob call to first "
                  f"mini-batch on the other node, seen through GetJob); {mg['lost_checkpoints']} restarted from an "
                  f"older checkpoint than the stop's; all: {' '.join(f'{t:.2f}' for t in mg['times'])}")
            print("  medians after the call, s: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                               sorted(mg["phases"].items(), key=lambda kv: kv[1])))
    if "simulate" in parts:
        for r in simulate():
            print(f"{r['trace']} {r['policy']:8s} avg JCT {r['avg_jct_h']:.2f} h, median {r['median_jct_h']:.2f}, p95 "
                  f"{r['p95_jct_h']:.2f}, makespan {r['makespan_h']:.1f} h, utilization {r['utilization']:.3f}, "
                  f"allocation while jobs wait {r['allocation_while_waiting']:.3f}, queueing {r['avg_queueing_delay_h']:.2f} h, "
                  f"time to first feedback {r['avg_time_to_first_feedback_h']:.2f} h")


if __name__ == "__main__":
    main()
