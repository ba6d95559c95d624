"""Graphs as bytes (what the SDK sends to the service), and checks of a graph that came from outside.

The format is an ``.npz`` archive (no pickle): ``graph.json`` holds the nodes (op, inputs, shape,
dtype, attributes), the graph's inputs and outputs; every constant is an array of its own.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.compiler.ir import ELEMENTWISE, Graph, Node, Op, broadcast_shape

FORMAT = "tessera-graph/1"


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def dump_graph(graph: Graph) -> bytes:
    nodes = [{"op": n.op.value, "inputs": list(n.inputs), "shape": list(n.shape), "dtype": n.dtype, "name": n.name,
              "attrs": {k: _plain(v) for k, v in n.attrs.items()}} for n in graph.nodes]
    if any(n.op is Op.FUSED for n in graph.nodes):
        raise InvalidArgumentError("serialize the graph before the passes (it has fused nodes)")
    doc = {"format": FORMAT, "nodes": nodes, "inputs": list(graph.inputs), "outputs": list(graph.outputs)}
    buf = io.BytesIO()
    arrays = {f"const_{i}": graph.consts[k] for i, k in enumerate(sorted(graph.consts))}
    keys = {k: f"const_{i}" for i, k in enumerate(sorted(graph.consts))}
    for n in doc["nodes"]:
        if n["op"] == "const":
            n["attrs"]["key"] = keys[n["attrs"]["key"]]
    np.savez(buf, __graph__=np.frombuffer(json.dumps(doc).encode(), np.uint8), **arrays)
    return buf.getvalue()


def load_graph(data: bytes) -> Graph:
    """Parse and check; any problem raises InvalidArgumentError saying what is wrong."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            doc = json.loads(bytes(z["__graph__"]).decode())
            consts = {k: np.array(z[k]) for k in z.files if k != "__graph__"}
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, EOFError) as e:
        raise InvalidArgumentError(f"the model bytes are not a Tessera graph ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidArgumentError(f"the model bytes are not a {FORMAT} document")
    nodes = []
    try:
        for i, n in enumerate(doc["nodes"]):
            try:
                op = Op(n["op"])
            except ValueError:
                raise InvalidArgumentError(f"unsupported op {n['op']!r} at node {i} ({n.get('name') or 'unnamed'})") from None
            if op is Op.FUSED:
                raise InvalidArgumentError(f"node {i}: fused nodes cannot be sent")
            attrs = {k: _tuples(v) for k, v in n.get("attrs", {}).items()}
            nodes.append(Node(op, tuple(int(j) for j in n["inputs"]), tuple(int(s) for s in n["shape"]), str(n["dtype"]),
                              attrs, str(n.get("name", ""))))
        graph = Graph(tuple(nodes), tuple(int(i) for i in doc["inputs"]), tuple(int(o) for o in doc["outputs"]), consts)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"malformed graph document: {type(e).__name__}: {e}") from None
    validate(graph)
    return graph


def _fail(i: int, n: Node, msg: str) -> None:
    raise InvalidArgumentError(f"node {i} ({n.op.value}{' ' + n.name if n.name else ''}): {msg}")


def validate(graph: Graph) -> None:
    """Structure (topological order, known inputs) and shapes of every node."""
    if not graph.outputs:
        raise InvalidArgumentError("the graph has no outputs")
    for i, n in enumerate(graph.nodes):
        if any(not 0 <= j < i for j in n.inputs):
            _fail(i, n, f"inputs {list(n.inputs)} must be earlier nodes")
        if n.dtype not in ("float32", "int64"):
            _fail(i, n, f"dtype {n.dtype!r}: float32 or int64 only")
        if any(s <= 0 for s in n.shape):
            _fail(i, n, f"shape {list(n.shape)} has a non-positive dimension")
        ins = [graph.nodes[j].shape for j in n.inputs]
        if n.op is Op.CONST:
            key = n.attrs.get("key")
            if key not in graph.consts:
                _fail(i, n, f"no constant {key!r} in the archive")
            if tuple(graph.consts[key].shape) != n.shape:
                _fail(i, n, f"constant has shape {list(graph.consts[key].shape)}, node says {list(n.shape)}")
        elif n.op in ELEMENTWISE:
            try:
                want = ins[0]
                for other in ins[1:]:
                    want = broadcast_shape(want, other)
            except ValueError:
                _fail(i, n, f"shapes {[list(s) for s in ins]} do not broadcast")
            if want != n.shape:
                _fail(i, n, f"output shape {list(n.shape)}, inputs give {list(want)}")
        elif n.op is Op.MATMUL:
            if len(ins) != 2 or len(ins[0]) < 2 or len(ins[1]) < 2 or ins[0][-1] != ins[1][-2]:
                _fail(i, n, f"cannot multiply {[list(s) for s in ins]}")
        elif n.op is Op.CONV2D:
            if len(ins) < 2 or len(ins[0]) != 4 or len(ins[1]) != 4 or ins[1][1] * n.attrs.get("groups", 1) != ins[0][1]:
                _fail(i, n, f"input {list(ins[0]) if ins else []} does not match weight {list(ins[1]) if len(ins) > 1 else []}")
            if n.shape[1] != ins[1][0]:
                _fail(i, n, f"output channels {n.shape[1]} but weight has {ins[1][0]}")
        elif n.op is Op.RESHAPE and math.prod(ins[0]) != math.prod(n.shape):
            _fail(i, n, f"cannot reshape {list(ins[0])} to {list(n.shape)}")
    for i in graph.inputs:
        if graph.nodes[i].op is not Op.INPUT:
            raise InvalidArgumentError(f"graph input {i} is not an input node")
    for o in graph.outputs:
        if not 0 <= o < len(graph.nodes):
            raise InvalidArgumentError(f"graph output {o} is not a node")
