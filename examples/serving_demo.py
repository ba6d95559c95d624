"""Serving demo step: two scikit-learn sentiment pipelines that share one featurizer and a
Flour pipeline, served by the `tessera up` stack.

    .venv/bin/python examples/serving_demo.py        # against a running `tessera up`

``run(print_row)`` is the step examples/demo.py calls; it prints through ``print_row`` and
returns the figures for the demo's summary.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

REVIEWS = [
    ("the food was great and the staff friendly", "pos"), ("awful service, cold food", "neg"),
    ("loved the view, will come again", "pos"), ("rude waiter and a dirty table", "neg"),
    ("tasty, quick and cheap", "pos"), ("bland soup, slow kitchen", "neg"), ("great value, clean room", "pos"),
    ("never again, noisy and dirty", "neg"), ("friendly people, great coffee", "pos"), ("bad, bad, bad", "neg"),
    ("quiet room and a lovely breakfast", "pos"), ("overpriced and bland", "neg"),
]


def run(print_row: Callable[[str], None] = print) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    from tessera.serving import Client, flour

    docs = [d for d, _ in REVIEWS]
    y = np.array([label for _, label in REVIEWS])
    feat = FeatureUnion([("char", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                         ("word", TfidfVectorizer(ngram_range=(1, 2)))]).fit(docs)
    X = feat.transform(docs)
    pipes = [Pipeline([("f", feat), ("m", LogisticRegression(C=c).fit(X, y))]) for c in (1.0, 10.0)]

    print_row("\n== serving")
    out: dict[str, Any] = {}
    with Client() as c:
        t0 = time.perf_counter()
        info = c.register("demo-sentiment-a", pipes[0])
        before = c.stats()
        c.register("demo-sentiment-b", pipes[1])
        after = c.stats()
        out["register_ms"] = (time.perf_counter() - t0) * 1000
        print_row(f"   registered 2 scikit-learn pipelines on {len(c.addresses)} replica(s); plan: "
                  f"{' -> '.join(info.stages)} (rules: {', '.join(info.rules)})")
        print_row(f"   the second added {after.param_bytes - before.param_bytes:,} bytes of parameters "
                  f"(its head); the shared featurizer ({before.param_bytes:,} bytes) is stored once")
        text = "the staff was friendly but the soup was cold"
        t0 = time.perf_counter()
        a, b = c.predict_batch([("demo-sentiment-a", [text]), ("demo-sentiment-b", [text])])
        out["predict_ms"] = (time.perf_counter() - t0) * 1000
        want = pipes[0].predict_proba([text])[0]
        out["matches_sklearn"] = bool(np.allclose(a[0].scores, want, atol=1e-6))
        print_row(f"   {text!r}: a={a[0].label} {a[0].scores[1]:.3f}, b={b[0].label} {b[0].scores[1]:.3f} "
                  f"(featurized once for both; equals scikit-learn: {out['matches_sklearn']})")
        body = json.dumps({"records": [text]}).encode()
        req = urllib.request.Request(f"http://{after.http_address}/v1/pipelines/demo-sentiment-a:predict", data=body,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            label = json.loads(r.read())["predictions"][0]["label"]
        print_row(f"   HTTP/JSON at {after.http_address}: {label}")
        # a Flour pipeline: tabular inputs, one-hot + scaling + a linear model
        f = flour.Flour()
        x = f.concat(f.numbers("rooms", "area").scale([3.0, 80.0], [1.0, 30.0]),
                     f.categories("city").onehot([["lyon", "paris"]]))
        c.register("demo-rent", f.build(x.linear([[150.0, 300.0, 0.0, 400.0]], intercept=900.0)))
        rent = c.predict("demo-rent", [{"rooms": 3, "area": 95.0, "city": "paris"}])[0].value
        out["flour_rent"] = rent
        print_row(f"   Flour pipeline demo-rent: 3 rooms, 95 m2, paris -> {rent:.0f}")
        for name in ("demo-sentiment-a", "demo-sentiment-b", "demo-rent"):
            c.unregister(name)
    return out


if __name__ == "__main__":
    res = run()
    sys.exit(0 if res.get("matches_sklearn") else 1)
