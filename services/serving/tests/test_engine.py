"""Sharing of parameters, the Oven's rules, sub-plan reuse and batching under a latency budget (no timing: a
long budget holds requests until a batch is full)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline

from tessera.common.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from tessera.serving.engine import Engine
from tessera.serving.ir import Graph
from tessera.serving.ir import Pipeline as IrPipeline
from tessera.serving.scheduler import Scheduler
from tessera.serving.sklearn_import import import_sklearn

from .conftest import serve


def _featurizer() -> FeatureUnion:
    return FeatureUnion([("c", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                         ("w", TfidfVectorizer(ngram_range=(1, 2)))])


@pytest.fixture(scope="module")
def heads(texts: tuple[list[str], np.ndarray]) -> list[IrPipeline]:
    """Three pipelines: one featurizer fitted once, logistic heads on different C values."""
    docs, y = texts
    feat = _featurizer().fit(docs)
    out = []
    for c in (0.3, 1.0, 3.0):
        sk = Pipeline([("f", feat), ("m", LogisticRegression(C=c, max_iter=300))])
        sk.steps[1][1].fit(feat.transform(docs), y)
        out.append(import_sklearn(sk))
    return out


def test_second_pipeline_with_same_vocabulary_adds_only_its_weights(heads: list[IrPipeline]) -> None:
    e = serve(heads[0], "a")
    before = e.memory()
    new = e.store.missing(heads[1].params)
    assert set(new) == {h for n in heads[1].graph.nodes if n.op == "linear" for h in n.params.values()}
    serve(heads[1], "b", engine=e)
    after = e.memory()
    head_bytes = sum(heads[1].params[h].nbytes for h in new)
    assert after["array_bytes"] - before["array_bytes"] == head_bytes
    assert after["table_bytes"] == before["table_bytes"]  # one lookup table per vocabulary
    assert after["shared_objects"] == before["shared_objects"]
    # unregistering one keeps what the other uses; the last one frees everything
    e.unregister("a")
    assert e.memory()["array_bytes"] == before["array_bytes"]
    e.unregister("b")
    assert e.memory()["array_bytes"] == 0 and e.memory()["shared_objects"] == 0
    with pytest.raises(NotFoundError):
        e.unregister("b")


def test_plan_rules_and_aot_compilation(heads: list[IrPipeline], texts: tuple[list[str], np.ndarray]) -> None:
    e = serve(heads[0], "a")
    plan = e.get("a").plan
    assert plan.rules == ["fuse_featurizers", "sparse_dot"]
    assert [s.kind for s in plan.stages] == ["featurize", "head"]  # 2 counters + 2 tfidf + concat: one stage
    docs, y = texts
    # dead-feature pruning: a count vectorizer + L1 model with most weights zero
    sk = make_pipeline(CountVectorizer(ngram_range=(1, 2)),
                       LogisticRegression(l1_ratio=1.0, solver="saga", C=0.2, max_iter=3000)).fit(docs, y)
    ir = import_sklearn(sk)
    lin = next(n for n in ir.graph.nodes if n.op == "linear")
    assert "coef_index" in lin.params and "coef" not in lin.params  # only live columns are shipped
    e2 = serve(ir)
    assert "prune_dead_features" in e2.get("p").plan.rules
    np.testing.assert_allclose([p.scores for p in e2.predict("p", docs[:50])], sk.predict_proba(docs[:50]), atol=1e-6)


def test_subplan_materialization_shares_featurizer_across_pipelines(heads: list[IrPipeline]) -> None:
    e = Engine()
    for i, h in enumerate(heads):
        serve(h, f"p{i}", engine=e)
    key = e.get("p0").plan.stages[0].key
    assert e.get("p1").plan.stages[0].key == key == e.get("p2").plan.stages[0].key
    text = "the food was great but the staff was rude"
    items = [(e.get(f"p{i}"), e.columns(e.get(f"p{i}"), [text, "other words"]), 2) for i in range(3)]
    out = e.execute(items)
    assert e.stage_runs[key] == 1  # one featurization for three pipelines
    assert e.rows_computed == 2 and e.rows_reused == 4
    # same answers as each pipeline alone
    for i in range(3):
        alone = Engine()
        serve(heads[i], "x", engine=alone)
        np.testing.assert_allclose([p.scores for p in alone.predict("x", [text, "other words"])],
                                   [p.scores for p in out[i]], atol=1e-12)


async def _until(cond: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


async def test_batching_within_latency_budget(heads: list[IrPipeline]) -> None:
    e = Engine()
    serve(heads[0], "slow", engine=e, budget_ms=60_000.0)
    serve(heads[1], "fast", engine=e, budget_ms=0.0)
    s = Scheduler(e, workers=1, max_batch=20)
    s.start()
    try:
        key = e.get("slow").plan.stages[0].key
        # a long budget: requests wait at the shared featurizer until a full batch has gathered
        first = asyncio.ensure_future(s.submit("slow", ["request 0 was good"]))
        await _until(lambda: s.queued == 1)
        rest = [asyncio.ensure_future(s.submit("slow", [f"request {i} was good"])) for i in range(1, 20)]
        res = await asyncio.wait_for(asyncio.gather(first, *rest), 60)
        assert len(res) == 20 and all(len(r) == 1 for r in res)
        assert e.stage_runs[key] == 1 and dict(s.batch_sizes) == {20: 1}
        # a request with no budget is dispatched at once, and takes what waits at the stage along
        held = [asyncio.ensure_future(s.submit("slow", [f"later {i}"])) for i in range(3)]
        await _until(lambda: s.queued == 3)
        assert len(await asyncio.wait_for(s.submit("fast", ["quick one"]), 60)) == 1
        await asyncio.wait_for(asyncio.gather(*held), 60)
        assert e.stage_runs[key] == 2 and s.batch_sizes[4] == 1
    finally:
        await s.stop()


def test_bad_records_and_graphs(heads: list[IrPipeline]) -> None:
    e = serve(heads[0], "a")
    with pytest.raises(InvalidArgumentError, match="must be text"):
        e.predict("a", [{"text": 3}])
    with pytest.raises(InvalidArgumentError, match="missing field 'text'"):
        e.predict("a", [{"body": "hi"}])
    with pytest.raises(InvalidArgumentError, match="no records"):
        e.predict("a", [])
    with pytest.raises(ResourceExhaustedError):
        e.predict("a", ["x"] * (e.max_records + 1))
    with pytest.raises(ResourceExhaustedError):
        e.predict("a", ["x" * (e.max_text_chars + 1)])
    with pytest.raises(NotFoundError):
        e.predict("nope", ["x"])
    with pytest.raises(InvalidArgumentError, match="unknown operator"):
        Graph.from_json('{"inputs":[["t","text"]],"nodes":[{"id":"a","op":"eval"}],"output":"a"}')
    with pytest.raises(InvalidArgumentError, match="malformed"):
        Graph.from_json("{not json")
    with pytest.raises(InvalidArgumentError, match="not uploaded"):
        Engine().register("z", heads[0].graph)
    with pytest.raises(InvalidArgumentError, match="bad pipeline name"):
        e.register("no spaces allowed", heads[0].graph)


def test_black_box_mode_gives_the_same_predictions(texts: tuple[list[str], np.ndarray]) -> None:
    from tessera.serving.blackbox import BlackBox

    docs, y = texts
    sk = Pipeline([("f", _featurizer()), ("m", LogisticRegression(max_iter=300))]).fit(docs, y)
    bb = BlackBox()
    bb.register("p", sk)
    white = serve(import_sklearn(sk))
    got_b, got_w = bb.predict("p", docs[:30]), white.predict("p", docs[:30])
    assert [p.label for p in got_b] == [p.label for p in got_w]
    np.testing.assert_allclose([p.scores for p in got_b], [p.scores for p in got_w], atol=1e-6)
    with pytest.raises(NotFoundError):
        bb.predict("q", docs[:1])


def test_pruned_head_over_mixed_text_and_tabular_columns() -> None:
    """A ColumnTransformer of text and one-hot columns (a scipy block) into a sparse head."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(4)
    X = np.empty((120, 2), dtype=object)
    X[:, 0] = [" ".join(rng.choice(["good", "bad", "slow", "fast", "nice"], size=4)) for _ in range(120)]
    X[:, 1] = rng.choice(["a", "b", "c"], size=120)
    y = np.array(["good" in t for t in X[:, 0]])
    ct = ColumnTransformer([("t", CountVectorizer(ngram_range=(1, 3)), 0), ("c", OneHotEncoder(), [1])])
    sk = Pipeline([("ct", ct), ("m", LogisticRegression(l1_ratio=1.0, solver="saga", C=0.05, max_iter=5000))]).fit(X, y)
    e = serve(import_sklearn(sk))
    assert "prune_dead_features" in e.get("p").plan.rules
    got = e.predict("p", [list(r) for r in X[:40]])
    np.testing.assert_allclose([p.scores for p in got], sk.predict_proba(X[:40]), atol=1e-6)


async def test_a_bad_request_does_not_fail_its_batch(tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import OneHotEncoder

    X, y, _ = tabular
    sk = Pipeline([("ct", ColumnTransformer([("c", OneHotEncoder(), [4])], remainder="passthrough")),
                   ("m", Ridge())]).fit(X, y)
    e = serve(import_sklearn(sk), budget_ms=30.0)
    s = Scheduler(e, workers=1)
    s.start()
    try:
        good = [list(r) for r in X[:3]]
        bad = [list(X[0][:4]) + ["purple"]]  # unknown category: sklearn would raise too
        res = await asyncio.gather(*(s.submit("p", [g]) for g in good), s.submit("p", bad), return_exceptions=True)
        assert isinstance(res[3], InvalidArgumentError) and "unknown category" in str(res[3])
        np.testing.assert_allclose([r[0].value for r in res[:3]], sk.predict(X[:3]), atol=1e-6)
    finally:
        await s.stop()
