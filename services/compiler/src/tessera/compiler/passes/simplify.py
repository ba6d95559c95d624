"""Constant folding, batch-norm folding into convolutions, dead-code elimination."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tessera.compiler.ir import Graph, GraphBuilder, Node, Op


def rebuild(graph: Graph, rewrite: Callable[[GraphBuilder, int, Node, list[int]], int | None]) -> Graph:
    """Copy ``graph`` node by node; ``rewrite(b, i, node, new_inputs)`` may emit replacement nodes and
    return the new id of node i (None: copy it unchanged)."""
    b = GraphBuilder(graph.consts)
    remap: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        ins = [remap[j] for j in n.inputs]
        new = rewrite(b, i, n, ins)
        if new is None:
            new = b.add(Node(n.op, tuple(ins), n.shape, n.dtype, dict(n.attrs), n.name))
            if n.op is Op.INPUT:
                b.inputs.append(new)
        remap[i] = new
    return Graph(tuple(b.nodes), tuple(remap[i] for i in graph.inputs), tuple(remap[o] for o in graph.outputs),
                 b.consts, dict(graph.meta))


_NP_UNARY: dict[Op, Callable[[np.ndarray], np.ndarray]] = {
    Op.NEG: np.negative, Op.RELU: lambda x: np.maximum(x, 0), Op.EXP: np.exp, Op.SQRT: np.sqrt,
    Op.RSQRT: lambda x: 1 / np.sqrt(x), Op.TANH: np.tanh, Op.SIGMOID: lambda x: 1 / (1 + np.exp(-x)),
}
_NP_BINARY: dict[Op, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.divide, Op.MAXIMUM: np.maximum,
}


def numpy_eval(n: Node, args: list[np.ndarray]) -> np.ndarray | None:
    """Evaluate ``n`` on constant inputs, or None if this op is not folded."""
    if n.op in _NP_UNARY:
        return _NP_UNARY[n.op](args[0])
    if n.op in _NP_BINARY:
        return _NP_BINARY[n.op](args[0], args[1])
    if n.op is Op.RESHAPE:
        return args[0].reshape(n.shape)
    if n.op is Op.TRANSPOSE:
        return args[0].transpose(n.attrs["perm"])
    if n.op is Op.CONCAT:
        return np.concatenate(args, axis=n.attrs["axis"])
    if n.op is Op.SLICE:
        sl = tuple(slice(s, s + st * d, st) for s, st, d in zip(n.attrs["starts"], n.attrs["steps"], n.shape, strict=True))
        return args[0][sl]
    if n.op is Op.TO_NCHWC:
        x = args[0]
        nb, c, h, w = x.shape
        cb = n.attrs["block"]
        return x.reshape(nb, c // cb, cb, h, w).transpose(0, 1, 3, 4, 2)
    if n.op is Op.MATMUL:
        return np.matmul(args[0], args[1])
    return None


def fold_constants(graph: Graph) -> Graph:
    """Evaluate at compile time every node whose inputs are all constants."""
    def rw(b: GraphBuilder, i: int, n: Node, ins: list[int]) -> int | None:
        if not ins or not all(b.nodes[j].op is Op.CONST for j in ins):
            return None
        value = numpy_eval(n, [b.consts[b.nodes[j].attrs["key"]] for j in ins])
        if value is None:
            return None
        value = np.ascontiguousarray(value, dtype=np.float32 if value.dtype.kind == "f" else value.dtype)
        assert tuple(value.shape) == n.shape, (n, value.shape)
        return b.const(value, n.name or n.op.value)
    return eliminate_dead_code(rebuild(graph, rw))


def fold_batchnorm(graph: Graph) -> Graph:
    """conv2d (constant weights) -> batch_norm (constants): one conv2d with scaled weights and a bias."""
    users = graph.users()

    def rw(b: GraphBuilder, i: int, n: Node, ins: list[int]) -> int | None:
        if n.op is not Op.BATCH_NORM:
            return None
        src = b.nodes[ins[0]]
        orig = graph.nodes[i].inputs[0]
        if src.op is not Op.CONV2D or len(users[orig]) != 1 or orig in graph.outputs:
            return None
        if not all(b.nodes[j].op is Op.CONST for j in [*src.inputs[1:], *ins[1:]]):
            return None
        c = lambda j: b.consts[b.nodes[j].attrs["key"]]  # noqa: E731
        w = c(src.inputs[1]).astype(np.float64)
        bias = c(src.inputs[2]).astype(np.float64) if len(src.inputs) > 2 else np.zeros(w.shape[0])
        gamma, beta, mean, var = (c(j).astype(np.float64) for j in ins[1:])
        scale = gamma / np.sqrt(var + n.attrs.get("eps", 1e-5))
        w2 = b.const((w * scale[:, None, None, None]).astype(np.float32), f"{src.name}_w")
        b2 = b.const(((bias - mean) * scale + beta).astype(np.float32), f"{src.name}_b")
        return b.add(Node(Op.CONV2D, (src.inputs[0], w2, b2), n.shape, n.dtype, dict(src.attrs), src.name))
    return eliminate_dead_code(rebuild(graph, rw))


def eliminate_dead_code(graph: Graph) -> Graph:
    """Drop nodes that no output depends on (inputs always stay), and the constants they held."""
    live = set(graph.outputs) | set(graph.inputs)
    for i in range(len(graph.nodes) - 1, -1, -1):
        if i in live:
            live.update(graph.nodes[i].inputs)
    b = GraphBuilder()
    remap: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if i not in live:
            continue
        attrs = dict(n.attrs)
        if n.op is Op.CONST:
            b.consts[attrs["key"]] = graph.consts[attrs["key"]]
        remap[i] = b.add(Node(n.op, tuple(remap[j] for j in n.inputs), n.shape, n.dtype, attrs, n.name))
    return Graph(tuple(b.nodes), tuple(remap[i] for i in graph.inputs), tuple(remap[o] for o in graph.outputs),
                 b.consts, dict(graph.meta))
