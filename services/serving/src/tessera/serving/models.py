"""Numeric operators: tabular transforms and the model heads (linear, trees, dense networks).

Feature blocks are ``scipy.sparse.csr_matrix`` or 2-D float64 ``numpy`` arrays; a head
returns a :class:`Scores` (raw decision values, probabilities when the model has them,
and the class labels), which the front end turns into predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from tessera.common.errors import InvalidArgumentError
from tessera.serving import csr
from tessera.serving.csr import Csr

Block = Any  # sp.csr_matrix | np.ndarray
Layer = tuple[str, np.ndarray | None, np.ndarray | None]  # ("linear", W (in x out), b) or (activation, None, None)
DenseKernel = Callable[[np.ndarray], np.ndarray]  # (n, in) float -> (n, out) float64: compiled dense layers


class DenseCompiler(Protocol):
    """Compiles dense layers into a kernel at registration, or says None (the stage stays on numpy)."""

    def compile(self, pipeline: str, layers: list[Layer]) -> DenseKernel | None: ...


@dataclass
class Scores:
    decision: np.ndarray  # (n, k) raw outputs (regression values for regressors)
    proba: np.ndarray | None  # (n, n_classes) or None
    classes: list[Any] | None  # None: a regressor
    index: np.ndarray | None = None  # the predicted class of each row, when the model says it (black boxes)
    has_decision: bool = True  # False: ``decision`` is not a decision function (a forest's mean of votes)

    def labels(self) -> np.ndarray:
        """Index into ``classes`` of each row's predicted class."""
        if self.index is not None:
            return self.index
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
        return Scores(decision, decision, classes, has_decision=False)
    elif proba_kind != "none":
        raise InvalidArgumentError(f"unknown probability kind {proba_kind!r}")
    return Scores(decision, proba, classes)


def outputs_of(proba_kind: str, combine: str = "sum", *, classifier: bool = True) -> list[str]:
    """The outputs a head gives besides ``predict``: ``predict_proba`` and/or ``decision_function``."""
    if not classifier:
        return []
    out = []
    if proba_kind != "none":
        out.append("predict_proba")
    if proba_kind != "mean" and combine != "mean":
        out.append("decision_function")
    return out


def _outputs(attrs: dict[str, Any], proba_kind: str, combine: str) -> list[str]:
    """A head's outputs: as the graph says (what its source model offers), else what it computes."""
    given = attrs.get("outputs")
    default = outputs_of(proba_kind, combine, classifier=attrs.get("classes") is not None)
    if given is None:
        return default
    if not isinstance(given, list) or any(o not in default for o in given):
        raise InvalidArgumentError(f"outputs {given!r}: this model can give {default}")
    return list(given)


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
            val = np.atleast_2d(np.asarray(coef_value, dtype=np.float64))
            if val.shape[1] != idx.size or (idx.size and (idx.min() < 0 or idx.max() >= d)) or \
                    np.any(np.diff(idx) <= 0):
                raise InvalidArgumentError("linear: coef_index must be increasing columns < n_features, one per value")
            self._init_common(val.shape[0], d, intercept, attrs)
            self.live, self.coef, self.pruned = idx, val, True
            self.nbytes = 0  # the parameters themselves, shared through the store
            return
        coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
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
        self.outputs = _outputs(attrs, self.proba_kind, "sum")
        self.live = np.zeros(0, dtype=np.int64)

    def dense_layers(self) -> list[Layer] | None:
        """The head as one dense layer (None when pruned: its input is sparse)."""
        return None if self.pruned else [("linear", self.coef.T, self.intercept)]

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
        self.outputs = _outputs(attrs, self.proba_kind, self.combine)
        self.n_features = int(attrs.get("n_features", 0))
        self.depth = int(attrs.get("max_depth", 64))
        miss = p.get("missing_left")
        self.missing_left = None if miss is None else np.asarray(miss).astype(bool).reshape(-1)
        if self.missing_left is not None and self.missing_left.size != n_nodes:
            raise InvalidArgumentError(f"trees: missing_left has {self.missing_left.size} entries for {n_nodes} nodes")
        self.strict_less = attrs.get("cmp", "le") == "lt"  # XGBoost: x < threshold goes left
        if attrs.get("cmp", "le") not in ("le", "lt"):
            raise InvalidArgumentError(f"trees: cmp must be 'le' or 'lt', got {attrs.get('cmp')!r}")
        self.input_dtype = str(attrs.get("input_dtype", "float32"))  # what the source compares inputs as
        if self.input_dtype not in ("float32", "float64"):
            raise InvalidArgumentError(f"trees: input_dtype must be float32 or float64, got {self.input_dtype!r}")
        self._leaf = self.left < 0
        self._safe_feature = np.where(self._leaf, 0, self.feature)
        if self._safe_feature.size and (self._safe_feature.min() < 0 or
                                        (self.n_features and self._safe_feature.max() >= self.n_features)):
            raise InvalidArgumentError("trees: a split reads a feature outside the input")

    def __call__(self, X: Block) -> Scores:
        X = X.toarray() if (sp.issparse(X) or isinstance(X, Csr)) else np.asarray(X)
        if self.n_features and X.shape[1] != self.n_features:
            raise InvalidArgumentError(f"trees expect {self.n_features} features, got {X.shape[1]}")
        X = X.astype(np.float64)
        if self.input_dtype == "float32":
            X = X.astype(np.float32).astype(np.float64)
        n = X.shape[0]
        node = np.broadcast_to(self.roots, (n, self.roots.size)).copy()
        rows = np.arange(n)[:, None]
        for _ in range(self.depth + 1):
            leaf = self._leaf[node]
            if leaf.all():
                break
            x = X[rows, self._safe_feature[node]]
            t = self.threshold[node]
            go_left = x < t if self.strict_less else x <= t
            if self.missing_left is not None:
                nan = np.isnan(x)
                if nan.any():
                    go_left = np.where(nan, self.missing_left[node], go_left)
            nxt = np.where(go_left, self.left[node], self.right[node])
            node = np.where(leaf, node, nxt)
        vals = self.value[node]  # (n, T, v)
        if self.combine == "mean":
            out = vals.mean(axis=1) if self.roots.size > 1 else vals[:, 0, :]
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
            elif kind == "identity":
                continue
            else:
                raise InvalidArgumentError(f"mlp: unsupported layer {kind!r}")
        self.proba_kind = str(attrs.get("proba", "none"))
        self.classes = attrs.get("classes")
        self.outputs = _outputs(attrs, self.proba_kind, "sum")

    def dense_layers(self) -> list[Layer]:
        return list(self.layers)

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


class CompiledHead:
    """A dense head whose layers run as a compiled kernel on dense input (sparse input, rare
    for such heads, takes the numpy path); probabilities are finished in numpy."""

    def __init__(self, head: Linear | Mlp, kernel: DenseKernel) -> None:
        self.head = head
        self.kernel = kernel
        self.classes = head.classes
        self.outputs = head.outputs
        self.proba_kind = head.proba_kind
        self.n_in = head.d if isinstance(head, Linear) else None

    def __call__(self, X: Block) -> Scores:
        if isinstance(X, Csr) or sp.issparse(X):
            return self.head(X)
        X = np.asarray(X, dtype=np.float64)
        if self.n_in is not None and X.shape[1] != self.n_in:
            raise InvalidArgumentError(f"linear model expects {self.n_in} features, got {X.shape[1]}")
        return finish(self.kernel(X), self.proba_kind, self.classes)


# -- tabular transforms (scikit-learn's preprocessing and decomposition steps) -------------
def _dense(X: Block) -> np.ndarray:
    if isinstance(X, Csr) or sp.issparse(X):
        return np.asarray(X.toarray(), dtype=np.float64)
    return np.asarray(X, dtype=np.float64)


def _check_width(op: str, X: Block, d: int) -> None:
    if d and width(X) != d:
        raise InvalidArgumentError(f"{op} expects {d} features, got {width(X)}")


class Affine:
    """``X * mul + add``, optionally clipped (MinMaxScaler)."""

    def __init__(self, mul: np.ndarray | None, add: np.ndarray | None, attrs: dict[str, Any]) -> None:
        self.mul = None if mul is None else np.asarray(mul, dtype=np.float64).reshape(-1)
        self.add = None if add is None else np.asarray(add, dtype=np.float64).reshape(-1)
        clip = attrs.get("clip")
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        sizes = {a.size for a in (self.mul, self.add) if a is not None}
        if len(sizes) > 1:
            raise InvalidArgumentError("affine: mul and add differ in size")
        self.d = sizes.pop() if sizes else 0

    def __call__(self, X: Block) -> np.ndarray:
        _check_width("affine", X, self.d)
        X = _dense(X)
        if self.mul is not None:
            X = X * self.mul
        if self.add is not None:
            X = X + self.add
        if self.clip is not None:
            X = np.clip(X, *self.clip)
        return X


class Normalize:
    """Each row divided by its l1, l2 or max norm (rows of norm 0 stay as they are): Normalizer."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.norm = attrs.get("norm", "l2")
        if self.norm not in ("l1", "l2", "max"):
            raise InvalidArgumentError(f"normalize: norm must be l1, l2 or max, got {self.norm!r}")

    def __call__(self, X: Block) -> Block:
        if isinstance(X, Csr):
            X = X.scipy()
        if sp.issparse(X):
            X = sp.csr_matrix(X, dtype=np.float64, copy=True)
            rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
            if self.norm == "max":
                norms = np.zeros(X.shape[0])
                np.maximum.at(norms, rows, np.abs(X.data))
            else:
                sq = np.abs(X.data) if self.norm == "l1" else X.data * X.data
                norms = np.bincount(rows, weights=sq, minlength=X.shape[0])
                if self.norm == "l2":
                    norms = np.sqrt(norms)
            norms[norms == 0.0] = 1.0
            X.data /= norms[rows]
            return X
        X = np.asarray(X, dtype=np.float64)
        if self.norm == "l1":
            norms = np.abs(X).sum(axis=1)
        elif self.norm == "l2":
            norms = np.sqrt(np.einsum("ij,ij->i", X, X))
        else:
            norms = np.max(np.abs(X), axis=1) if X.shape[1] else np.zeros(X.shape[0])
        norms[norms == 0.0] = 1.0
        out: np.ndarray = X / norms[:, None]
        return out


class Impute:
    """Missing values (NaN, or a given number) replaced by each column's fill value; columns
    whose fill is NaN (all-missing in training) dropped; optional indicator columns (SimpleImputer)."""

    def __init__(self, fill: np.ndarray, attrs: dict[str, Any]) -> None:
        self.fill = np.asarray(fill, dtype=np.float64).reshape(-1)
        mv = attrs.get("missing", "nan")
        self.missing_nan = mv == "nan"
        self.missing_value = 0.0 if self.missing_nan else float(mv)
        keep = attrs.get("keep")
        self.keep = None if keep is None else np.asarray(keep, dtype=np.int64)
        self.indicator = np.asarray(attrs.get("indicator") or [], dtype=np.int64)
        d = self.fill.size
        for name, idx in (("keep", self.keep), ("indicator", self.indicator)):
            if idx is not None and idx.size and (idx.min() < 0 or idx.max() >= d):
                raise InvalidArgumentError(f"impute: {name} names a column outside the {d} inputs")

    def _mask(self, X: np.ndarray) -> np.ndarray:
        return np.isnan(X) if self.missing_nan else (X == self.missing_value)

    def __call__(self, X: Block) -> np.ndarray:
        _check_width("impute", X, self.fill.size)
        X = _dense(X)
        mask = self._mask(X)
        out = np.where(mask, self.fill, X)
        if self.keep is not None:
            out = out[:, self.keep]
        if self.indicator.size:
            out = np.hstack([out, mask[:, self.indicator].astype(np.float64)])
        return out


class Poly:
    """Products of input powers, one column per row of ``powers`` (PolynomialFeatures)."""

    def __init__(self, powers: np.ndarray) -> None:
        self.powers = np.atleast_2d(np.asarray(powers, dtype=np.int64))
        if self.powers.size and (self.powers.min() < 0 or self.powers.max() > 16):
            raise InvalidArgumentError("poly: powers must be 0..16")
        self.d = self.powers.shape[1]
        # each output column as the list of input columns to multiply (a power p repeats a column p times)
        self.terms = [np.repeat(np.arange(self.d), row) for row in self.powers]

    def __call__(self, X: Block) -> np.ndarray:
        _check_width("poly", X, self.d)
        X = _dense(X)
        out = np.empty((X.shape[0], len(self.terms)))
        for j, cols in enumerate(self.terms):
            if cols.size == 0:
                out[:, j] = 1.0
                continue
            v = X[:, cols[0]].copy()
            for c in cols[1:]:
                v *= X[:, c]
            out[:, j] = v
        return out


class KBins:
    """Bin index of each column from its inner bin edges; one-hot (sparse or dense) or ordinal
    (KBinsDiscretizer)."""

    def __init__(self, edges: np.ndarray, offsets: np.ndarray, attrs: dict[str, Any]) -> None:
        e = np.asarray(edges, dtype=np.float64).reshape(-1)
        o = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if o.size < 2 or o[0] != 0 or o[-1] != e.size or np.any(np.diff(o) < 0):
            raise InvalidArgumentError("kbins: edge_offsets must rise from 0 to the number of edges")
        self.inner = [e[o[j]:o[j + 1]] for j in range(o.size - 1)]
        self.n_bins = np.asarray([a.size + 1 for a in self.inner], dtype=np.int64)
        self.col_off = np.concatenate([[0], np.cumsum(self.n_bins)]).astype(np.int64)
        self.encode = attrs.get("encode", "onehot")
        if self.encode not in ("onehot", "onehot-dense", "ordinal"):
            raise InvalidArgumentError(f"kbins: encode must be onehot, onehot-dense or ordinal, got {self.encode!r}")

    def __call__(self, X: Block) -> Block:
        _check_width("kbins", X, len(self.inner))
        X = _dense(X)
        bins = np.empty(X.shape, dtype=np.float64)
        for j, edges in enumerate(self.inner):
            bins[:, j] = np.searchsorted(edges, X[:, j], side="right")
        if self.encode == "ordinal":
            return bins
        n, d = X.shape
        cols = (bins.astype(np.int64) + self.col_off[:-1]).reshape(-1)
        M = sp.csr_matrix((np.ones(n * d), cols, np.arange(0, n * d + 1, d)), shape=(n, int(self.col_off[-1])))
        return M.toarray() if self.encode == "onehot-dense" else M


class Project:
    """``X @ components.T - mean @ components.T``, divided by ``divisor`` (PCA, whitened PCA, TruncatedSVD)."""

    def __init__(self, components: np.ndarray, mean: np.ndarray | None, divisor: np.ndarray | None) -> None:
        self.components = np.atleast_2d(np.asarray(components, dtype=np.float64))
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
        self.divisor = None if divisor is None else np.asarray(divisor, dtype=np.float64).reshape(-1)
        k, d = self.components.shape
        if self.mean is not None and self.mean.size != d:
            raise InvalidArgumentError(f"project: mean has {self.mean.size} values for {d} features")
        if self.divisor is not None and self.divisor.size != k:
            raise InvalidArgumentError(f"project: divisor has {self.divisor.size} values for {k} components")

    def __call__(self, X: Block) -> np.ndarray:
        _check_width("project", X, self.components.shape[1])
        if isinstance(X, Csr):
            X = X.scipy()
        # centred after the projection, as scikit-learn does (sparse input stays sparse)
        out = np.asarray(X @ self.components.T, dtype=np.float64)
        if self.mean is not None:
            out = out - self.mean @ self.components.T
        if self.divisor is not None:
            out = out / self.divisor
        return out
