"""Flour pipelines: the same features and predictions as the equivalent scikit-learn pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion

from tessera.common.errors import InvalidArgumentError
from tessera.serving import flour
from tessera.serving.sklearn_import import import_sklearn

from .conftest import serve


def _terms(vec: TfidfVectorizer) -> list[str]:
    return sorted(vec.vocabulary_, key=vec.vocabulary_.get)


def test_flour_text_pipeline_equals_sklearn(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    cv = TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit(docs)
    wv = TfidfVectorizer(ngram_range=(1, 2)).fit(docs)
    feat = FeatureUnion([("c", cv), ("w", wv)])
    lr = LogisticRegression(max_iter=300).fit(feat.transform(docs), y)

    f = flour.Flour()
    text = f.text("text")
    chars = text.char_ngrams(1, 3, vocabulary=_terms(cv)).tfidf(cv.idf_)
    words = text.tokenize().ngrams(1, 2, vocabulary=_terms(wv)).tfidf(wv.idf_)
    pipe = f.build(f.concat(chars, words).logistic(lr.coef_, lr.intercept_, classes=lr.classes_.tolist()))
    e = serve(pipe)
    assert e.get("p").plan.rules == ["fuse_featurizers", "sparse_dot"]
    got = np.array([p.scores for p in e.predict("p", docs[:60])])
    np.testing.assert_allclose(got, lr.predict_proba(feat.transform(docs[:60])), atol=1e-6)
    # a Flour graph with the same vocabularies names the same parameters as the imported pipeline
    sk_ir = import_sklearn(__import__("sklearn.pipeline").pipeline.Pipeline([("f", feat), ("m", lr)]))
    assert set(sk_ir.params) == set(pipe.params)


def test_flour_tabular_trees_and_dense(tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, _ = tabular
    num = X[:, :4].astype(float)
    mean, std = num.mean(axis=0), num.std(axis=0)
    gb = GradientBoostingRegressor(n_estimators=10, max_depth=3, random_state=0).fit((num - mean) / std, y)
    f = flour.Flour()
    x = f.numbers("a", "b", "c", "d").scale(mean, std)
    trees = [{"feature": t.tree_.feature, "threshold": t.tree_.threshold, "left": t.tree_.children_left,
              "right": t.tree_.children_right, "value": t.tree_.value[:, 0, 0]} for t in gb.estimators_[:, 0]]
    base = float(gb._raw_predict_init(np.zeros((1, 4)))[0, 0])
    pipe = f.build(x.tree_ensemble(trees, n_features=4, scale=gb.learning_rate, base=[base]))
    e = serve(pipe)
    recs = [dict(zip("abcd", r, strict=True)) for r in num[:30].tolist()]
    np.testing.assert_allclose([p.value for p in e.predict("p", recs)], gb.predict(((num - mean) / std)[:30]), atol=1e-6)

    # a dense network stage, and one-hot categories beside numbers
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = rng.normal(size=(8, 7)), rng.normal(size=8), rng.normal(size=(3, 8)), rng.normal(size=3)
    f2 = flour.Flour()
    feats = f2.concat(f2.numbers("a", "b", "c", "d"), f2.categories("color").onehot([["blue", "green", "red"]]))
    pipe2 = f2.build(feats.dense([(w1, b1), "relu", (w2, b2)], classes=["x", "y", "z"]))
    e2 = serve(pipe2)
    recs2 = [{**r, "color": c} for r, c in zip(recs, X[:30, 4].tolist(), strict=True)]
    onehot = (X[:30, 4:5] == np.array([["blue", "green", "red"]])).astype(float)
    h = np.maximum(np.hstack([num[:30], onehot]) @ w1.T + b1, 0) @ w2.T + b2
    want = np.exp(h - h.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose([p.scores for p in e2.predict("p", recs2)], want, atol=1e-9)
    with pytest.raises(InvalidArgumentError, match="unknown category"):
        e2.predict("p", [{**recs2[0], "color": "purple"}])


def test_torch_stage() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    f = flour.Flour()
    e = serve(f.build(f.numbers("a", "b", "c").torch(net)))
    x = torch.randn(10, 3, dtype=torch.float64)
    want = net.double()(x).detach().numpy()[:, 0]
    got = [p.value for p in e.predict("p", x.numpy().tolist())]
    np.testing.assert_allclose(got, want, atol=1e-9)
