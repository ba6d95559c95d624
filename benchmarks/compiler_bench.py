"""Tessera's compiler beside torch eager, torch.compile (inductor, with and without freezing) and
numpy/OpenBLAS, in one run on this CPU.

    .venv/bin/python benchmarks/compiler_bench.py [--quick] [--no-inductor] [--peers inductor,inductor_freezing]
        [--only SUBSTR] [--json PATH] [--plot PATH]

Workloads: matmul 256-2048; the distinct conv2d layers of ResNet-18 (batch 1); an elementwise
chain of 6 ops (1 and 8 x 64 x 56 x 56); softmax 128x1024; layer norm 128x768; ResNet-18 at batch
1 and 8; a MobileNetV2 inverted-residual block (ReLU6, depthwise); an MLP-Mixer block (4x49x128);
one BERT-base encoder layer (seq 128). The peers of a workload are timed in rounds, one call
of each per round in a rotating order, after warm-up: each time is a median over the rounds and each
ratio the median of the per-round ratios, so a loaded host slows every peer alike. The compilers'
build times are reported apart. Output: a table (times, GFLOP/s, the ratio
of each peer's time to Tessera's: above 1 means Tessera is faster), JSON, and a roofline plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services" / "compiler" / "tests"))
from models import BertLayer, ElementwiseChain, InvertedResidual, MixerBlock, ResNet18, randomize_bn  # noqa: E402

from tessera.compiler.api import compile as tessera_compile  # noqa: E402

PEAK_GFLOPS = 230.0  # two Zen 4 cores: 2 x 256-bit FMA per cycle each at ~3.6 GHz (benchmarks' anchor figure)


def median_time(fn: Callable[[], Any], *, min_runs: int = 5, budget_s: float = 2.0, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < min_runs or (time.perf_counter() < t_end and len(ts) < 200):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def interleaved(fns: dict[str, Callable[[], Any]], *, budget_s: float = 2.0, min_rounds: int = 5,
                max_rounds: int = 200, warmup: int = 2) -> dict[str, list[float]]:
    """Time every function once per round, the order rotating each round, so that each peer is measured under
    the same load as the others; returns each one's times, round by round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    keys = list(fns)
    out: dict[str, list[float]] = {k: [] for k in keys}
    t_end = time.perf_counter() + budget_s
    r = 0
    while r < min_rounds or (time.perf_counter() < t_end and r < max_rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            out[k].append(time.perf_counter() - t0)
        r += 1
    return out


class Fn(nn.Module):
    def __init__(self, f: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class Fn2(nn.Module):
    def __init__(self, f: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(x, y)


def resnet_convs() -> list[tuple[str, nn.Module, list[int]]]:
    """The distinct conv layers of ResNet-18 at 224x224, batch 1 (with their batch norm and relu folded/fused away)."""
    shapes = [(3, 64, 7, 2, 224), (64, 64, 3, 1, 56), (64, 128, 3, 2, 56), (64, 128, 1, 2, 56), (128, 128, 3, 1, 28),
              (128, 256, 3, 2, 28), (128, 256, 1, 2, 28), (256, 256, 3, 1, 14), (256, 512, 3, 2, 14),
              (256, 512, 1, 2, 14), (512, 512, 3, 1, 7)]
    out = []
    for cin, cout, k, s, hw in shapes:
        out.append((f"conv {cin}->{cout} k{k} s{s} @{hw}", nn.Conv2d(cin, cout, k, s, k // 2, bias=False), [1, cin, hw, hw]))
    return out


def conv_flops(m: nn.Conv2d, shape: list[int]) -> tuple[float, float]:
    n, c, h, w = shape
    k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    flops = 2.0 * n * m.out_channels * oh * ow * c * k * k
    bytes_ = 4.0 * (n * c * h * w + m.weight.numel() + n * m.out_channels * oh * ow)
    return flops, bytes_


def workloads(quick: bool) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    ws: list[dict[str, Any]] = []
    for n in ([256, 1024] if quick else [256, 512, 1024, 2048]):
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        ws.append(dict(name=f"matmul {n}", kind="matmul", model=Fn2(torch.matmul), inputs=[a, b],
                       numpy=lambda an=an, bn=bn: an @ bn, flops=2.0 * n ** 3, bytes=12.0 * n * n))
    for name, conv, shape in (resnet_convs()[:4] if quick else resnet_convs()):
        flops, bytes_ = conv_flops(conv, shape)
        ws.append(dict(name=name, kind="conv", model=conv.eval(), inputs=[torch.randn(*shape)], flops=flops, bytes=bytes_))
    for n in ([1] if quick else [1, 8]):
        x, y = torch.randn(n, 64, 56, 56), torch.randn(n, 64, 56, 56)
        xn, yn = x.numpy(), y.numpy()

        def np_chain(xn: np.ndarray = xn, yn: np.ndarray = yn) -> np.ndarray:
            return 1 / (1 + np.exp(-(np.maximum(xn * 1.5 + yn, 0) - 0.25))) * yn + xn
        ws.append(dict(name=f"elementwise chain {n}x64x56x56", kind="elementwise", model=ElementwiseChain(), inputs=[x, y],
                       numpy=np_chain, flops=7.0 * x.numel(), bytes=12.0 * x.numel()))
    s = torch.randn(128, 1024)
    sn = s.numpy()

    def np_softmax(sn: np.ndarray = sn) -> np.ndarray:
        e = np.exp(sn - sn.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    ws.append(dict(name="softmax 128x1024", kind="softmax", model=Fn(lambda t: torch.softmax(t, -1)), inputs=[s],
                   numpy=np_softmax, flops=4.0 * s.numel(), bytes=8.0 * s.numel()))
    ln = nn.LayerNorm(768).eval()
    lx = torch.randn(128, 768)
    ws.append(dict(name="layer norm 128x768", kind="layernorm", model=ln, inputs=[lx], flops=7.0 * lx.numel(),
                   bytes=8.0 * lx.numel()))
    r18 = randomize_bn(ResNet18())
    for n in ([1] if quick else [1, 8]):
        ws.append(dict(name=f"ResNet-18 batch {n}", kind="model", model=r18, inputs=[torch.randn(n, 3, 224, 224)],
                       flops=3.64e9 * n, bytes=4.0 * (11.7e6 + n * 3 * 224 * 224)))
    # blocks of models the compiler was not tuned on: MobileNetV2's inverted residual (ReLU6, depthwise) and MLP-Mixer's
    ws.append(dict(name="MobileNetV2 block 1x32x56x56", kind="model", model=randomize_bn(InvertedResidual(32)),
                   inputs=[torch.randn(1, 32, 56, 56)], flops=2.0 * 56 * 56 * (2 * 32 * 192 + 9 * 192), bytes=4.0 * 2 * 32 * 56 * 56))
    ws.append(dict(name="MLP-Mixer block 4x49x128", kind="model", model=MixerBlock(), inputs=[torch.randn(4, 49, 128)],
                   flops=2.0 * 4 * (2 * 128 * 49 * 64 + 2 * 49 * 128 * 512), bytes=4.0 * (2 * 49 * 64 + 2 * 128 * 512)))
    if not quick:
        ws.append(dict(name="BERT-base layer seq 128", kind="model", model=BertLayer().eval(), inputs=[torch.randn(1, 128, 768)],
                       flops=2.0 * 128 * (4 * 768 * 768 + 2 * 768 * 3072) + 4.0 * 128 * 128 * 768, bytes=4.0 * 7.1e6))
    return ws


def inductor(model: nn.Module, inputs: list[torch.Tensor], freezing: bool) -> tuple[Callable[[], Any], float]:
    import torch._dynamo
    import torch._inductor.config as cfg

    torch._dynamo.reset()
    cfg.freezing = freezing
    compiled = torch.compile(model, backend="inductor")
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(*inputs)
    build = time.perf_counter() - t0

    def call() -> Any:
        with torch.no_grad():
            return compiled(*inputs)
    return call, build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer workloads and shorter timing")
    ap.add_argument("--no-inductor", action="store_true", help="skip torch.compile (its builds take minutes)")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "compiler.json"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "compiler_roofline.png"))
    ap.add_argument("--peers", default="inductor,inductor_freezing", help="torch.compile variants to run (comma separated)")
    ap.add_argument("--cache-dir", default=None, help="Tessera's compile cache (default: a fresh one per run)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    budget = 0.5 if args.quick else 2.0
    cache = args.cache_dir or str(Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-bench-cache-{os.getpid()}")
    buf = np.ones(64 * 2**20 // 4, np.float32)
    dst = np.empty_like(buf)
    bw = buf.nbytes * 2 / median_time(lambda: np.copyto(dst, buf), min_runs=5, budget_s=0.5)
    rows = []
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} cores; copy bandwidth {bw / 1e9:.1f} GB/s")
    header = f"{'workload':<34} {'tessera':>10} {'eager':>10} {'inductor':>10} {'ind+frz':>10} {'numpy':>10}  {'GFLOP/s':>8}  ratios eager/ind/frz/np"
    print(header)
    for w in workloads(args.quick):
        if args.only and args.only not in w["name"]:
            continue
        model, inputs = w["model"].eval(), w["inputs"]
        res: dict[str, Any] = {"workload": w["name"], "kind": w["kind"], "flops": w["flops"], "bytes": w["bytes"]}
        t0 = time.perf_counter()
        cm = tessera_compile(model, inputs, cache_dir=cache)
        res["tessera_build_s"] = time.perf_counter() - t0
        with torch.no_grad():
            ref = model(*inputs)
        got = cm(*[x.numpy() for x in inputs])
        res["max_abs_err"] = float(np.abs(got - ref.numpy()).max())
        scale = max(1.0, float(np.abs(ref.numpy()).max()))  # long dot products: the error grows with the output's scale
        res["correct"] = bool(np.allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5 * scale))
        ins = [np.ascontiguousarray(x.numpy()) for x in inputs]
        outs = [np.empty(s, np.float32) for s in cm.program.output_shapes]
        fns: dict[str, Callable[[], Any]] = {"tessera": lambda cm=cm, ins=ins, outs=outs: cm.run(ins, outs)}

        def eager(model: nn.Module = model, inputs: list[torch.Tensor] = inputs) -> Any:
            with torch.no_grad():
                return model(*inputs)
        fns["eager"] = eager
        if not args.no_inductor:
            for key, frz in (("inductor", False), ("inductor_freezing", True)):
                if key not in args.peers.split(","):
                    continue
                try:
                    call, build = inductor(model, inputs, frz)
                    fns[key] = call
                    res[f"{key}_build_s"] = build
                except Exception as e:  # report, keep going
                    res[f"{key}_error"] = repr(e)[:200]
        if "numpy" in w:
            fns["numpy"] = w["numpy"]
        times = interleaved(fns, budget_s=budget * len(fns))
        for key, ts in times.items():
            res[f"{key}_s"] = float(np.median(ts))
            if key != "tessera":  # per round, the peer beside the Tessera call next to it: robust to a loaded host
                res[f"{key}_ratio"] = float(np.median(np.array(ts) / np.array(times["tessera"])))
        res["rounds"] = len(times["tessera"])
        res["loadavg"] = os.getloadavg()[0]
        rows.append(res)
        t = res["tessera_s"]

        def cell(k: str, res: dict[str, Any] = res) -> str:
            return f"{res[k] * 1e3:9.3f}m" if k in res else f"{'-':>10}"

        def ratio(k: str, res: dict[str, Any] = res) -> str:
            k = k.removesuffix("_s") + "_ratio"
            return f"{res[k]:.2f}" if k in res else "-"
        print(f"{w['name']:<34} {cell('tessera_s')} {cell('eager_s')} {cell('inductor_s')} {cell('inductor_freezing_s')} "
              f"{cell('numpy_s')}  {w['flops'] / t / 1e9:8.1f}  {ratio('eager_s')}/{ratio('inductor_s')}/"
              f"{ratio('inductor_freezing_s')}/{ratio('numpy_s')}{'' if res['correct'] else '  WRONG'}", flush=True)
    doc = {"machine": {"cores": os.cpu_count(), "copy_bandwidth_gbs": bw / 1e9, "peak_gflops_assumed": PEAK_GFLOPS,
                       "torch": torch.__version__, "numpy": np.__version__, "loadavg": os.getloadavg()},
           "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(f"times in ms (m); ratios = median over rounds of peer time / Tessera time in the same round (> 1: Tessera faster). JSON: {args.json}")
    plot(rows, bw, args.plot)
    return 0 if all(r["correct"] for r in rows) else 1


def plot(rows: list[dict[str, Any]], bw: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(9, 6))
    xs = np.logspace(-1.5, 3, 200)
    ax.plot(xs, np.minimum(PEAK_GFLOPS, xs * bw / 1e9), "k-", lw=1, label=f"roofline ({PEAK_GFLOPS:.0f} GFLOP/s, {bw / 1e9:.0f} GB/s)")
    styles = {"tessera_s": ("o", "Tessera"), "eager_s": ("s", "torch eager"), "inductor_freezing_s": ("^", "inductor+freezing"),
              "numpy_s": ("x", "numpy/OpenBLAS")}
    for key, (marker, label) in styles.items():
        pts = [(r["flops"] / r["bytes"], r["flops"] / r[key] / 1e9) for r in rows if key in r]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=label, alpha=0.8)
    for r in rows:
        ax.annotate(r["workload"], (r["flops"] / r["bytes"], r["flops"] / r["tessera_s"] / 1e9), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of compulsory traffic)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Tessera compiler vs peers on this CPU")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
