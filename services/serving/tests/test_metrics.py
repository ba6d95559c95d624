"""Serving's metrics: requests and their latency per pipeline, records, batch sizes, and the reuse of shared
stages, as a replica reports them. The meter provider is installed once per process, so the replica runs in a
child process with an in-memory reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = """
    import asyncio, json
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from tessera.common import metrics
    reader = InMemoryMetricReader()
    metrics.setup_metrics("serving", readers=[reader])

    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from tessera.common.errors import NotFoundError
    from tessera.serving.engine import Engine
    from tessera.serving.scheduler import Scheduler
    from tessera.serving.replica import Replica
    from tessera.serving.server import observe_replica
    from tessera.serving.sklearn_import import import_sklearn

    class NoRegistry:  # the replica's registry, with no pipeline in it but those loaded here
        async def get_pipeline(self, name):
            return None

    docs = ["good food", "bad food", "good staff", "rude staff", "great view", "awful view"] * 5
    labels = ["pos", "neg", "pos", "neg", "pos", "neg"] * 5
    engine = Engine()
    vec = CountVectorizer().fit(docs)
    for name, C in (("a", 1.0), ("b", 0.5)):  # two heads over the same vocabulary: one shared featurizer
        ir = import_sklearn(make_pipeline(vec, LogisticRegression(C=C)).fit(docs, labels))
        for h, arr in ir.params.items():
            engine.store.put(h, arr)
        engine.register(name, ir.graph, budget_ms=0.0)
    scheduler = Scheduler(engine, workers=1)
    replica = Replica(engine, scheduler, NoRegistry())
    observe_replica(engine, scheduler)

    async def main():
        scheduler.start()
        for _ in range(3):
            await replica.predict("a", ["good food", "rude staff"])
        await replica.predict("b", ["great view"])
        await replica.predict_many([("a", ["bad food"]), ("b", ["bad food"])])
        try:
            await replica.predict("nope", ["x"])
        except NotFoundError:
            pass
        await scheduler.stop()

    asyncio.run(main())
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    key = m.name + json.dumps(dict(p.attributes), sort_keys=True)
                    out[key] = [p.count, p.sum] if hasattr(p, "bucket_counts") else p.value
    print(json.dumps(out))
"""


def test_requests_latency_batches_and_reuse_per_pipeline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TESSERA_"))}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    duration = "tessera.serving.request.duration"
    assert got[duration + '{"tessera.pipeline": "a"}'][0] == 4  # 3 predicts + 1 in predict_many
    assert got[duration + '{"tessera.pipeline": "b"}'][0] == 2
    assert got[duration + '{"error.type": "NotFoundError", "tessera.pipeline": "_unknown"}'][0] == 1
    assert got[duration + '{"tessera.pipeline": "a"}'][1] > 0
    assert got['tessera.serving.records{"tessera.pipeline": "a"}'] == 7
    assert got['tessera.serving.records{"tessera.pipeline": "b"}'] == 2
    # each request's featurizer run is one batch (no latency budget: nothing waits to be batched); the
    # predict_many's two requests share one batch: 2 + 2 + 2 + 1 + 2 records
    assert got["tessera.serving.batch.size{}"] == [5, 9] and got["tessera.serving.batches{}"] == 5
    # distinct rows computed: the first request's 2, then "great view" and "bad food"; the 2nd and 3rd requests
    # find their rows kept from the first (4 cache hits); predict_many's two pipelines ask for the same row in one
    # batch: computed once, reused once
    assert got['tessera.serving.rows{"tessera.serving.row": "computed"}'] == 4
    assert got['tessera.serving.rows{"tessera.serving.row": "reused"}'] == 1
    assert got['tessera.serving.cache.lookups{"tessera.serving.cache.result": "hit"}'] == 4
    assert got['tessera.serving.cache.lookups{"tessera.serving.cache.result": "miss"}'] == 4
    assert got["tessera.serving.cache.hit_rate{}"] == 0.5
    assert 0 < got["tessera.serving.cache.size{}"] <= 64 * 2**20 and got["tessera.serving.cache.evictions{}"] == 0
    # no pipeline is latency-critical: the reserved executor ran nothing
    assert got['tessera.serving.stage.batches{"tessera.serving.executor": "reserved"}'] == 0
    assert got['tessera.serving.stage.batches{"tessera.serving.executor": "shared"}'] >= 0
    assert got["tessera.serving.pipelines{}"] == 2
