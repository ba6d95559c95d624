"""Dense heads compiled into C kernels (rule ``compile_dense``): predictions equal the source model's.

The kernels are built by the compiler itself, in this process (the service builds the same
graph the same way; e2e-tests/test_serving_compiler.py goes through the service)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from tessera.common.config import Settings
from tessera.serving import flour
from tessera.serving.compiled import CHUNK, CompilerLink, Kernel, dense_graph
from tessera.serving.engine import Engine
from tessera.serving.models import DenseKernel, Layer
from tessera.serving.sklearn_import import import_sklearn

from .conftest import serve

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("tessera.compiler", reason="the compiler is not installed")


class LocalCompiler:
    """The DenseCompiler protocol answered by the compiler's own compile_graph, in this process."""

    def __init__(self, cache: Path) -> None:
        self.cache = str(cache)
        self.calls = 0

    def compile(self, pipeline: str, layers: list[Layer]) -> DenseKernel | None:
        from tessera.compiler.api import compile_graph

        self.calls += 1
        one, chunk = (compile_graph(dense_graph(layers, rows), cache_dir=self.cache) for rows in (1, CHUNK))
        linears = [w for k, w, _ in layers if k == "linear"]
        return Kernel(one, chunk, int(linears[0].shape[0]), int(linears[-1].shape[1]), ["local-1", "local-32"])


class Refusing:
    def compile(self, pipeline: str, layers: list[Layer]) -> DenseKernel | None:
        return None


@pytest.fixture(scope="module")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> LocalCompiler:
    return LocalCompiler(tmp_path_factory.mktemp("kernels"))


def test_torch_stage_compiled_equals_torch(compiler: LocalCompiler) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3))
    f = flour.Flour()
    pipe = f.build(f.numbers("a", "b", "c", "d").torch(net, classes=["x", "y", "z"]))
    e = serve(pipe, engine=Engine(compiler=compiler))
    reg = e.get("p")
    assert "compile_dense" in reg.plan.rules and type(reg.plan.stages[-1].fn).__name__ == "CompiledHead"
    X = np.random.default_rng(1).normal(size=(70, 4)).astype(np.float32)  # 70 rows: two full chunks and a padded one
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(X)), dim=1).numpy()
    for rows in (X[:1], X):  # the one-row kernel and the chunked one
        preds = e.predict("p", rows.tolist())
        np.testing.assert_allclose([p.scores for p in preds], ref[:len(rows)], atol=1e-5, rtol=0)
        assert [p.class_index for p in preds] == ref[:len(rows)].argmax(axis=1).tolist()


def test_sklearn_dense_heads_compiled_equal_sklearn(compiler: LocalCompiler) -> None:
    X, y = load_breast_cancer(return_X_y=True)
    Xi, yi = load_iris(return_X_y=True)
    for sk, data in ((make_pipeline(StandardScaler(), MLPClassifier((12,), max_iter=400, random_state=0)), (Xi, yi)),
                     (make_pipeline(MinMaxScaler(), LogisticRegression(max_iter=2000)), (X, y))):
        Xs, ys = data
        sk.fit(Xs[::2], ys[::2])
        e = serve(import_sklearn(sk, strict=True), engine=Engine(compiler=compiler))
        assert "compile_dense" in e.get("p").plan.rules
        test = Xs[1::2]
        preds = e.predict("p", test.tolist())
        assert [p.label for p in preds] == sk.predict(test).tolist()
        # float32 kernels: probabilities within 1e-5 of scikit-learn's float64
        np.testing.assert_allclose([p.scores for p in preds], sk.predict_proba(test), atol=1e-5, rtol=0)


def test_sparse_heads_stay_on_numpy_and_a_refusal_falls_back(compiler: LocalCompiler,
                                                            texts: tuple[list[str], np.ndarray]) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs, y = texts
    sk = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=500)).fit(docs, y)
    before = compiler.calls
    e = serve(import_sklearn(sk, strict=True), engine=Engine(compiler=compiler))
    assert compiler.calls == before and "compile_dense" not in e.get("p").plan.rules  # sparse input: not asked
    Xi, yi = load_iris(return_X_y=True)
    mlp = make_pipeline(StandardScaler(), MLPClassifier((8,), max_iter=300, random_state=0)).fit(Xi, yi)
    e = serve(import_sklearn(mlp, strict=True), engine=Engine(compiler=Refusing()))
    assert "compile_dense" not in e.get("p").plan.rules
    np.testing.assert_allclose([p.scores for p in e.predict("p", Xi.tolist())], mlp.predict_proba(Xi), atol=1e-9)


def test_link_without_a_reachable_cluster_falls_back_with_a_warning(caplog: Any) -> None:
    """A control store that is not there: the compile is skipped with a warning, registration goes on."""
    from tessera.common import procs

    link = CompilerLink(Settings(control_store_address=f"127.0.0.1:{procs.free_port()}", rpc_timeout_s=2.0))
    Xi, yi = load_iris(return_X_y=True)
    mlp = make_pipeline(StandardScaler(), MLPClassifier((8,), max_iter=300, random_state=0)).fit(Xi, yi)
    with caplog.at_level(logging.WARNING, logger="tessera.serving.compiled"):
        e = serve(import_sklearn(mlp, strict=True), engine=Engine(compiler=link))
    assert "compile_dense" not in e.get("p").plan.rules and link.fallbacks == 1
    assert any("dense stage on numpy" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose([p.scores for p in e.predict("p", Xi.tolist())], mlp.predict_proba(Xi), atol=1e-9)
