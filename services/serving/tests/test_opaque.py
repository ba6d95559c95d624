"""Steps the IR cannot express run as opaque stages: their pickle, in a worker process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.naive_bayes import MultinomialNB
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from tessera.common.errors import InvalidArgumentError
from tessera.serving import workers
from tessera.serving.engine import Engine
from tessera.serving.sklearn_import import OpaqueStepWarning, UnsupportedEstimatorError, import_sklearn

from .conftest import serve


@pytest.fixture(scope="module", autouse=True)
def _stop_workers() -> Iterator[None]:
    yield
    workers.shutdown()


def _worker_pids() -> set[int]:
    pool = workers.default_pool()._pool
    assert pool is not None, "no worker process was started"
    return {p.pid for p in pool._processes.values()}  # type: ignore[union-attr]


def test_unsupported_model_runs_in_a_worker_process(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = make_pipeline(CountVectorizer(), MultinomialNB()).fit(docs[:300], y[:300])
    with pytest.warns(OpaqueStepWarning, match="MultinomialNB runs as an opaque stage"):
        pipe = import_sklearn(sk)
    ops = [n.op for n in pipe.graph.nodes]
    assert ops == ["text_ngrams", "blackbox"]  # the vectorizer stays white-box
    before = workers.default_pool().calls
    e = serve(pipe)
    reg = e.get("p")
    assert "opaque_stage" in reg.plan.rules and reg.outputs == ["predict_proba"]
    preds = e.predict("p", docs[300:])
    assert [p.label for p in preds] == sk.predict(docs[300:]).tolist()
    np.testing.assert_allclose([p.scores for p in preds], sk.predict_proba(docs[300:]), atol=1e-9, rtol=0)
    assert workers.default_pool().calls > before
    pids = _worker_pids()
    assert pids and os.getpid() not in pids


def test_opaque_text_step_then_white_box_head(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = make_pipeline(CountVectorizer(tokenizer=str.split, token_pattern=None), LogisticRegression(max_iter=500))
    sk.fit(docs[:300], y[:300])
    with pytest.warns(OpaqueStepWarning, match="CountVectorizer .*custom tokenizer"):
        pipe = import_sklearn(sk)
    assert [n.op for n in pipe.graph.nodes] == ["columns", "blackbox", "linear"]
    assert [(f.name, f.kind) for f in pipe.graph.inputs] == [("text", "text")]
    e = serve(pipe)
    preds = e.predict("p", docs[300:])
    assert [p.label for p in preds] == sk.predict(docs[300:]).tolist()
    np.testing.assert_allclose([p.scores for p in preds], sk.predict_proba(docs[300:]), atol=1e-9, rtol=0)


def test_opaque_tabular_transform_and_regressor() -> None:
    X, y = load_diabetes(return_X_y=True)
    Xtr, ytr, Xte = X[:300], y[:300], X[300:]
    sk = make_pipeline(FunctionTransformer(np.expm1), StandardScaler(), Ridge()).fit(Xtr, ytr)
    with pytest.warns(OpaqueStepWarning, match="FunctionTransformer"):
        pipe = import_sklearn(sk)
    assert [n.op for n in pipe.graph.nodes] == ["columns", "blackbox", "scale", "linear"]
    e = serve(pipe)
    np.testing.assert_allclose([p.value for p in e.predict("p", Xte.tolist())], sk.predict(Xte), atol=1e-6, rtol=0)
    knn = KNeighborsRegressor(n_neighbors=4).fit(Xtr, ytr)
    with pytest.warns(OpaqueStepWarning, match="KNeighborsRegressor"):
        pipe = import_sklearn(knn)
    e = serve(pipe)
    assert e.get("p").outputs == []
    np.testing.assert_allclose([p.value for p in e.predict("p", Xte.tolist())], knn.predict(Xte), atol=1e-9, rtol=0)


def test_strict_refuses_naming_the_step() -> None:
    X, y = load_iris(return_X_y=True)
    sk = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=500)).fit(X, y)
    with pytest.raises(UnsupportedEstimatorError, match="FunctionTransformer"):
        import_sklearn(sk, strict=True)


def test_server_without_opaque_stages_and_a_bad_pickle_refuse(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = make_pipeline(CountVectorizer(), MultinomialNB()).fit(docs, y)
    with pytest.warns(OpaqueStepWarning):
        pipe = import_sklearn(sk)
    with pytest.raises(InvalidArgumentError, match="opaque steps .*MultinomialNB.* turned off"):
        serve(pipe, engine=Engine(blackbox=False))
    # a pickle that is not one: refused at registration, nothing registered
    bad = next(n for n in pipe.graph.nodes if n.op == "blackbox")
    junk = np.frombuffer(b"\x80\x05not a pickle at all", dtype=np.uint8)
    bad.params["pickle"] = pipe.add(junk)
    e = Engine()
    with pytest.raises(InvalidArgumentError, match="cannot be loaded"):
        serve(pipe, engine=e)
    assert e.pipelines == {}
