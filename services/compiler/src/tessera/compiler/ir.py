"""The graph IR: a flat, topologically ordered list of nodes, each one op with a shape and dtype.

A :class:`Graph` is immutable by convention: passes build new ones (``Graph.replace``).
Values are named by node index. Constants live in ``Graph.consts`` (numpy arrays) and are
referenced by CONST nodes. After fusion, a FUSED node holds a sub-graph ``attrs["body"]``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


class OpKind(enum.Enum):
    """TVM's fusion classes."""

    INJECTIVE = "injective"      # elementwise, broadcast, reshape, transpose, slice, concat, layout
    REDUCTION = "reduction"      # softmax, layer norm, pooling
    COMPLEX = "complex-out-fusable"  # conv2d, matmul: elementwise ops after them fuse into them
    OPAQUE = "opaque"            # never fused (embedding gather)


class Op(enum.Enum):
    # the order here is only for reading; sources first
    INPUT = "input"
    CONST = "const"
    # injective: elementwise
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    MAXIMUM = "maximum"
    MINIMUM = "minimum"
    POW = "pow"
    GT = "gt"
    GE = "ge"
    LT = "lt"
    LE = "le"
    EQ = "eq"
    NE = "ne"
    WHERE = "where"  # (cond, a, b): a where cond != 0, else b
    NEG = "neg"
    RELU = "relu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    SILU = "silu"
    EXP = "exp"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    # injective: data movement
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    CONCAT = "concat"
    SLICE = "slice"
    PAD = "pad"
    DILATE = "dilate"  # zeros between the elements of the spatial axes (transposed convolution)
    RESIZE = "resize"  # interpolate: nearest or bilinear, over the last two axes
    TO_NCHWC = "to_nchwc"
    FROM_NCHWC = "from_nchwc"
    # complex-out-fusable
    CONV2D = "conv2d"
    CONV2D_NCHWC = "conv2d_nchwc"
    MATMUL = "matmul"
    # reduction
    BATCH_NORM = "batch_norm"
    MAX_POOL = "max_pool"
    AVG_POOL = "avg_pool"
    ADAPTIVE_AVG_POOL = "adaptive_avg_pool"
    SOFTMAX = "softmax"
    LAYER_NORM = "layer_norm"
    MEAN = "mean"
    REDUCE_MAX = "reduce_max"
    ARGMAX = "argmax"  # the first index of the maximum along an axis, as float32
    # opaque
    EMBEDDING = "embedding"
    GATHER = "gather"  # torch.gather: index a tensor along one axis by an int64 tensor
    # produced by fusion
    FUSED = "fused"


ELEMENTWISE_UNARY = {Op.NEG, Op.RELU, Op.GELU, Op.GELU_TANH, Op.SIGMOID, Op.TANH, Op.SILU, Op.EXP, Op.SQRT, Op.RSQRT}
ELEMENTWISE_BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAXIMUM, Op.MINIMUM, Op.POW,
                      Op.GT, Op.GE, Op.LT, Op.LE, Op.EQ, Op.NE}
ELEMENTWISE = ELEMENTWISE_UNARY | ELEMENTWISE_BINARY | {Op.WHERE}

KIND: dict[Op, OpKind] = {
    **{op: OpKind.INJECTIVE for op in ELEMENTWISE},
    **{op: OpKind.INJECTIVE for op in (Op.RESHAPE, Op.TRANSPOSE, Op.CONCAT, Op.SLICE, Op.PAD, Op.TO_NCHWC, Op.FROM_NCHWC,
                                             Op.DILATE, Op.RESIZE)},
    Op.CONV2D: OpKind.COMPLEX, Op.CONV2D_NCHWC: OpKind.COMPLEX, Op.MATMUL: OpKind.COMPLEX,
    Op.BATCH_NORM: OpKind.INJECTIVE,  # inference: a per-channel scale and shift
    **{op: OpKind.REDUCTION for op in (Op.MAX_POOL, Op.AVG_POOL, Op.ADAPTIVE_AVG_POOL, Op.SOFTMAX,
                                                                          Op.LAYER_NORM, Op.MEAN, Op.REDUCE_MAX,
                                                                          Op.ARGMAX)},
    Op.EMBEDDING: OpKind.OPAQUE, Op.GATHER: OpKind.OPAQUE, Op.FUSED: OpKind.OPAQUE, Op.INPUT: OpKind.OPAQUE, Op.CONST: OpKind.OPAQUE,
}


@dataclass(frozen=True)
class Node:
    op: Op
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str = "float32"
    attrs: dict[str, Any] = field(default_factory=dict, compare=False)
    name: str = ""

    @property
    def kind(self) -> OpKind:
        return KIND[self.op]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    consts: dict[str, np.ndarray] = field(default_factory=dict, compare=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # pass results (memory plan, ...)

    def replace(self, **kw: Any) -> Graph:
        return replace(self, **kw)

    def users(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in range(len(self.nodes))}
        for i, n in enumerate(self.nodes):
            for j in n.inputs:
                out[j].append(i)
        return out

    def const(self, i: int) -> np.ndarray:
        return self.consts[self.nodes[i].attrs["key"]]

    def is_const(self, i: int) -> bool:
        return self.nodes[i].op is Op.CONST

    def format(self) -> str:
        """One line per node: ``%3 = conv2d(%1, %2) [1, 64, 56, 56] float32 {stride: ...}``."""
        lines = []
        for i, n in enumerate(self.nodes):
            args = ", ".join(f"%{j}" for j in n.inputs)
            shown = {k: v for k, v in n.attrs.items() if k not in ("body", "key")}
            extra = f" {shown}" if shown else ""
            if n.op is Op.FUSED:
                body = n.attrs["body"]
                ops = "+".join(b.op.value for b in body.nodes if b.op not in (Op.INPUT, Op.CONST))
                lines.append(f"%{i} = fused[{ops}]({args}) {list(n.shape)} {n.dtype}  # {n.attrs.get('kind', '')}")
            else:
                tag = "  # out" if i in self.outputs else ""
                lines.append(f"%{i} = {n.op.value}({args}) {list(n.shape)} {n.dtype}{extra}{tag}")
        return "\n".join(lines)


class GraphBuilder:
    """Append nodes to a graph under construction (frontend and passes)."""

    def __init__(self, consts: dict[str, np.ndarray] | None = None) -> None:
        self.nodes: list[Node] = []
        self.inputs: list[int] = []
        self.consts: dict[str, np.ndarray] = dict(consts or {})

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def input(self, shape: Iterable[int], dtype: str = "float32", name: str = "") -> int:
        i = self.add(Node(Op.INPUT, (), tuple(shape), dtype, name=name))
        self.inputs.append(i)
        return i

    def const(self, value: np.ndarray, name: str = "") -> int:
        value = np.array(value, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        key = f"c{len(self.consts)}_{name}" if name else f"c{len(self.consts)}"
        while key in self.consts:
            key += "_"
        self.consts[key] = value
        return self.add(Node(Op.CONST, (), tuple(value.shape), str(value.dtype), {"key": key}, name=name))

    def build(self, outputs: Iterable[int], meta: dict[str, Any] | None = None) -> Graph:
        return Graph(tuple(self.nodes), tuple(self.inputs), tuple(outputs), self.consts, dict(meta or {}))


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(a, b))
