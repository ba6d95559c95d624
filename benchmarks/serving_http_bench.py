"""Serving's HTTP front end at batch 1, beside its gRPC front end, in one run.

    .venv/bin/python benchmarks/serving_http_bench.py [--requests N] [--rounds R] [--json PATH]

``tessera up`` in a temporary run directory; one text pipeline (TF-IDF featurizer + logistic
regression, fitted on synthetic reviews) registered through ``tessera.serving.Client``; then,
``--rounds`` times in turn so that a change in the host's load touches every row alike:

- gRPC: ``Client.predict`` with one record;
- HTTP ``/v1/pipelines/<name>:predict``: one record a request, over one keep-alive connection
  (the HTTP loop of benchmarks/peers/serving_ray.py, the one the serving benchmark times Ray Serve with);
- HTTP ``/v2/models/<name>/infer`` (KServe v2): the same, as an Open Inference Protocol request
  (skipped when the front end does not have the route).

Each row's p50/p99 is the median over rounds; the HTTP rows are also given as ratios to gRPC
measured in the same rounds. Nothing asserts on timings: figures are reported as measured.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORDS = ("good great awful bad service food slow quick friendly rude cheap pricey clean dirty tasty bland "
         "loved hated again never always staff room view noisy quiet").split()


def _peer() -> Any:
    spec = importlib.util.spec_from_file_location("serving_ray_peer", HERE / "peers" / "serving_ray.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus(n: int = 600) -> tuple[list[str], list[str]]:
    import numpy as np

    rng = np.random.default_rng(5)
    docs, labels = [], []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
        docs.append(" ".join(words))
        score = sum(w in ("good", "great", "loved", "friendly", "tasty", "clean") for w in words)
        score -= sum(w in ("awful", "bad", "hated", "rude", "dirty", "bland") for w in words)
        labels.append("pos" if score > 0 else "neg")
    return docs, labels


def grpc_run(client: Any, name: str, texts: list[str], n: int, warmup: int = 20) -> dict[str, float]:
    peer = _peer()
    for i in range(warmup):
        client.predict(name, [texts[i % len(texts)]])
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        client.predict(name, [texts[i % len(texts)]])
        lat.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    return {"n": n, "p50_ms": peer.percentile(lat, 50), "p99_ms": peer.percentile(lat, 99), "req_per_s": n / total}


def has_route(host: str, port: int, path: str) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status == 200
    finally:
        conn.close()


def run(n_req: int, rounds: int) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from tessera.serving import Client

    peer = _peer()
    docs, labels = corpus()
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression()).fit(docs, labels)
    texts = docs[:200]
    v1 = peer.bodies_for(texts, 1, n_req)
    v2 = [json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}]}).encode()
          for t in (texts[i % len(texts)] for i in range(n_req))]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
        env.update(TESSERA_RUN_DIR=str(run_dir), OTEL_TRACES_SAMPLER="always_off", TESSERA_LOG_LEVEL="WARNING")
        tessera = str(Path(sys.executable).parent / "tessera")
        up = subprocess.run([tessera, "up"], env=env, capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            raise RuntimeError(f"tessera up failed:\n{up.stdout}\n{up.stderr}")
        try:
            cs = json.loads((run_dir / "cluster.json").read_text())["control_store_address"]
            rows: dict[str, list[dict[str, float]]] = {"grpc_b1": [], "http_v1_b1": [], "http_v2_b1": []}
            with Client(cluster_address=cs, timeout=60) as c:
                c.register("s", pipe)
                host, port_s = c.stats().http_address.rsplit(":", 1)
                port = int(port_s)
                kserve = has_route(host, port, "/v2/models/s/ready")
                for _ in range(rounds):
                    rows["grpc_b1"].append(grpc_run(c, "s", texts, n_req))
                    rows["http_v1_b1"].append(peer.http_run(host, port, "/v1/pipelines/s:predict", v1))
                    if kserve:
                        rows["http_v2_b1"].append(peer.http_run(host, port, "/v2/models/s/infer", v2))
        finally:
            subprocess.run([tessera, "down"], env=env, capture_output=True, text=True, timeout=120)
    out: dict[str, Any] = {"requests_per_round": n_req, "rounds": rounds,
                           "host": f"{platform.node()} ({os.cpu_count()} CPUs), loaded by other work"}
    for name, rs in rows.items():
        if not rs:
            continue
        out[name] = {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p99_ms", "req_per_s")}
    for name in ("http_v1_b1", "http_v2_b1"):
        if name in out:
            out[f"{name}_over_grpc"] = {"p50": out[name]["p50_ms"] / out["grpc_b1"]["p50_ms"],
                                        "p99": out[name]["p99_ms"] / out["grpc_b1"]["p99_ms"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per row and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    res = run(a.requests, a.rounds)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
