"""The compile cache: artifacts keyed by the content hash of what they were built from.

The C backend keys its shared libraries by the hash of the generated source and the compiler
flags (``backends/c.py``); :func:`graph_key` hashes a graph (ops, shapes, attributes, constant
bytes) so a service can find an artifact before generating any code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from tessera.compiler.ir import Graph


def _attrs(a: dict[str, Any]) -> str:
    return json.dumps({k: (repr(v) if k != "body" else graph_key(v)) for k, v in sorted(a.items()) if k != "key"},
                      sort_keys=True)


def graph_key(graph: Graph, *extra: str) -> str:
    h = hashlib.sha256()
    for n in graph.nodes:
        h.update(f"{n.op.value}|{n.inputs}|{n.shape}|{n.dtype}|{_attrs(n.attrs)}\n".encode())
        if "key" in n.attrs:
            c = np.ascontiguousarray(graph.consts[n.attrs["key"]])
            h.update(str(c.dtype).encode())
            h.update(c.tobytes())
    h.update(f"{graph.inputs}|{graph.outputs}".encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()
