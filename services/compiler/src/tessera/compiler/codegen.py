"""From a fused, planned graph to a :class:`Program`: one lowered kernel per FUSED node (or op),
the order of their calls and where each argument lives (an input, an output, the arena, the
weights blob). Backends render programs; nothing here is specific to C."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.compiler import te, topi
from tessera.compiler.ir import Graph, Node, Op
from tessera.compiler.lower import LoweredFunc, lower
from tessera.compiler.te import Tensor
from tessera.compiler.templates import pack_panels, schedule_group


@dataclass
class Arg:
    kind: str  # input, output, arena, const
    index: int  # input/output position, or element offset into the arena / weights


@dataclass
class Call:
    func: LoweredFunc
    args: list[Arg]
    label: str
    flops: float = 0.0
    node: int = -1


@dataclass
class Program:
    calls: list[Call]
    n_inputs: int
    n_outputs: int
    arena_size: int = 0  # float32 elements, workspace included
    workspace_offset: int = 0
    weights: np.ndarray = field(default_factory=lambda: np.zeros(16, np.float32))
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)


def _flops(body: Graph) -> float:
    """Multiply-adds counted as 2 FLOPs for conv/matmul; 1 per output element for everything else."""
    total = 0.0
    for n in body.nodes:
        if n.op is Op.CONV2D or n.op is Op.CONV2D_NCHWC:
            w = body.nodes[n.inputs[1]].shape
            red = int(np.prod(w[1:4])) * (w[4] if n.op is Op.CONV2D_NCHWC else 1)
            total += 2.0 * n.size * red
        elif n.op is Op.MATMUL:
            total += 2.0 * n.size * body.nodes[n.inputs[0]].shape[-1]
        elif n.op not in (Op.INPUT, Op.CONST):
            total += n.size
    return total


def kernel_for(node: Node, name: str, knobs: dict[str, Any] | None = None, consts: Collection[int] = ()) -> LoweredFunc:
    """Tensor expressions for a FUSED node's body, its default schedule, lowered. ``consts``: positions of
    the inputs that are constants (the kernel may take one re-laid, as ``LoweredFunc.prepacked`` says)."""
    body: Graph = node.attrs["body"]
    tensors: dict[int, Tensor] = {}
    params: list[Tensor] = []
    for i, n in enumerate(body.nodes):
        if n.op is Op.INPUT:
            t = te.placeholder(n.shape, f"{name}_in{len(params)}", n.dtype)
            params.append(t)
        else:
            t = topi.compute_node(n, [tensors[j] for j in n.inputs], f"{name}_{i}")
        tensors[i] = t
    out = tensors[body.outputs[0]]
    sch = schedule_group(out, knobs, {params[i].uid for i in consts if i < len(params)})
    prepacked: dict[int, int] = {}
    for i, t in enumerate(params):
        if t.uid in sch.prepacked:
            params[i], prepacked[i] = sch.prepacked[t.uid]
    f = lower(sch, params, [out], name)
    f.prepacked = prepacked
    return f


def build_program(graph: Graph, knobs: dict[int, dict[str, Any]] | None = None) -> Program:
    """One call per FUSED node, in order, with arguments placed by the memory plan."""
    storage = graph.meta["storage"]
    consts: dict[tuple[str, int], int] = {}
    blobs: list[np.ndarray] = []
    woff = 0

    def arg(j: int, panels: int = 0) -> Arg:
        """Where node ``j``'s value lives; a constant taken as B panels ``panels`` wide is packed here, once."""
        nonlocal woff
        kind, where = storage[j]
        if kind == "const":
            key = (where, panels)
            if key not in consts:
                a = np.ascontiguousarray(graph.consts[where], dtype=np.float32)
                a = (pack_panels(a, panels) if panels else a).ravel()
                consts[key] = woff
                blobs.append(a)
                pad = -a.size % 16
                if pad:
                    blobs.append(np.zeros(pad, np.float32))
                woff += a.size + pad
            return Arg("const", consts[key])
        return Arg(kind, int(where))

    calls: list[Call] = []
    for i, n in enumerate(graph.nodes):
        if n.op is not Op.FUSED:
            continue
        const_in = [p for p, j in enumerate(n.inputs) if storage[j][0] == "const"]
        f = kernel_for(n, f"k{len(calls)}", (knobs or {}).get(i), const_in)
        args = [arg(j, f.prepacked.get(p, 0)) for p, j in enumerate(n.inputs)]
        calls.append(Call(f, [*args, arg(i)], n.attrs["label"], _flops(n.attrs["body"]), i))
    arena = int(graph.meta["arena_size"])
    ws = max((c.func.workspace for c in calls), default=0)
    weights = np.concatenate(blobs) if blobs else np.zeros(16, np.float32)
    return Program(calls, len(graph.inputs), len(graph.outputs), arena + ws, arena, weights,
                   [graph.nodes[i].shape for i in graph.inputs], [graph.nodes[i].dtype for i in graph.inputs],
                   [graph.nodes[o].shape for o in graph.outputs])
