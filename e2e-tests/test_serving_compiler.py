"""Serving with the compiler on a stack brought up by `tessera up`: a torch stage and a scikit-learn MLP
registered through the SDK are compiled by the cluster's compiler into C kernels at registration;
predictions equal the source models', the compile is a child of the registration's trace, and
opaque and output options work through the service."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.naive_bayes import MultinomialNB
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tessera.serving import Client, flour
from tessera.serving.sklearn_import import OpaqueStepWarning

pytestmark = [pytest.mark.e2e, pytest.mark.long, pytest.mark.timeout(400)]


def test_dense_stages_compiled_by_the_cluster_compiler(stack: Any, otlp: Any, poll: Any) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    f = flour.Flour()
    policy = f.build(f.numbers("a", "b", "c", "d").torch(net, classes=["l", "m", "r"]))
    X, y = load_iris(return_X_y=True)
    mlp = make_pipeline(StandardScaler(), MLPClassifier((10,), max_iter=400, random_state=0)).fit(X, y)
    with Client(cluster_address=stack.info()["control_store_address"], timeout=300) as c:
        info = c.register("policy", policy)
        assert "compile_dense" in info.rules and info.outputs == ["predict_proba", "decision_function"]
        rows = X.astype(np.float32)
        with torch.no_grad():
            logits = net(torch.from_numpy(rows)).numpy()
        preds = c.predict("policy", rows.tolist())
        np.testing.assert_allclose([p.scores for p in preds], torch.softmax(torch.from_numpy(logits), 1).numpy(),
                                   atol=1e-5)
        dec = c.predict("policy", rows[:5].tolist(), output="decision_function")
        np.testing.assert_allclose([p.scores for p in dec], logits[:5], atol=1e-5)

        info = c.register("iris-mlp", mlp)
        assert "compile_dense" in info.rules and info.outputs == ["predict_proba"]
        preds = c.predict("iris-mlp", X.tolist())
        assert [p.label for p in preds] == mlp.predict(X).tolist()
        np.testing.assert_allclose([p.scores for p in preds], mlp.predict_proba(X), atol=1e-5)

        # an unsupported step: served opaquely (a worker process of the replica), with a warning
        docs = ["good food", "bad food", "great staff", "awful room", "good view", "bad staff"] * 5
        labels = [1, 0, 1, 0, 1, 0] * 5
        nb = make_pipeline(CountVectorizer(), MultinomialNB()).fit(docs, labels)
        with pytest.warns(OpaqueStepWarning, match="MultinomialNB"):
            info = c.register("nb", nb)
        assert info.opaque_steps == ["MultinomialNB"] and "opaque_stage" in info.rules
        got = c.predict("nb", ["good staff", "awful food"])
        np.testing.assert_allclose([p.scores for p in got], nb.predict_proba(["good staff", "awful food"]), atol=1e-9)
        import grpc

        with pytest.raises(grpc.RpcError) as err:  # a model without a decision function says so
            c.predict("iris-mlp", X[:2].tolist(), output="decision_function")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no decision_function" in err.value.details()
        for name in ("policy", "iris-mlp", "nb"):
            c.unregister(name)

    def compile_spans() -> list[Any]:
        return [s for s in otlp.spans if s.name == "serving.compile" and s.attributes.get("tessera.compiler.artifacts")]

    spans = poll(lambda: len(compile_spans()) >= 2 and compile_spans(), timeout=60, what="serving.compile spans")
    for s in spans[:2]:
        trace = otlp.trace(s.trace_id)
        register = [t for t in trace if t.service == "serving" and "Register" in t.name]
        assert register, f"the compile span is not in a registration's trace: {[t.name for t in trace]}"
        ids = {t.span_id for t in trace}
        assert s.parent_span_id in ids  # a child within the registration's trace
