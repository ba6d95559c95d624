"""Flour: pipelines as DAGs of operators, written in Python.

    from tessera.serving import flour

    f = flour.Flour()
    text = f.text("text")
    chars = text.char_ngrams(1, 3, vocabulary=char_terms).tfidf(idf=char_idf)
    words = text.tokenize().ngrams(1, 2, vocabulary=word_terms).tfidf(idf=word_idf)
    model = f.concat(chars, words).logistic(coef, intercept, classes=["neg", "pos"])
    pipeline = f.build(model)            # an IR pipeline: register it with tessera.serving.Client

Tabular inputs: ``f.numbers("age", "income").scale(mean, std)``, ``f.categories("city").onehot([[...]])``.
Models: ``linear`` (regression), ``logistic``, ``tree_ensemble``, and ``torch`` (a
``torch.nn.Sequential`` of Linear / ReLU / Tanh / Sigmoid layers, compiled to dense stages;
``dense`` takes the same layers as numpy arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.serving.ir import Field, Graph, Node, Pipeline, encode_terms

TOKEN_PATTERN = r"(?u)\b\w\w+\b"


class Flour:
    """Builds one pipeline: inputs, operators on them, then :meth:`build`."""

    def __init__(self) -> None:
        self.pipe = Pipeline(Graph([], [], "", "flour"), {})
        self._n = 0

    def _input(self, name: str, kind: str) -> None:
        for f in self.pipe.graph.inputs:
            if f.name == name:
                if f.kind != kind:
                    raise InvalidArgumentError(f"input {name!r} is already a {f.kind} input")
                return
        self.pipe.graph.inputs.append(Field(name, kind))

    def _node(self, op: str, inputs: list[Var], attrs: dict[str, Any], params: dict[str, Any]) -> Var:
        self._n += 1
        nid = f"{op}{self._n}"
        hashes = {r: self.pipe.add(np.asarray(a)) for r, a in params.items() if a is not None}
        self.pipe.graph.nodes.append(Node(nid, op, [v.id for v in inputs], attrs, hashes))
        return Var(self, nid)

    # -- inputs --------------------------------------------------------------------
    def text(self, name: str) -> Text:
        self._input(name, "text")
        return Text(self, name)

    def numbers(self, *names: str) -> Var:
        for n in names:
            self._input(n, "number")
        return self._node("columns", [], {"fields": list(names), "categorical": False}, {})

    def categories(self, *names: str) -> Var:
        for n in names:
            self._input(n, "category")
        return self._node("columns", [], {"fields": list(names), "categorical": True}, {})

    def concat(self, *parts: Var) -> Var:
        return self._node("concat", list(parts), {}, {})

    def build(self, output: Var) -> Pipeline:
        self.pipe.graph.output = output.id
        self.pipe.graph.check()
        return self.pipe


class Text:
    """A text input: featurize it with n-grams or hashing."""

    def __init__(self, f: Flour, name: str, *, lowercase: bool = True, pattern: str = TOKEN_PATTERN,
                 stop_words: Sequence[str] = (), tokenized: bool = False) -> None:
        self.f = f
        self.name = name
        self.lowercase = lowercase
        self.pattern = pattern
        self.stop_words = list(stop_words)
        self.tokenized = tokenized

    def tokenize(self, pattern: str = TOKEN_PATTERN, *, lowercase: bool = True, stop_words: Sequence[str] = ()) -> Text:
        """Words found by ``pattern`` (a regular expression), lowercased, without ``stop_words``."""
        return Text(self.f, self.name, lowercase=lowercase, pattern=pattern, stop_words=stop_words, tokenized=True)

    def _attrs(self, analyzer: str, lo: int, hi: int, binary: bool) -> dict[str, Any]:
        return {"field": self.name, "analyzer": analyzer, "ngram_range": [lo, hi], "lowercase": self.lowercase,
                "strip_accents": None, "token_pattern": self.pattern, "stop_words": sorted(self.stop_words),
                "binary": binary}

    def ngrams(self, lo: int, hi: int, *, vocabulary: Sequence[str], binary: bool = False) -> Var:
        """Counts of word n-grams (lo..hi words) found in ``vocabulary`` (column order)."""
        chars, offsets = encode_terms(list(vocabulary))
        return self.f._node("text_ngrams", [], self._attrs("word", lo, hi, binary), {"terms": chars, "offsets": offsets})

    def word_ngrams(self, lo: int, hi: int, *, vocabulary: Sequence[str], binary: bool = False) -> Var:
        return (self if self.tokenized else self.tokenize()).ngrams(lo, hi, vocabulary=vocabulary, binary=binary)

    def char_ngrams(self, lo: int, hi: int, *, vocabulary: Sequence[str], binary: bool = False,
                    word_bounded: bool = False) -> Var:
        """Counts of character n-grams (lo..hi characters) found in ``vocabulary``."""
        chars, offsets = encode_terms(list(vocabulary))
        attrs = self._attrs("char_wb" if word_bounded else "char", lo, hi, binary)
        return self.f._node("text_ngrams", [], attrs, {"terms": chars, "offsets": offsets})

    def hashing(self, lo: int, hi: int, *, n_features: int = 2**20, analyzer: str = "word", norm: str | None = "l2",
                alternate_sign: bool = True) -> Var:
        attrs = self._attrs(analyzer, lo, hi, False)
        attrs.update(n_features=n_features, norm=norm, alternate_sign=alternate_sign)
        return self.f._node("hashing", [], attrs, {})


class Var:
    """The output of an operator; chain further operators on it."""

    def __init__(self, f: Flour, node_id: str) -> None:
        self.f = f
        self.id = node_id

    def tfidf(self, idf: Any = None, *, norm: str | None = "l2", sublinear_tf: bool = False) -> Var:
        return self.f._node("tfidf", [self], {"norm": norm, "sublinear_tf": sublinear_tf},
                            {"idf": None if idf is None else np.asarray(idf, dtype=np.float64)})

    def scale(self, mean: Any = None, scale: Any = None) -> Var:
        return self.f._node("scale", [self], {}, {"mean": mean, "scale": scale})

    def onehot(self, categories: Sequence[Sequence[Any]], *, ignore_unknown: bool = False) -> Var:
        return self.f._node("onehot", [self], {"categories": [list(c) for c in categories],
                                               "handle_unknown": "ignore" if ignore_unknown else "error"}, {})

    def linear(self, coef: Any, intercept: Any = 0.0) -> Var:
        """A linear regression: ``x . coef + intercept``."""
        c = np.atleast_2d(np.asarray(coef, dtype=np.float64))
        return self.f._node("linear", [self], {"proba": "none"},
                            {"coef": c, "intercept": np.atleast_1d(np.asarray(intercept, dtype=np.float64))})

    def logistic(self, coef: Any, intercept: Any, *, classes: Sequence[Any]) -> Var:
        """Logistic regression: one row of ``coef`` for two classes, else one per class (softmax)."""
        c = np.atleast_2d(np.asarray(coef, dtype=np.float64))
        return self.f._node("linear", [self], {"proba": "logistic", "classes": list(classes)},
                            {"coef": c, "intercept": np.atleast_1d(np.asarray(intercept, dtype=np.float64))})

    def tree_ensemble(self, trees: Sequence[dict[str, Any]], *, n_features: int, combine: str = "sum",
                      scale: float = 1.0, base: Sequence[float] = (0.0,), classes: Sequence[Any] | None = None) -> Var:
        """Trees as dicts of arrays (feature, threshold, left, right, value; -1 children mark a leaf),
        summed (boosting: ``base + scale * sum``) or averaged (forests)."""
        feats: list[np.ndarray] = []
        thr: list[np.ndarray] = []
        left: list[np.ndarray] = []
        right: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        roots: list[int] = []
        off = 0
        for t in trees:
            n = len(t["feature"])
            roots.append(off)
            feats.append(np.asarray(t["feature"], dtype=np.int64))
            thr.append(np.asarray(t["threshold"], dtype=np.float64))
            for src, dst in ((t["left"], left), (t["right"], right)):
                a = np.asarray(src, dtype=np.int64)
                dst.append(np.where(a >= 0, a + off, -1))
            v = np.asarray(t["value"], dtype=np.float64)
            vals.append(v.reshape(n, -1))
            off += n
        attrs: dict[str, Any] = {"combine": combine, "scale": scale, "base": list(base), "n_outputs": len(base),
                                 "n_features": n_features}
        if classes is not None:
            attrs.update(classes=list(classes), proba="logistic" if combine == "sum" else "mean")
            if combine == "mean":
                attrs["n_outputs"] = len(classes)
        params = {"feature": np.concatenate(feats), "threshold": np.concatenate(thr), "left": np.concatenate(left),
                  "right": np.concatenate(right), "value": np.concatenate(vals), "roots": np.asarray(roots),
                  "tree_output": np.zeros(len(trees), dtype=np.int64)}
        return self.f._node("trees", [self], attrs, params)

    def dense(self, layers: Sequence[Any], *, classes: Sequence[Any] | None = None) -> Var:
        """Dense layers: ``(weight (out x in), bias)`` pairs and "relu" / "tanh" / "sigmoid"."""
        spec: list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, str):
                spec.append({"kind": layer})
            else:
                w, b = layer
                spec.append({"kind": "linear"})
                params[f"w{i}"] = np.asarray(w, dtype=np.float64)
                params[f"b{i}"] = np.asarray(b, dtype=np.float64)
        attrs: dict[str, Any] = {"layers": spec, "proba": "softmax" if classes is not None else "none"}
        if classes is not None:
            attrs["classes"] = list(classes)
        return self.f._node("mlp", [self], attrs, params)

    def torch(self, module: Any, *, classes: Sequence[Any] | None = None) -> Var:
        """A ``torch.nn.Sequential`` of Linear / ReLU / Tanh / Sigmoid, compiled into a dense stage
        (its weights become parameters; no torch code is shipped or run by the server)."""
        layers: list[Any] = []
        for m in module.children() if hasattr(module, "children") else module:
            kind = type(m).__name__
            if kind == "Linear":
                w = m.weight.detach().cpu().double().numpy()
                b = m.bias.detach().cpu().double().numpy() if m.bias is not None else np.zeros(w.shape[0])
                layers.append((w, b))
            elif kind in ("ReLU", "Tanh", "Sigmoid"):
                layers.append(kind.lower())
            else:
                raise InvalidArgumentError(f"torch stage: unsupported module {kind} (Linear, ReLU, Tanh, Sigmoid)")
        return self.dense(layers, classes=classes)
