"""Auto-tuning: best GFLOP/s against measured trials, cost model (simulated annealing over LightGBM
ranking) versus random search, for matmul 1024^3 and three ResNet-18 convolutions.

    .venv/bin/python benchmarks/compiler_tune_bench.py [--trials 32] [--rounds 15] [--only SUBSTR] [--json PATH] [--plot PATH]

For each workload both strategies start from scratch with the same seed; the figure of merit is the
number of trials each needs to reach 95% of the best throughput either found. Also reports the tuned
matmul beside numpy/OpenBLAS and beside the same template without micro-kernel and packing, the three
called in alternation (one call each per round, rotating order) so that a loaded host slows them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

from tessera.compiler.frontend import from_torch  # noqa: E402
from tessera.compiler.ir import Op  # noqa: E402
from tessera.compiler.passes import run_passes  # noqa: E402
from tessera.compiler.tune import Tuner, anchor_of, kernel_module  # noqa: E402


class MatMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def fused_anchor(model: nn.Module, inputs: list[torch.Tensor]) -> Any:
    g = run_passes(from_torch(model.eval(), inputs))
    return next(n for n in g.nodes if n.op is Op.FUSED and anchor_of(n) is not None)


def workloads() -> list[tuple[str, Any]]:
    torch.manual_seed(0)
    out = [("matmul 1024", fused_anchor(MatMul(), [torch.randn(1024, 1024), torch.randn(1024, 1024)]))]
    for cin, cout, k, s, hw in [(64, 64, 3, 1, 56), (128, 256, 3, 2, 28), (512, 512, 3, 1, 7)]:
        conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        out.append((f"conv {cin}->{cout} k{k} s{s} @{hw}", fused_anchor(conv, [torch.randn(1, cin, hw, hw)])))
    return out


def beside_numpy(node: Any, knobs: dict[str, int], cache: str, rounds: int) -> dict[str, float]:
    """The tuned 1024^3 kernel, OpenBLAS and the template without micro-kernel or packing, called in alternation (one
    call of each per round, the order rotating): a loaded host slows the three alike."""
    mod = kernel_module(node, knobs, cache_dir=cache)
    plain = kernel_module(node, {"mm_ukernel": 0, "mm_pack": 0, "mm_order": 0}, cache_dir=cache)
    a, b = np.random.rand(1024, 1024).astype(np.float32), np.random.rand(1024, 1024).astype(np.float32)
    out = np.empty((1024, 1024), np.float32)
    mod.run([a, b], [out])
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-3)
    fns = {"tuned": lambda: mod.run([a, b], [out]), "numpy": lambda: a @ b, "plain": lambda: plain.run([a, b], [out])}
    keys = list(fns)
    ts: dict[str, list[float]] = {k: [] for k in keys}
    for f in fns.values():
        f()
    for r in range(rounds):
        for k in keys[r % 3:] + keys[:r % 3]:
            t = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t)
    gf = {k: 2 * 1024 ** 3 / float(np.median(v)) / 1e9 for k, v in ts.items()}
    return {"numpy_gflops": gf["numpy"], "tuned_gflops_interleaved": gf["tuned"], "no_microkernel_gflops_interleaved": gf["plain"],
            "tuned_over_numpy": float(np.median(np.array(ts["numpy"]) / np.array(ts["tuned"]))),
            "tuned_over_no_microkernel": float(np.median(np.array(ts["plain"]) / np.array(ts["tuned"])))}


def trials_to(history: list[float], target: float) -> int | None:
    return next((i + 1 for i, b in enumerate(history) if b >= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the tuned matmul beside numpy")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "compiler_tune.json"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "compiler_tune.png"))
    args = ap.parse_args()
    cache = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-tune-cache-{os.getpid()}")
    rows = []
    for name, node in workloads():
        if args.only and args.only not in name:
            continue
        row: dict[str, Any] = {"workload": name}
        for strategy in ("model", "random"):
            t0 = time.perf_counter()
            res = Tuner(node, cache_dir=cache, seed=1).tune(args.trials, strategy=strategy)
            row[strategy] = {"history": res.history, "best_gflops": res.best.gflops, "best_knobs": res.best.knobs,
                             "seconds": time.perf_counter() - t0}
            print(f"{name:<28} {strategy:<6} best {res.best.gflops:7.1f} GFLOP/s {res.best.knobs} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        best = max(row["model"]["best_gflops"], row["random"]["best_gflops"])
        for strategy in ("model", "random"):
            row[strategy]["trials_to_95pct"] = trials_to(row[strategy]["history"], 0.95 * best)
        print(f"{name:<28} trials to 95% of {best:.1f} GFLOP/s: model {row['model']['trials_to_95pct']}, "
              f"random {row['random']['trials_to_95pct']}", flush=True)
        if name.startswith("matmul"):
            knobs = max((row["model"], row["random"]), key=lambda r: r["best_gflops"])["best_knobs"]
            row.update(beside_numpy(node, knobs, cache, args.rounds))
            print(f"{name:<28} interleaved, {args.rounds} rounds: tuned {row['tuned_gflops_interleaved']:.1f}, numpy/OpenBLAS "
                  f"{row['numpy_gflops']:.1f}, same template without micro-kernel/packing {row['no_microkernel_gflops_interleaved']:.1f}"
                  f" GFLOP/s; tuned/numpy = {row['tuned_over_numpy']:.2f} (median of per-round ratios), tuned/plain = "
                  f"{row['tuned_over_no_microkernel']:.2f}", flush=True)
        rows.append(row)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"loadavg": os.getloadavg(), "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5), squeeze=False)
        for ax, row in zip(axes[0], rows, strict=True):
            for strategy, style in (("model", "-"), ("random", "--")):
                h = row[strategy]["history"]
                ax.plot(range(1, len(h) + 1), h, style, label=strategy)
            ax.set_title(row["workload"], fontsize=9)
            ax.set_xlabel("measured trials")
            ax.set_ylabel("best GFLOP/s")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
