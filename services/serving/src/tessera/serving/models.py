"""Numeric operators: tabular transforms and the model heads (linear, trees, dense networks).

Feature blocks are ``scipy.sparse.csr_matrix`` or 2-D float64 ``numpy`` arrays; a head
returns a :class:`Scores` (raw decision values, probabilities when the model has them,
and the class labels), which the front end turns into predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from tessera.common.errors import InvalidArgumentError
from tessera.serving import csr
from tessera.serving.csr import Csr

Block = Any  # sp.csr_matrix | np.ndarray


@dataclass
class Scores:
    decision: np.ndarray  # (n, k) raw outputs (regression values for regressors)
    proba: np.ndarray | None  # (n, n_classes) or None
    classes: list[Any] | None  # None: a regressor

    def labels(self) -> np.ndarray:
        """Index into ``classes`` of each row's predicted class."""
        if self.proba is not None:
            return np.argmax(self.proba, axis=1)
        d = self.decision
        if d.shape[1] == 1:
            return (d[:, 0] > 0).astype(np.int64)
        return np.argmax(d, axis=1)


def hstack(blocks: list[Block]) -> Block:
    if all(isinstance(b, Csr) for b in blocks):
        return csr.hstack(blocks)
    blocks = [b.scipy() if isinstance(b, Csr) else b for b in blocks]
    if any(sp.issparse(b) for b in blocks):
        return sp.hstack([sp.csr_matrix(b) for b in blocks], format="csr")
    return np.hstack(blocks)


def width(b: Block) -> int:
    return int(b.shape[1])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def finish(decision: np.ndarray, proba_kind: str, classes: list[Any] | None) -> Scores:
    """Probabilities from raw decisions: logistic (binary), softmax, or one-vs-rest logistic."""
    proba = None
    if proba_kind == "logistic":
        if decision.shape[1] == 1:
            p = _sigmoid(decision[:, 0])
            proba = np.stack([1.0 - p, p], axis=1)
        else:
            proba = _softmax(decision)
    elif proba_kind == "softmax":
        proba = _softmax(decision)
    elif proba_kind == "ovr_logistic":
        if decision.shape[1] == 1:
            p = _sigmoid(decision[:, 0])
            proba = np.stack([1.0 - p, p], axis=1)
        else:
            p = _sigmoid(decision)
            s = p.sum(axis=1, keepdims=True)
            s[s == 0] = 1.0
            proba = p / s
    elif proba_kind == "mean":
        proba = decision
    elif proba_kind != "none":
        raise InvalidArgumentError(f"unknown probability kind {proba_kind!r}")
    return Scores(decision, proba, classes)


def _weights(a: np.ndarray) -> np.ndarray:
    """Weights as stored when float64 or float32 (products accumulate in float64 either way), else float64."""
    a = np.asarray(a)
    return a if a.dtype in (np.float64, np.float32) else a.astype(np.float64)


class Linear:
    """X @ coef.T + intercept, sparse or dense X. With ``prune``, columns whose weights are all
    zero are dropped (the dead features cost nothing at prediction time)."""

    def __init__(self, coef: np.ndarray | None, intercept: np.ndarray, attrs: dict[str, Any], *, prune: bool = True,
                 coef_index: np.ndarray | None = None, coef_value: np.ndarray | None = None) -> None:
        if coef is None:  # weights given for the live columns only
            if coef_index is None or coef_value is None:
                raise InvalidArgumentError("linear: give coef, or coef_index and coef_value")
            d = int(attrs.get("n_features", 0))
            idx = np.asarray(coef_index).reshape(-1)  # kept as given (int32): no private copy
            if idx.dtype.kind not in "iu":
                raise InvalidArgumentError("linear: coef_index must be integers")
            val = np.atleast_2d(_weights(coef_value))
            if val.shape[1] != idx.size or (idx.size and (idx.min() < 0 or idx.max() >= d)) or \
                    np.any(np.diff(idx) <= 0):
                raise InvalidArgumentError("linear: coef_index must be increasing columns < n_features, one per value")
            self._init_common(val.shape[0], d, intercept, attrs)
            self.live, self.coef, self.pruned = idx, val, True
            self.nbytes = 0  # the parameters themselves, shared through the store
            return
        coef = np.atleast_2d(_weights(coef))
        self._init_common(coef.shape[0], coef.shape[1], intercept, attrs)
        self.pruned = False
        live = np.flatnonzero(np.any(coef != 0.0, axis=0))
        if prune and live.size < 0.5 * self.d:
            # dead-feature pruning: keep only live columns; inputs are matched against them
            self.live = live
            self.coef = np.ascontiguousarray(coef[:, live])
            self.pruned = True
        else:
            self.coef = np.ascontiguousarray(coef)  # the shared parameter itself (already C-ordered)
        self.nbytes = self.coef.nbytes + self.live.nbytes if self.pruned else 0

    def _init_common(self, k: int, d: int, intercept: np.ndarray, attrs: dict[str, Any]) -> None:
        self.k, self.d = k, d
        self.intercept = np.asarray(intercept, dtype=np.float64).reshape(-1)
        if self.intercept.size == 1 and self.k > 1:
            self.intercept = np.repeat(self.intercept, self.k)
        if self.intercept.size != self.k:
            raise InvalidArgumentError(f"linear: intercept has {self.intercept.size} values for {self.k} outputs")
        self.proba_kind = str(attrs.get("proba", "none"))
        self.classes = attrs.get("classes")
        self.live = np.zeros(0, dtype=np.int64)

    def __call__(self, X: Block) -> Scores:
        if width(X) != self.d:
            raise InvalidArgumentError(f"linear model expects {self.d} features, got {width(X)}")
        if isinstance(X, Csr):
            if self.pruned:
                if self.live.size == 0:
                    return finish(np.zeros((X.shape[0], self.k)) + self.intercept, self.proba_kind, self.classes)
                pos = np.minimum(np.searchsorted(self.live, X.indices), self.live.size - 1)
                keep = self.live[pos] == X.indices
                rows = X.rows()[keep]
                w = self.coef[:, pos[keep]] * X.data[keep]
                d = np.stack([np.bincount(rows, weights=w[j], minlength=X.shape[0]) for j in range(self.k)], axis=1)
                return finish(d + self.intercept, self.proba_kind, self.classes)
            d = X.dot(self.coef) + self.intercept
            return finish(d, self.proba_kind, self.classes)
        if self.pruned:
            X = sp.csr_matrix(X)[:, self.live] if sp.issparse(X) else X[:, self.live]
        dense = np.asarray(X @ self.coef.T, dtype=np.float64) + self.intercept
        return finish(dense, self.proba_kind, self.classes)


class Columns:
    """Fields of records as a matrix: numbers as float64, categories as an object array."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.fields: list[str] = list(attrs["fields"])
        self.categorical = bool(attrs.get("categorical", False))

    def __call__(self, columns: dict[str, list[Any]], n: int) -> np.ndarray:
        if self.categorical:
            out = np.empty((n, len(self.fields)), dtype=object)
            for j, f in enumerate(self.fields):
                out[:, j] = columns[f]
            return out
        return np.asarray([columns[f] for f in self.fields], dtype=np.float64).T.reshape(n, len(self.fields))


class Scale:
    def __init__(self, mean: np.ndarray | None, scale: np.ndarray | None) -> None:
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)

    def __call__(self, X: Block) -> Block:
        if isinstance(X, Csr):
            X = X.scipy()
        if sp.issparse(X):
            if self.mean is not None:
                raise InvalidArgumentError("scale: centering sparse input is not supported")
            return sp.csr_matrix(X.multiply(1.0 / self.scale)) if self.scale is not None else X
        X = np.asarray(X, dtype=np.float64)
        if self.mean is not None:
            X = X - self.mean
        if self.scale is not None:
            X = X / self.scale
        return X


class OneHot:
    """One-hot columns; ``categories`` per input column (JSON values), optional dropped index."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        cats = attrs["categories"]
        self.lookup = [{_key(c): i for i, c in enumerate(col)} for col in cats]
        self.sizes = [len(col) for col in cats]
        drop = attrs.get("drop_idx")
        self.drop = [None if d is None else int(d) for d in drop] if drop is not None else [None] * len(cats)
        self.ignore_unknown = attrs.get("handle_unknown", "error") == "ignore"
        widths = [s - (0 if d is None else 1) for s, d in zip(self.sizes, self.drop, strict=True)]
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.dense = not bool(attrs.get("sparse_output", True))

    def __call__(self, X: np.ndarray) -> Block:
        n = X.shape[0]
        if X.shape[1] != len(self.lookup):
            raise InvalidArgumentError(f"onehot expects {len(self.lookup)} columns, got {X.shape[1]}")
        rows, cols = [], []
        for j, table in enumerate(self.lookup):
            drop = self.drop[j]
            for i in range(n):
                k = table.get(_key(X[i, j]))
                if k is None:
                    if self.ignore_unknown:
                        continue
                    raise InvalidArgumentError(f"column {j}: unknown category {X[i, j]!r}")
                if drop is not None:
                    if k == drop:
                        continue
                    if k > drop:
                        k -= 1
                rows.append(i)
                cols.append(self.offsets[j] + k)
        M = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, int(self.offsets[-1])))
        return M.toarray() if self.dense else M


def _key(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return v


class Trees:
    """A tree ensemble evaluated for all trees at once, one tree level per step.

    Inputs are compared as float32, as scikit-learn's trees do. ``tree_output[t]`` is the
    output column that tree ``t`` adds to; the ensemble is ``base + scale * sum`` (boosting)
    or the mean over trees (forests).
    """

    def __init__(self, p: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        self.feature = np.asarray(p["feature"], dtype=np.int64)
        self.threshold = np.asarray(p["threshold"], dtype=np.float64)
        self.left = np.asarray(p["left"], dtype=np.int64)
        self.right = np.asarray(p["right"], dtype=np.int64)
        self.value = np.asarray(p["value"], dtype=np.float64)
        if self.value.ndim == 1:
            self.value = self.value[:, None]
        self.roots = np.asarray(p["roots"], dtype=np.int64)
        self.tree_output = np.asarray(p["tree_output"], dtype=np.int64)
        n_nodes = self.feature.size
        for name, arr in (("left", self.left), ("right", self.right), ("roots", self.roots)):
            if arr.size and (arr.max() >= n_nodes or arr.min() < -1):
                raise InvalidArgumentError(f"trees: {name} points outside the {n_nodes} nodes")
        self.combine = str(attrs.get("combine", "sum"))
        self.scale = float(attrs.get("scale", 1.0))
        self.base = np.asarray(attrs.get("base", [0.0]), dtype=np.float64)
        self.n_outputs = int(attrs.get("n_outputs", 1))
        self.proba_kind = str(attrs.get("proba", "none"))
        self.classes = attrs.get("classes")
        self.n_features = int(attrs.get("n_features", 0))
        self.depth = int(attrs.get("max_depth", 64))
        self._leaf = self.left < 0
        self._safe_feature = np.where(self._leaf, 0, self.feature)

    def __call__(self, X: Block) -> Scores:
        X = X.toarray() if (sp.issparse(X) or isinstance(X, Csr)) else np.asarray(X)
        if self.n_features and X.shape[1] != self.n_features:
            raise InvalidArgumentError(f"trees expect {self.n_features} features, got {X.shape[1]}")
        X = X.astype(np.float32).astype(np.float64)
        n = X.shape[0]
        node = np.broadcast_to(self.roots, (n, self.roots.size)).copy()
        rows = np.arange(n)[:, None]
        for _ in range(self.depth + 1):
            leaf = self._leaf[node]
            if leaf.all():
                break
            x = X[rows, self._safe_feature[node]]
            nxt = np.where(x <= self.threshold[node], self.left[node], self.right[node])
            node = np.where(leaf, node, nxt)
        vals = self.value[node]  # (n, T, v)
        if self.combine == "mean":
            out = vals.mean(axis=1)
        else:
            onehot = np.zeros((self.roots.size, self.n_outputs))
            onehot[np.arange(self.roots.size), self.tree_output] = 1.0
            out = self.base + self.scale * (vals[:, :, 0] @ onehot)
        return finish(out, self.proba_kind, self.classes)


class Mlp:
    """Dense layers and activations (a torch.nn.Sequential of Linear/ReLU/Tanh/Sigmoid)."""

    def __init__(self, layers: list[dict[str, Any]], p: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        self.layers: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
        for i, layer in enumerate(layers):
            kind = layer["kind"]
            if kind == "linear":
                self.layers.append((kind, np.asarray(p[f"w{i}"], dtype=np.float64).T.copy(),
                                    np.asarray(p[f"b{i}"], dtype=np.float64)))
            elif kind in ("relu", "tanh", "sigmoid"):
                self.layers.append((kind, None, None))
            else:
                raise InvalidArgumentError(f"mlp: unsupported layer {kind!r}")
        self.proba_kind = str(attrs.get("proba", "none"))
        self.classes = attrs.get("classes")

    def __call__(self, X: Block) -> Scores:
        h = X.toarray() if (sp.issparse(X) or isinstance(X, Csr)) else np.asarray(X, dtype=np.float64)
        for kind, w, b in self.layers:
            if kind == "linear":
                assert w is not None and b is not None
                h = h @ w + b
            elif kind == "relu":
                h = np.maximum(h, 0.0)
            elif kind == "tanh":
                h = np.tanh(h)
            else:
                h = _sigmoid(h)
        return finish(h, self.proba_kind, self.classes)
