"""``tessera gpu ...``: the gpu-scheduler's subcommands of the ``tessera`` CLI.

    tessera gpu simulate --trace FILE [--policy gandiva|fifo|las|all] --gpus N [--json] [--plot PNG]
    tessera gpu submit --entry MODULE:FUNC [--gpus G] [--priority P] [--group ID] [--time-limit S]
    tessera gpu list | nodes | status JOB | kill JOB | suspend JOB | resume JOB | migrate JOB [--node NODE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

EXIT_OK, EXIT_FAIL = 0, 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> Callable[[argparse.Namespace], int]:
    gpu = sub.add_parser("gpu", help="GPU jobs: submit, list, kill; simulate policies over a trace")
    gsub = gpu.add_subparsers(dest="gpu_command", required=True)
    from tessera.gpu_scheduler.simulator import METRICS

    sim = gsub.add_parser("simulate", help="replay a trace CSV through one or more policies", epilog=METRICS,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--trace", required=True, help="CSV: name,time,application,num_replicas,batch_size")
    sim.add_argument("--policy", default="all", help="gandiva, fifo, las, a comma-separated list, or all")
    sim.add_argument("--gpus", type=int, required=True, help="GPUs in the simulated cluster")
    sim.add_argument("--gpus-per-node", type=int, default=4)
    sim.add_argument("--quantum", type=float, default=60.0, help="seconds of a time slice")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", action="store_true")
    sim.add_argument("--plot", default="", help="write a JCT CDF (PNG) comparing the policies")
    sm = gsub.add_parser("submit", help="submit a job")
    sm.add_argument("--entry", default="", help="MODULE:FUNCTION or path/to/file.py:FUNCTION")
    sm.add_argument("--image", default="", help="container image (Docker executor)")
    sm.add_argument("--name", default="")
    sm.add_argument("--gpus", type=int, default=1)
    sm.add_argument("--priority", type=int, default=0)
    sm.add_argument("--group", default="")
    sm.add_argument("--time-limit", type=float, default=0.0)
    sm.add_argument("args", nargs="*", help="arguments (or the container command)")
    gsub.add_parser("list", help="all jobs")
    gsub.add_parser("nodes", help="node agents, their GPUs and jobs")
    for verb in ("status", "kill", "suspend", "resume", "migrate"):
        p = gsub.add_parser(verb, help=f"{verb} a job")
        p.add_argument("job_id")
        if verb == "migrate":
            p.add_argument("--node", default="", help="target node id (hex); default: any other node")
    return _run


def _run(args: argparse.Namespace) -> int:
    if args.gpu_command == "simulate":
        return _simulate(args)
    return _jobs(args)


def _simulate(args: argparse.Namespace) -> int:
    from tessera.common.progress import Progress
    from tessera.gpu_scheduler.policy import POLICIES, make_policy
    from tessera.gpu_scheduler.simulator import simulate
    from tessera.gpu_scheduler.trace import TraceError, read_trace

    names = list(POLICIES) if args.policy == "all" else [p.strip() for p in args.policy.split(",") if p.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        print(f"tessera gpu simulate: unknown policy {', '.join(bad) or args.policy!r}; choose from {', '.join(POLICIES)} or all",
              file=sys.stderr)
        return EXIT_FAIL
    try:
        trace = read_trace(args.trace)
        results = []
        for n in names:  # a bar per policy on a terminal (stderr), nothing under --json or in a pipe
            progress = Progress(len(trace), stream=sys.stderr, quiet=args.json, label=f"simulating {n}")
            results.append(simulate(trace, make_policy(n, quantum=args.quantum), gpus=args.gpus,
                                    gpus_per_node=args.gpus_per_node, seed=args.seed,
                                    on_progress=lambda k, _total, p=progress: p.update(k, "jobs done")))
            progress.clear()
    except (TraceError, ValueError) as e:
        print(f"tessera gpu simulate: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps({"trace": args.trace, "gpus": args.gpus, "seed": args.seed,
                          "results": [r.summary() for r in results]}, indent=2))
    else:
        cols = [("policy", "{}"), ("avg_jct_h", "{:.2f}"), ("median_jct_h", "{:.2f}"), ("p95_jct_h", "{:.2f}"),
                ("makespan_h", "{:.2f}"), ("utilization", "{:.3f}"), ("allocation_while_waiting", "{:.3f}"),
                ("avg_queueing_delay_h", "{:.2f}"), ("avg_time_to_first_feedback_h", "{:.2f}"),
                ("suspensions", "{}"), ("migrations", "{}"), ("packings", "{}")]
        rows = [[f.format(getattr(r, c)) for c, f in cols] for r in results]
        width = [max(len(c), *(len(row[i]) for row in rows)) for i, (c, _) in enumerate(cols)]
        print(f"trace {args.trace}: {results[0].jobs} jobs, {results[0].groups} groups, {args.gpus} GPUs")
        print("  ".join(c.ljust(w) for (c, _), w in zip(cols, width, strict=True)))
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, width, strict=True)))
    if args.plot:
        try:
            _plot(results, args.plot, title=f"{args.trace} on {args.gpus} GPUs")
        except ImportError:
            print("tessera gpu simulate: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return EXIT_FAIL
        print(f"JCT CDF written to {args.plot}", file=sys.stderr)
    return EXIT_OK


def _plot(results: list, path: str, *, title: str) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs = sorted(r.jcts_h)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{r.policy} (avg {r.avg_jct_h:.2f} h)")
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (h)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jobs(args: argparse.Namespace) -> int:
    import grpc

    from tessera.gpu.client import GpuClient, job_to_dict

    try:
        with GpuClient() as c:
            cmd = args.gpu_command
            if cmd == "submit":
                job_id = c.submit(entry_point=args.entry, image=args.image, args=list(args.args), gpus=args.gpus,
                                  priority=args.priority, group=args.group, time_limit_s=args.time_limit, name=args.name)
                print(job_id)
            elif cmd == "list":
                for j in c.list():
                    d = job_to_dict(j)
                    print(f"{d['job_id']}  {d['state']:<10} gpus={d['gpus']} node={str(d['node_id'])[:8]} step={d['step']} {d['name']}")
            elif cmd == "nodes":
                cl = c.cluster()
                print(f"policy {cl.policy}")
                for n in cl.nodes:
                    print(f"{n.node_id[:8]}  {'alive' if n.alive else 'DEAD '}  {n.gpus} {n.kind} GPU(s)  jobs: {', '.join(n.job_ids) or '-'}")
            elif cmd == "status":
                print(json.dumps(job_to_dict(c.status(args.job_id)), indent=2))
            elif cmd == "migrate":
                c.migrate(args.job_id, node_id=args.node)
            else:
                getattr(c, cmd)(args.job_id)
    except grpc.RpcError as e:
        print(f"tessera gpu {args.gpu_command}: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_FAIL
    except ConnectionError as e:
        print(f"tessera gpu {args.gpu_command}: {e}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK
