"""Auto-tuning: schedule templates with knobs, searched by simulated annealing over a learned cost model.

For each tunable kernel (a fused group anchored by a matmul or an NCHWc convolution) the knobs of its
template (register-tile rows and columns, reduction unrolling, loop order) span a search space. Each
round, simulated annealing walks the space guided by gradient-boosted trees (LightGBM, a lambdarank
ranking objective) trained online on features of the *lowered loop program* of every measured
candidate; only the top-k predicted candidates are built and timed (repeated runs, the median, a
rerun when the spread is high). ``strategy="random"`` measures random candidates instead (the
baseline the benchmark compares against).

The best knobs per workload go to a :class:`TuningLog` (the control store's KV namespace
``compiler_tuning`` in a cluster, a JSON file otherwise), keyed by the workload (op, shapes,
attributes) and target, so other models and other replicas reuse them; compiles look them up.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tessera.compiler.backends.c import CBackend, CModule
from tessera.compiler.codegen import Arg, Call, Program, _flops, kernel_for
from tessera.compiler.ir import Graph, Node, Op
from tessera.compiler.lower import Allocate, For, IfThen, LoweredFunc, MicroKernel, Seq, Stmt, Store
from tessera.compiler.target import vector_lanes

Knobs = dict[str, int]


class TuningLog(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, record: dict[str, Any]) -> None: ...


class FileTuningLog:
    """Best records in one JSON file (a compile cache's ``tuning.json``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._load().get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        doc = self._load()
        merged = merge_record(doc.get(key), record)
        if merged is not None:
            doc[key] = merged
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(self.path)


def merge_record(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """What a log keeps for a workload: the faster schedule, with the most trials either record counts
    (so a resumed tuning goes on where it stopped); None when ``old`` stays as it is."""
    if old is None:
        return new
    trials = max(int(old.get("trials", 0)), int(new.get("trials", 0)))
    best = new if new["gflops"] > old["gflops"] else old
    if best is old and trials == int(old.get("trials", 0)):
        return None
    return {**best, "trials": trials}


def anchor_of(node: Node) -> str | None:
    if node.op is not Op.FUSED:
        return None
    ops = {n.op for n in node.attrs["body"].nodes}
    if Op.MATMUL in ops:
        return "matmul"
    if Op.CONV2D_NCHWC in ops:
        return "conv2d_nchwc"
    return None


def workload_key(node: Node, target: str = "c") -> str:
    """Op, shapes and attributes of the anchor and its inputs, the target and the vector width."""
    body: Graph = node.attrs["body"]
    anchor = next(n for n in body.nodes if n.op in (Op.MATMUL, Op.CONV2D_NCHWC))
    desc = {"op": anchor.op.value, "out": list(anchor.shape), "ins": [list(body.nodes[i].shape) for i in anchor.inputs],
            "attrs": {k: repr(v) for k, v in sorted(anchor.attrs.items())}, "target": target, "lanes": vector_lanes()}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def space(node: Node) -> dict[str, list[int]]:
    lanes = vector_lanes()
    body: Graph = node.attrs["body"]
    if anchor_of(node) == "matmul":
        n = node.shape[-1]
        cols = sorted({c for c in (lanes, 2 * lanes, 3 * lanes, 4 * lanes) if c <= max(n, lanes)})
        return {"mm_rows": [1, 2, 3, 4, 5, 6, 7, 8], "mm_cols": cols, "mm_kunroll": [1, 2, 4, 8], "mm_ukernel": [0, 1],
                "mm_pack": [0, 1], "mm_order": [0, 1]}
    conv = next(x for x in body.nodes if x.op is Op.CONV2D_NCHWC)
    q = conv.shape[3]
    return {"conv_cols": sorted({c for c in range(1, 17) if c <= q}), "conv_order": [0, 1], "conv_ci_unroll": [1, 2, 4],
            "conv_ukernel": [0, 1]}


# ---------------------------------------------------------------------------- features of the loop program


def _walk(s: Stmt, depth: int, out: list[tuple[For, int]], allocs: list[int], mks: list[MicroKernel]) -> None:
    if isinstance(s, Seq):
        for x in s.stmts:
            _walk(x, depth, out, allocs, mks)
    elif isinstance(s, MicroKernel):
        mks.append(s)
    elif isinstance(s, IfThen):  # a micro-kernel's tiles and the plain loops for the others: features of the first
        _walk(s.body, depth, out, allocs, mks)
    elif isinstance(s, For):
        out.append((s, depth))
        _walk(s.body, depth + 1, out, allocs, mks)
    elif isinstance(s, Allocate):
        allocs.append(s.buf.size)
        _walk(s.body, depth, out, allocs, mks)


def features(f: LoweredFunc, knobs: Knobs, flops: float) -> list[float]:
    loops: list[tuple[For, int]] = []
    allocs: list[int] = []
    mks: list[MicroKernel] = []
    _walk(f.body, 0, loops, allocs, mks)
    mk = mks[0] if mks else None
    lanes = vector_lanes()
    # a micro-kernel: accumulator registers, reduction length per call, A reuse per B vector, B reuse per A value
    mk_feats = [float(mk.rows * -(-mk.cols // lanes)), math.log2(1 + math.prod(e for e, _, _ in mk.loops)), float(mk.rows),
                float(mk.cols / lanes), float(mk.a_row == 1 or any(sa == 1 for _, sa, _ in mk.loops))] if mk else [0.0] * 5
    by = {k: [lp.extent for lp, _ in loops if lp.kind == k] for k in ("parallel", "vectorize", "unroll", "serial")}
    innermost = [lp.extent for lp, d in loops if not isinstance(lp.body, For)]
    stores = sum(1 for lp, _ in loops if isinstance(lp.body, Store))
    return [
        math.log2(max(1.0, flops)), float(len(loops)), float(max((d for _, d in loops), default=0)),
        math.log2(1 + sum(by["parallel"])), math.log2(1 + max(by["vectorize"], default=0)),
        float(sum(by["vectorize"]) % vector_lanes() != 0), math.log2(1 + math.prod(by["unroll"] or [1])),
        float(len(by["unroll"])), math.log2(1 + max(allocs, default=0)), float(max(allocs, default=0) / vector_lanes()),
        math.log2(1 + (min(innermost) if innermost else 1)), float(stores), float(len(by["serial"])),
        math.log2(1 + f.workspace), float(len(mks)), *mk_feats,
        *[float(v) for _, v in sorted(knobs.items())],
    ]


# ---------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    knobs: Knobs
    seconds: float
    gflops: float
    spread: float  # (p75 - p25) / median


def kernel_module(node: Node, knobs: Knobs, *, cache_dir: str | None) -> CModule:
    """One fused node's kernel with ``knobs``, built and loaded on its own (its inputs, then its output)."""
    f = kernel_for(node, "k", knobs)
    n_in = len(node.attrs["body"].inputs)
    prog = Program([Call(f, [Arg("input", i) for i in range(n_in)] + [Arg("output", 0)], "k")], n_in, 1,
                   arena_size=f.workspace + 16, workspace_offset=0)
    be = CBackend()
    path, _ = be.build(be.render(prog), cache_dir)
    return be.load(path, prog)


def measure(node: Node, knobs: Knobs, *, cache_dir: str | None, repeat: int = 7, rng: np.random.Generator | None = None) -> Measurement:
    """Build one kernel with ``knobs`` and time it on random inputs (median; rerun once if the spread is high)."""
    rng = rng or np.random.default_rng(0)
    mod = kernel_module(node, knobs, cache_dir=cache_dir)
    body: Graph = node.attrs["body"]
    shapes = [body.nodes[i].shape for i in body.inputs]
    ins = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    outs = [np.empty(node.shape, np.float32)]
    flops = _flops(body)
    best: Measurement | None = None
    for _attempt in range(2):
        mod.run(ins, outs)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            mod.run(ins, outs)
            ts.append(time.perf_counter() - t0)
        med = float(np.median(ts))
        spread = float((np.percentile(ts, 75) - np.percentile(ts, 25)) / med)
        m = Measurement(knobs, med, flops / med / 1e9, spread)
        if best is None or m.spread < best.spread:
            best = m
        if spread < 0.15:
            break
    assert best is not None
    return best


# ---------------------------------------------------------------------------- search


@dataclass
class TuneResult:
    key: str
    best: Measurement
    history: list[float] = field(default_factory=list)  # best GFLOP/s after each measured trial
    trials: list[Measurement] = field(default_factory=list)


Progress = Callable[[int, int, float], None]  # (trials done, trials total, best GFLOP/s)


class Tuner:
    def __init__(self, node: Node, *, cache_dir: str | None = None, seed: int = 0, target: str = "c") -> None:
        self.node = node
        self.space = space(node)
        self.names = sorted(self.space)
        self.cache_dir = cache_dir
        self.rand = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.key = workload_key(node, target)
        self.flops = _flops(node.attrs["body"])
        self._feat: dict[tuple[int, ...], list[float]] = {}

    def _t(self, k: Knobs) -> tuple[int, ...]:
        return tuple(k[n] for n in self.names)

    def random_knobs(self) -> Knobs:
        return {n: self.rand.choice(self.space[n]) for n in self.names}

    def feature(self, k: Knobs) -> list[float]:
        t = self._t(k)
        if t not in self._feat:
            self._feat[t] = features(kernel_for(self.node, "k", k), k, self.flops)
        return self._feat[t]

    def neighbour(self, k: Knobs) -> Knobs:
        n = self.rand.choice(self.names)
        vals = self.space[n]
        i = vals.index(k[n])
        j = min(len(vals) - 1, max(0, i + self.rand.choice([-2, -1, 1, 2])))
        return {**k, n: vals[j]}

    def tune(self, trials: int, *, strategy: str = "model", top_k: int = 4, progress: Progress | None = None,
             seed: list[Knobs] | None = None, on_trial: Callable[[Measurement, int], None] | None = None) -> TuneResult:
        """Measure ``trials`` candidates (``seed`` first: a logged best to resume from); ``on_trial`` sees each."""
        total = math.prod(len(v) for v in self.space.values())
        trials = min(trials, total)
        measured: dict[tuple[int, ...], Measurement] = {}
        history: list[float] = []
        order: list[Measurement] = []
        model: Any = None
        pending = [k for k in (seed or []) if set(k) == set(self.names) and all(k[n] in self.space[n] for n in self.names)]
        batch: list[Knobs]
        while len(measured) < trials:
            if pending:
                batch, pending = pending[:1], pending[1:]
            elif strategy == "random" or model is None:
                batch = []
                while len(batch) < min(top_k, trials - len(measured)):
                    k = self.random_knobs()
                    if self._t(k) not in measured and all(self._t(k) != self._t(b) for b in batch):
                        batch.append(k)
            else:
                batch = self._propose(model, measured, min(top_k, trials - len(measured)))
            for k in batch:
                m = measure(self.node, k, cache_dir=self.cache_dir, rng=self.rng)
                measured[self._t(k)] = m
                order.append(m)
                history.append(max(x.gflops for x in order))
                if on_trial:
                    on_trial(m, len(measured))
                if progress:
                    progress(len(measured), trials, history[-1])
            if strategy == "model" and len(measured) >= 4:
                model = self._train(list(measured.values()))
        best = max(order, key=lambda m: m.gflops)
        return TuneResult(self.key, best, history, order)

    def _train(self, ms: list[Measurement]) -> Any:
        import lightgbm

        x = np.array([self.feature(m.knobs) for m in ms])
        g = np.array([m.gflops for m in ms])
        # relevance labels for lambdarank: quantile buckets of measured throughput
        ranks = np.argsort(np.argsort(g))
        y = (ranks * 8 // max(1, len(g))).astype(int)
        model = lightgbm.LGBMRanker(objective="lambdarank", n_estimators=60, learning_rate=0.15, num_leaves=8,
                                    min_child_samples=1, min_data_in_bin=1, n_jobs=1, verbose=-1)
        model.fit(x, y, group=[len(ms)])
        return model

    def _propose(self, model: Any, measured: dict[tuple[int, ...], Measurement], k: int) -> list[Knobs]:
        """Simulated annealing over the model's scores; the k best unmeasured points seen."""
        seen: dict[tuple[int, ...], tuple[float, Knobs]] = {}

        def score(ks: list[Knobs]) -> list[float]:
            return [float(v) for v in model.predict(np.array([self.feature(x) for x in ks]))]
        starts = sorted(measured.values(), key=lambda m: -m.gflops)[:2] + [Measurement(self.random_knobs(), 0, 0, 0)
                                                                          for _ in range(4)]
        for st in starts:
            cur = st.knobs
            cur_s = score([cur])[0]
            temp = 1.0
            for _ in range(30):
                cand = self.neighbour(cur)
                s = score([cand])[0]
                seen[self._t(cand)] = (s, cand)
                if s > cur_s or self.rand.random() < math.exp((s - cur_s) / max(temp, 1e-3)):
                    cur, cur_s = cand, s
                temp *= 0.9
        fresh = sorted((v for t, v in seen.items() if t not in measured), key=lambda v: -v[0])
        out = [kn for _, kn in fresh[:max(1, k - 1)]]
        while len(out) < k:  # one exploratory random point per round
            r = self.random_knobs()
            if self._t(r) not in measured and all(self._t(r) != self._t(o) for o in out):
                out.append(r)
            elif len(measured) + len(out) >= math.prod(len(v) for v in self.space.values()):
                break
        return out


def tunable(graph: Graph) -> list[int]:
    return [i for i, n in enumerate(graph.nodes) if anchor_of(n) is not None]


def tune_graph(graph: Graph, trials: int, log: TuningLog, *, cache_dir: str | None = None, target: str = "c",
               progress: Callable[[str, int, int, float], None] | None = None) -> dict[int, Knobs]:
    """Tune every distinct tunable workload of a fused graph (``trials`` in all, split by FLOPs) and log the best."""
    nodes = tunable(graph)
    by_key: dict[str, list[int]] = {}
    for i in nodes:
        by_key.setdefault(workload_key(graph.nodes[i], target), []).append(i)
    weights = {k: _flops(graph.nodes[v[0]].attrs["body"]) * len(v) for k, v in by_key.items()}
    total = sum(weights.values()) or 1.0
    for key, idx in sorted(by_key.items(), key=lambda kv: -weights[kv[0]]):
        n = max(2, int(trials * weights[key] / total))
        node = graph.nodes[idx[0]]
        label = str(node.attrs["label"])
        rec = log.get(key)
        done = int(rec.get("trials", 0)) if rec else 0  # resumed: trials an earlier (maybe cancelled) run measured
        if done >= n:
            if progress is not None and rec is not None:
                progress(label, n, n, float(rec["gflops"]))
            continue
        step: Progress | None = None
        if progress is not None:
            def step(d: int, t: int, b: float, label: str = label, done: int = done,
                     report: Callable[[str, int, int, float], None] = progress) -> None:
                report(label, done + d, done + t, b)

        def logged(m: Measurement, count: int, key: str = key, label: str = label, done: int = done) -> None:
            # every trial goes to the log at once: a cancelled tuning keeps what it measured
            log.put(key, {"knobs": m.knobs, "gflops": m.gflops, "trials": done + count, "label": label})
        seed = [{k: int(v) for k, v in rec["knobs"].items()}] if rec else []
        Tuner(node, cache_dir=cache_dir, target=target).tune(n - done, progress=step, seed=seed, on_trial=logged)
    return logged_knobs(graph, log, target)


def logged_knobs(graph: Graph, log: TuningLog, target: str = "c") -> dict[int, Knobs]:
    """The best logged knobs of every tunable node that has a record."""
    out: dict[int, Knobs] = {}
    for i in tunable(graph):
        rec = log.get(workload_key(graph.nodes[i], target))
        if rec:
            out[i] = {k: int(v) for k, v in rec["knobs"].items()}
    return out

