"""Ray Serve 2.60 side of the serving benchmark, run with Ray's own venv (.venv-ray).

    .venv-ray/bin/python benchmarks/peers/serving_ray.py --model M.pkl --texts T.json --out R.json

One deployment serves one scikit-learn pipeline (the benchmark's black box, pickled by
the benchmark itself) behind Ray Serve's HTTP proxy. The HTTP client loop
(:func:`http_run`) is shared with the Tessera side (imported by serving_bench.py without
importing ray), so both are measured by the same code.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import time
from typing import Any


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100.0 * len(s)))] if s else 0.0


def http_run(host: str, port: int, path: str, bodies: list[bytes], *, warmup: int = 20) -> dict[str, Any]:
    """POST each body in turn over one keep-alive connection: latencies (ms) and rate."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": "application/json"}

    def post(b: bytes) -> bytes:
        conn.request("POST", path, body=b, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        return data

    for b in bodies[:warmup]:
        post(b)
    lat = []
    t0 = time.perf_counter()
    for b in bodies:
        t = time.perf_counter()
        post(b)
        lat.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    conn.close()
    return {"n": len(bodies), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "req_per_s": len(bodies) / total}


def bodies_for(texts: list[str], batch: int, n: int, key: str = "records") -> list[bytes]:
    out = []
    for i in range(n):
        recs = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        out.append(json.dumps({key: recs}).encode())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()

    import pickle

    import ray
    from ray import serve
    from starlette.requests import Request

    texts = json.load(open(args.texts))
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=1, max_ongoing_requests=64)
    class Model:
        def __init__(self, path: str) -> None:
            with open(path, "rb") as f:
                self.model = pickle.load(f)  # the benchmark's own file, written just before

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            proba = self.model.predict_proba(body["records"])
            return {"predictions": proba.tolist()}

    t1 = time.perf_counter()
    serve.run(Model.bind(args.model), route_prefix="/predict", name="bench")
    first = http_run("127.0.0.1", port, "/predict", bodies_for(texts, 1, 1), warmup=0)
    deploy_first_s = time.perf_counter() - t1
    res: dict[str, Any] = {"ray": ray.__version__, "init_s": t1 - t0, "deploy_and_first_prediction_s": deploy_first_s,
                           "first_ms": first["p50_ms"]}
    res["http_b1"] = http_run("127.0.0.1", port, "/predict", bodies_for(texts, 1, args.n))
    res["http_b32"] = http_run("127.0.0.1", port, "/predict", bodies_for(texts, 32, max(50, args.n // 8)))
    serve.shutdown()
    ray.shutdown()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
