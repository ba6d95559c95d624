"""The intermediate representation of a pipeline: a DAG of operators plus its parameters.

A :class:`Graph` is JSON (operator names, attributes, edges); every array it needs is a
parameter referenced by the hash of its content, so two pipelines that share a vocabulary
name the same parameter and a server keeps it once. This is the wire format of a
registered pipeline: a client converts its pipeline to a graph and arrays (never pickle),
the server validates the graph before anything is stored.

Operators (``Node.op``):

- ``text_ngrams``: counts of vocabulary n-grams of a text field (analyzer word/char/char_wb).
- ``hashing``: hashed n-gram counts (a HashingVectorizer).
- ``tfidf``: term-frequency transform, idf weights and row normalization of counts.
- ``columns``: selects fields of a record as a numeric (or categorical) matrix.
- ``scale``: (x - mean) / scale.
- ``onehot``: one-hot encoding of categorical columns.
- ``concat``: side-by-side concatenation of feature blocks.
- ``linear``: linear model (regression, logistic, SVM, SGD heads); weights dense (``coef``) or
  as the live columns only (``coef_index``, ``coef_value``, attribute ``n_features``).
- ``trees``: tree ensemble (gradient boosting or random forest).
- ``mlp``: a small dense network (Linear/ReLU/Tanh/Sigmoid layers, from torch modules or
  scikit-learn's MLPClassifier/MLPRegressor).
- ``affine``: ``x * mul + add``, optionally clipped (MinMaxScaler).
- ``normalize``: rows divided by their l1, l2 or max norm (Normalizer).
- ``impute``: missing values replaced per column, optional indicator columns (SimpleImputer).
- ``poly``: products of input powers (PolynomialFeatures).
- ``kbins``: bin indices, one-hot or ordinal (KBinsDiscretizer).
- ``project``: ``(x - mean) @ components.T / divisor`` (PCA, TruncatedSVD).
- ``blackbox``: an opaque scikit-learn step (a pickle, parameter ``pickle``), run in a worker
  process; attribute ``kind`` is ``transform`` or ``model``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError

FIELD_KINDS = ("text", "number", "category")
OPS: dict[str, tuple[tuple[str, ...], int | None]] = {
    # op: (parameter roles it needs, number of inputs or None for any >= 1)
    "text_ngrams": (("terms", "offsets"), 0),
    "hashing": ((), 0),
    "tfidf": ((), 1),  # "idf" optional
    "columns": ((), 0),
    "scale": ((), 1),  # "mean", "scale" optional
    "onehot": ((), 1),
    "concat": ((), None),
    "linear": (("intercept",), 1),  # and "coef" (dense), or "coef_index" + "coef_value" (live columns)
    "trees": (("feature", "threshold", "left", "right", "value", "roots", "tree_output"), 1),
    "mlp": ((), 1),
    "affine": ((), 1),  # "mul", "add" optional
    "normalize": ((), 1),
    "impute": (("fill",), 1),
    "poly": (("powers",), 1),
    "kbins": (("edges", "edge_offsets"), 1),
    "project": (("components",), 1),  # "mean", "divisor" optional
    "blackbox": (("pickle",), 1),
}
HEADS = ("linear", "trees", "mlp")  # ops that end a pipeline (and "blackbox" of kind "model")
ALLOWED_DTYPES = ("<f8", "<f4", "<i8", "<i4", "<u4", "|u1", "<u1")  # numpy spells bytes "|u1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_name(name: str) -> str:
    """A pipeline name: 1-128 of letters, digits, ``_ . -``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgumentError(f"bad pipeline name {name!r}: use 1-128 letters, digits, '_', '.', '-'")
    return name


def tensor_hash(arr: np.ndarray) -> str:
    """Content hash of an array: dtype, shape and bytes."""
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:40]


def encode_terms(terms: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Terms (in column order) as one UTF-32 array plus offsets: a vocabulary as two flat arrays."""
    joined = "".join(terms)
    chars = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype="<u4").copy()
    offsets = np.zeros(len(terms) + 1, dtype="<i8")
    if terms:
        np.cumsum([len(t) for t in terms], out=offsets[1:])
    return chars, offsets


def decode_terms(chars: np.ndarray, offsets: np.ndarray) -> list[str]:
    s = np.ascontiguousarray(chars, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")
    o = offsets.tolist()
    return [s[o[i]:o[i + 1]] for i in range(len(o) - 1)]


@dataclass
class Field:
    name: str
    kind: str  # text | number | category


@dataclass
class Node:
    id: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # role -> parameter hash


@dataclass
class Graph:
    """Inputs, nodes in topological order, and the node whose output is the prediction."""

    inputs: list[Field]
    nodes: list[Node]
    output: str
    source: str = ""  # what the graph was made from, e.g. "sklearn:Pipeline"

    def to_json(self) -> str:
        return json.dumps({
            "inputs": [[f.name, f.kind] for f in self.inputs],
            "nodes": [{"id": n.id, "op": n.op, "inputs": n.inputs, "attrs": n.attrs, "params": n.params}
                      for n in self.nodes],
            "output": self.output, "source": self.source,
        }, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Graph:
        """Parse and validate a graph (structure only; parameters are checked by :func:`validate`)."""
        try:
            d = json.loads(text)
            inputs = [Field(str(n), str(k)) for n, k in d["inputs"]]
            nodes = [Node(str(n["id"]), str(n["op"]), [str(i) for i in n.get("inputs", [])],
                          dict(n.get("attrs", {})), {str(k): str(v) for k, v in n.get("params", {}).items()})
                     for n in d["nodes"]]
            g = cls(inputs, nodes, str(d["output"]), str(d.get("source", "")))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # a node not an object, too deep
            raise InvalidArgumentError(f"malformed pipeline graph: {type(e).__name__}: {e}") from None
        g.check()
        return g

    def check(self) -> None:
        if not self.inputs:
            raise InvalidArgumentError("pipeline graph has no inputs")
        names = set()
        for f in self.inputs:
            if f.kind not in FIELD_KINDS:
                raise InvalidArgumentError(f"input {f.name!r}: kind must be one of {FIELD_KINDS}, got {f.kind!r}")
            if f.name in names:
                raise InvalidArgumentError(f"input {f.name!r} given twice")
            names.add(f.name)
        seen: set[str] = set()
        for n in self.nodes:
            if n.op not in OPS:
                raise InvalidArgumentError(f"node {n.id!r}: unknown operator {n.op!r} (known: {', '.join(OPS)})")
            if n.id in seen or n.id in names:
                raise InvalidArgumentError(f"node id {n.id!r} is not unique")
            roles, arity = OPS[n.op]
            if arity is not None and len(n.inputs) != arity:
                raise InvalidArgumentError(f"node {n.id!r} ({n.op}) takes {arity} input(s), got {len(n.inputs)}")
            if arity is None and not n.inputs:
                raise InvalidArgumentError(f"node {n.id!r} ({n.op}) needs at least one input")
            for i in n.inputs:
                if i not in seen:
                    raise InvalidArgumentError(f"node {n.id!r} reads {i!r}, which is not an earlier node")
            for r in roles:
                if r not in n.params:
                    raise InvalidArgumentError(f"node {n.id!r} ({n.op}) lacks parameter {r!r}")
            if n.op in ("text_ngrams", "hashing", "columns"):
                flds = n.attrs.get("fields") if n.op == "columns" else [n.attrs.get("field")]
                if not isinstance(flds, list) or not flds:
                    raise InvalidArgumentError(f"node {n.id!r} ({n.op}) names no input field")
                for fname in flds:
                    if not isinstance(fname, str) or fname not in names:
                        raise InvalidArgumentError(f"node {n.id!r} reads unknown input field {fname!r}")
            seen.add(n.id)
        if self.output not in seen:
            raise InvalidArgumentError(f"output {self.output!r} is not a node of the graph")

    def param_hashes(self) -> list[str]:
        return sorted({h for n in self.nodes for h in n.params.values()})

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)


@dataclass
class Pipeline:
    """A graph and the arrays it references (hash -> array): what a client registers."""

    graph: Graph
    params: dict[str, np.ndarray]

    def add(self, arr: np.ndarray) -> str:
        a = np.ascontiguousarray(arr)
        if a.dtype.str not in ALLOWED_DTYPES:
            a = a.astype("<f8") if a.dtype.kind == "f" else a.astype("<i8")
        h = tensor_hash(a)
        self.params[h] = a
        return h

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())


def check_tensor(h: str, dtype: str, shape: list[int], data: bytes | memoryview) -> np.ndarray:
    """An array from wire fields, verified against its hash."""
    if dtype not in ALLOWED_DTYPES:
        raise InvalidArgumentError(f"parameter {h}: dtype {dtype!r} not allowed (one of {ALLOWED_DTYPES})")
    if any(s < 0 for s in shape):
        raise InvalidArgumentError(f"parameter {h}: negative shape {shape}")
    n = math.prod(shape)  # Python integers: np.prod wraps around (2**62 * 4 elements made 0)
    if n * np.dtype(dtype).itemsize != len(data):
        raise InvalidArgumentError(f"parameter {h}: {len(data)} bytes do not make a {dtype} array of shape {shape}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if tensor_hash(arr) != h:
        raise InvalidArgumentError(f"parameter {h}: content does not match its hash")
    return arr
