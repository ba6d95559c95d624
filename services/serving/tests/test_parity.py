"""Predictions of imported scikit-learn pipelines equal scikit-learn's (1e-6), estimator by estimator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer, TfidfTransformer, TfidfVectorizer
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, SGDClassifier
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import LinearSVC

from tessera.common.errors import InvalidArgumentError
from tessera.serving.engine import Engine
from tessera.serving.sklearn_import import UnsupportedEstimatorError, import_sklearn

from .conftest import serve

TOL = 1e-6


def _check_classifier(sk: Any, e: Engine, X: Any) -> None:
    preds = e.predict("p", list(X))
    assert [p.label for p in preds] == sk.predict(X).tolist()
    ours = np.array([p.scores for p in preds])
    ref = sk.predict_proba(X) if hasattr(sk, "predict_proba") else sk.decision_function(X)
    ref = np.asarray(ref).reshape(len(preds), -1)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


TEXT_PIPELINES = {
    "tfidf_char_word_lr": lambda: Pipeline([
        ("f", FeatureUnion([("c", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                            ("w", TfidfVectorizer(ngram_range=(1, 2)))])),
        ("m", LogisticRegression(max_iter=500, C=3.0))]),
    "count_svc": lambda: make_pipeline(CountVectorizer(binary=True, stop_words=["again"]), LinearSVC()),
    "char_wb_sublinear_sgd": lambda: make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, norm="l1"),
        SGDClassifier(loss="log_loss", random_state=0)),
    "accents_count_tfidf_lr": lambda: make_pipeline(
        CountVectorizer(strip_accents="unicode", lowercase=False, ngram_range=(1, 2)), TfidfTransformer(),
        LogisticRegression(max_iter=500)),
    "hashing_hinge_sgd": lambda: make_pipeline(HashingVectorizer(n_features=2**12, analyzer="char", ngram_range=(1, 2)),
                                               SGDClassifier(random_state=0)),
}


@pytest.mark.parametrize("name", sorted(TEXT_PIPELINES))
def test_text_pipelines_match_sklearn(name: str, texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = TEXT_PIPELINES[name]().fit(docs[:300], y[:300])
    e = serve(import_sklearn(sk))
    _check_classifier(sk, e, docs[300:])


def test_binary_text_classifier_and_python_path(texts: tuple[list[str], np.ndarray], monkeypatch: Any) -> None:
    docs, y = texts
    yb = (y == "pos").astype(int)
    sk = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 3)), LogisticRegression()).fit(docs, yb)
    _check_classifier(sk, serve(import_sklearn(sk)), docs[:100])
    from tessera.serving import native  # the fallback without a C compiler gives the same features

    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_lib", None)
    _check_classifier(sk, serve(import_sklearn(sk)), docs[:100])


def _tab_ct(scale: bool = True) -> ColumnTransformer:
    return ColumnTransformer([("num", StandardScaler() if scale else "passthrough", [0, 1, 2, 3]),
                              ("cat", OneHotEncoder(handle_unknown="ignore"), [4])])


@pytest.mark.parametrize("model", ["linreg", "ridge", "gbr", "rfr"])
def test_tabular_regressors_match_sklearn(model: str, tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, _ = tabular
    est = {"linreg": LinearRegression(), "ridge": Ridge(alpha=2.0),
           "gbr": GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0),
           "rfr": RandomForestRegressor(n_estimators=15, max_depth=6, random_state=0)}[model]
    sk = Pipeline([("ct", _tab_ct()), ("m", est)]).fit(X[:200], y[:200])
    e = serve(import_sklearn(sk))
    preds = e.predict("p", [list(r) for r in X[200:]])
    np.testing.assert_allclose([p.value for p in preds], sk.predict(X[200:]), atol=TOL, rtol=0)


@pytest.mark.parametrize("model", ["gbc", "gbc3", "rfc", "lr"])
def test_tabular_classifiers_match_sklearn(model: str, tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, cls = tabular
    target = cls if model != "gbc3" else np.digitize(y, np.quantile(y, [0.33, 0.66]))
    est = {"gbc": GradientBoostingClassifier(n_estimators=20, random_state=0),
           "gbc3": GradientBoostingClassifier(n_estimators=15, max_depth=2, random_state=0),
           "rfc": RandomForestClassifier(n_estimators=12, random_state=0), "lr": LogisticRegression(max_iter=1000)}[model]
    sk = Pipeline([("ct", _tab_ct()), ("m", est)]).fit(X[:200], target[:200])
    e = serve(import_sklearn(sk))
    _check_classifier(sk, e, X[200:])


def test_records_by_field_name_and_unknown_category(tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, _ = tabular
    sk = Pipeline([("ct", _tab_ct()), ("m", Ridge())]).fit(X, y)
    pipe = import_sklearn(sk)
    assert [f.kind for f in pipe.graph.inputs] == ["number"] * 4 + ["category"]
    e = serve(pipe)
    rec = {"x0": 0.5, "x1": 40.0, "x2": 1.1, "x3": 0.0, "x4": "purple"}  # unknown: ignored, as sklearn does
    row = np.array([[0.5, 40.0, 1.1, 0.0, "purple"]], dtype=object)
    assert e.predict("p", [rec])[0].value == pytest.approx(sk.predict(row)[0], abs=TOL)


def test_plain_numeric_pipeline(tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, _ = tabular
    num = X[:, :4].astype(float)
    sk = make_pipeline(StandardScaler(), LinearRegression()).fit(num, y)
    e = serve(import_sklearn(sk))
    np.testing.assert_allclose([p.value for p in e.predict("p", num.tolist())], sk.predict(num), atol=TOL)


def test_unsupported_estimator_is_named(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = make_pipeline(CountVectorizer(), MultinomialNB()).fit(docs, y)
    with pytest.raises(UnsupportedEstimatorError, match="MultinomialNB"):
        import_sklearn(sk)
    with pytest.raises(UnsupportedEstimatorError, match="custom tokenizer"):
        import_sklearn(make_pipeline(CountVectorizer(tokenizer=str.split), LogisticRegression()).fit(docs, y))
    assert issubclass(UnsupportedEstimatorError, InvalidArgumentError)
