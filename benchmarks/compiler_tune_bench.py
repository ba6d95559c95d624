"""Auto-tuning: best GFLOP/s against measured trials, cost model (simulated annealing over LightGBM
ranking) versus random search, for matmul 1024^3 and three ResNet-18 convolutions.

    .venv/bin/python benchmarks/compiler_tune_bench.py [--trials 32] [--only SUBSTR] [--json PATH] [--plot PATH]

For each workload both strategies start from scratch with the same seed; the figure of merit is the
number of trials each needs to reach 95% of the best throughput either found. Also reports the tuned
matmul beside numpy/OpenBLAS measured in the same run.
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
from tessera.compiler.tune import Tuner, anchor_of  # noqa: E402


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


def trials_to(history: list[float], target: float) -> int | None:
    return next((i + 1 for i, b in enumerate(history) if b >= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--only", default="")
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
            a, b = np.random.rand(1024, 1024).astype(np.float32), np.random.rand(1024, 1024).astype(np.float32)
            ts = []
            for _ in range(10):
                t = time.perf_counter()
                a @ b
                ts.append(time.perf_counter() - t)
            row["numpy_gflops"] = 2 * 1024 ** 3 / float(np.median(ts)) / 1e9
            print(f"{name:<28} numpy/OpenBLAS {row['numpy_gflops']:.1f} GFLOP/s; tuned/numpy = {best / row['numpy_gflops']:.2f}")
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
