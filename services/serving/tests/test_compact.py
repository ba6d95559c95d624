"""Compact storage of parameters: float32 heads (tolerance on every supported estimator), zero-copy weights,
int32 featurizer scratch, content hashes without copies."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import Pipeline

from tessera.common import heap
from tessera.serving import featurize
from tessera.serving.compact import FLOAT32_ATOL, FLOAT32_RTOL, with_head_dtype
from tessera.serving.engine import Engine
from tessera.serving.featurize import NgramCounter
from tessera.serving.ir import encode_terms, tensor_hash
from tessera.serving.sklearn_import import import_sklearn

from .conftest import serve
from .test_parity import TEXT_PIPELINES, _tab_ct

TABULAR = {
    "linreg": (LinearRegression, {}), "ridge": (Ridge, {"alpha": 2.0}),
    "gbr": (GradientBoostingRegressor, {"n_estimators": 20, "max_depth": 3, "random_state": 0}),
    "rfr": (RandomForestRegressor, {"n_estimators": 10, "max_depth": 6, "random_state": 0}),
    "lr": (LogisticRegression, {"max_iter": 1000}),
    "gbc": (GradientBoostingClassifier, {"n_estimators": 15, "random_state": 0}),
    "rfc": (RandomForestClassifier, {"n_estimators": 10, "random_state": 0}),
}


def _both(sk: Any, records: list[Any]) -> tuple[Any, Any, Engine]:
    ir = import_sklearn(sk)
    e64 = serve(ir)
    small = with_head_dtype(ir, "float32")
    e32 = serve(small)
    return e64.predict("p", records), e32.predict("p", records), e32


def _check_within_tolerance(p64: list[Any], p32: list[Any]) -> None:
    s64 = np.array([p.scores for p in p64])
    s32 = np.array([p.scores for p in p32])
    np.testing.assert_allclose(s32, s64, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    for a, b, s in zip(p64, p32, s64, strict=True):
        top = np.sort(s)[-2:] if s.size > 1 else np.array([0.0, s[0]])
        if abs(top[1] - top[0]) > 2 * (FLOAT32_ATOL + FLOAT32_RTOL * abs(top[1])):  # not a tie within tolerance
            assert (a.label, a.class_index) == (b.label, b.class_index)
        assert b.value == pytest.approx(a.value, rel=FLOAT32_RTOL, abs=FLOAT32_ATOL)


def _weights_are_float32_views(e: Engine) -> None:
    """Every linear head computes with the float32 array the store holds (no float64 copy of its own)."""
    heads = [st.fn for st in e.get("p").plan.stages if st.kind == "head" and hasattr(st.fn, "coef")]
    for lin in heads:
        assert lin.coef.dtype == np.float32
        if lin.nbytes == 0:  # (a head pruned when its plan was built owns its live columns: nbytes says so)
            assert any(np.shares_memory(lin.coef, e.store.get(h)) for h in e.get("p").params)


@pytest.mark.parametrize("name", sorted(TEXT_PIPELINES))
def test_float32_text_heads_within_tolerance(name: str, texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = TEXT_PIPELINES[name]().fit(docs[:300], y[:300])
    p64, p32, e32 = _both(sk, docs[300:])
    _check_within_tolerance(p64, p32)
    _weights_are_float32_views(e32)


@pytest.mark.parametrize("model", sorted(TABULAR))
def test_float32_tabular_heads_within_tolerance(model: str, tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    X, y, cls = tabular
    est_cls, kw = TABULAR[model]
    target = cls if est_cls in (LogisticRegression, GradientBoostingClassifier, RandomForestClassifier) else y
    sk = Pipeline([("ct", _tab_ct()), ("m", est_cls(**kw))]).fit(X[:200], target[:200])
    p64, p32, e32 = _both(sk, [list(r) for r in X[200:]])
    _check_within_tolerance(p64, p32)
    _weights_are_float32_views(e32)


def test_float32_halves_linear_weights_and_keeps_the_rest(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = TEXT_PIPELINES["tfidf_char_word_lr"]().fit(docs[:300], y[:300])
    ir = import_sklearn(sk)
    small = with_head_dtype(ir, "float32")
    head64 = ir.graph.node(ir.graph.output)
    head32 = small.graph.node(small.graph.output)
    for role, h in head32.params.items():
        if role in ("coef", "coef_value"):
            assert small.params[h].dtype == np.float32
            assert small.params[h].nbytes * 2 == ir.params[head64.params[role]].nbytes
        else:  # intercept, live-column index: as they were
            assert h == head64.params[role]
    shared = {h for n in ir.graph.nodes if n.op != "linear" for h in n.params.values()}
    assert shared <= set(small.params)  # the featurizer's parameters are the same (still shared)
    assert with_head_dtype(ir, "float64") is ir
    with pytest.raises(ValueError, match="head_dtype"):
        with_head_dtype(ir, "float16")


def test_float64_heads_are_views_of_the_stored_parameters(texts: tuple[list[str], np.ndarray]) -> None:
    docs, y = texts
    sk = TEXT_PIPELINES["tfidf_char_word_lr"]().fit(docs[:300], y[:300])
    e = serve(import_sklearn(sk))
    lin = e.get("p").plan.stages[-1].fn
    assert any(np.shares_memory(lin.coef, e.store.get(h)) for h in e.get("p").params)


def test_tensor_hash_reads_the_bytes_in_place() -> None:
    import hashlib

    for a in (np.arange(10.0), np.zeros((3, 0)), np.arange(6, dtype="<u4").reshape(2, 3),
              np.arange(12.0).reshape(3, 4).T, np.array(5.0)):
        c = np.ascontiguousarray(a)
        ref = hashlib.sha256(f"{c.dtype.str}|{c.shape}|".encode())
        ref.update(c.tobytes())
        assert tensor_hash(a) == ref.hexdigest()[:40]


def _counter(kind: str) -> NgramCounter:
    terms = ["a", "b", "ab", "ba", "abc", " a", "hello", "hello world", "world"]
    chars, offsets = encode_terms(terms)
    return NgramCounter(chars, offsets, {"analyzer": kind, "ngram_range": [1, 3] if kind == "char" else [1, 2],
                                         "token_pattern": r"(?u)\b\w+\b"})


@pytest.mark.parametrize("kind", ["char", "word"])
def test_featurizer_scratch_restarts_document_numbers(kind: str) -> None:
    c = _counter(kind)
    if c.lib is None:
        pytest.skip("no C compiler here: the Python path has no scratch")
    docs = ["ab ba abc", "hello world a", "b b b a", "nothing here"]
    ref = c(docs)
    c._scratch.doc = featurize._INT32_MAX - 2  # the next batch would pass int32: marks start again
    out = c(docs)
    assert c._scratch.doc == len(docs)
    np.testing.assert_array_equal(out.indptr, ref.indptr)
    np.testing.assert_array_equal(out.indices, ref.indices)
    np.testing.assert_array_equal(out.data, ref.data)
    assert c._scratch.mark[id(c)].dtype == np.int32


@pytest.mark.parametrize("kind", ["char", "word"])
def test_featurizer_splits_batches_past_int32_positions(kind: str, monkeypatch: Any) -> None:
    c = _counter(kind)
    if c.lib is None:
        pytest.skip("no C compiler here")
    docs = ["ab ba abc", "hello world a", "b b b a", "nothing here", "abcabc hello"]
    ref = c(docs)
    monkeypatch.setattr(featurize, "_INT32_MAX", 30)  # every batch of more than one short text is split
    out = c(docs)
    np.testing.assert_array_equal(out.indptr, ref.indptr)
    np.testing.assert_array_equal(out.indices, ref.indices)
    np.testing.assert_array_equal(out.data, ref.data)


def test_lookup_table_is_eight_bytes_a_slot() -> None:
    c = _counter("char")
    if c.lib is None:
        pytest.skip("no C compiler here")
    assert c.nbytes == 64 * 8  # 9 terms: 64 slots (a power of two >= 2 x 9 + 16) of an int32 index and a 32-bit hash


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_heap_trim_calls_malloc_trim() -> None:
    blocks = [bytearray(200_000) for _ in range(50)]
    del blocks
    assert heap.trim() is True
