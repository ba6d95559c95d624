"""Static memory planning: every intermediate gets an offset in one arena, and buffers whose
values are dead are reused (best fit by size, over the kernels' execution order). Reshapes are
views sharing their source's storage; graph inputs, outputs and constants live outside the arena.

Result: ``graph.meta["storage"][node] = ("input"|"output"|"arena"|"const", position/offset/key)``
and ``graph.meta["arena_size"]`` (float32 elements), ``graph.meta["arena_naive"]`` (no reuse).
"""

from __future__ import annotations

from typing import Any

from tessera.compiler.ir import Graph, Op

ALIGN = 16  # elements: 64 bytes


def _round(n: int) -> int:
    return n + (-n % ALIGN)


def plan_memory(graph: Graph) -> Graph:
    storage: dict[int, tuple[str, Any]] = {}
    root: dict[int, int] = {}  # view -> node owning the storage
    for k, i in enumerate(graph.inputs):
        storage[i] = ("input", k)
    for k, o in enumerate(graph.outputs):
        storage.setdefault(o, ("output", k))
    last_use: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if n.op is Op.RESHAPE:
            src = n.inputs[0]
            root[i] = root.get(src, src)
        for j in n.inputs:
            r = root.get(j, j)
            last_use[r] = i
    for o in graph.outputs:
        last_use[root.get(o, o)] = len(graph.nodes)
    free: list[tuple[int, int]] = []  # (offset, size)
    top = naive = 0
    dying: dict[int, list[int]] = {}
    for r, t in last_use.items():
        dying.setdefault(t, []).append(r)
    for i, n in enumerate(graph.nodes):
        if n.op is Op.CONST:
            storage[i] = ("const", n.attrs["key"])
        elif n.op is Op.RESHAPE:
            continue
        elif i not in storage and n.op is not Op.INPUT:
            size = _round(n.size)
            naive += size
            fit = min((b for b in free if b[1] >= size), key=lambda b: b[1], default=None)
            if fit is not None:
                free.remove(fit)
                storage[i] = ("arena", fit[0])
                if fit[1] > size:
                    free.append((fit[0] + size, fit[1] - size))
            else:
                storage[i] = ("arena", top)
                top += size
            if i not in last_use:  # never read: free at once
                dying.setdefault(i, []).append(i)
        for r in dying.get(i, []):
            kind, off = storage.get(r, ("", 0))
            if kind == "arena":
                free.append((off, _round(graph.nodes[r].size)))
                free.sort()
                merged: list[tuple[int, int]] = []
                for b in free:  # coalesce neighbours
                    if merged and merged[-1][0] + merged[-1][1] == b[0]:
                        merged[-1] = (merged[-1][0], merged[-1][1] + b[1])
                    else:
                        merged.append(b)
                free = merged
    for v, r in root.items():
        storage[v] = storage[r]
    return graph.replace(meta={**graph.meta, "storage": storage, "arena_size": top, "arena_naive": naive})
