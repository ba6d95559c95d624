"""Layout transformation NCHW -> NCHW[16]c where it pays: convolutions whose input and output
channels are multiples of the block run in the blocked layout (the channel block is one vector
register), and the transforms are pushed through elementwise ops and pooling until pairs cancel,
so a chain conv -> relu -> conv -> add -> pool stays blocked end to end."""

from __future__ import annotations

from tessera.compiler.ir import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, Graph, GraphBuilder, Node, Op
from tessera.compiler.passes.simplify import eliminate_dead_code, rebuild

BLOCK = 16


def _blocked(shape: tuple[int, ...], cb: int) -> tuple[int, ...]:
    n, c, h, w = shape
    return (n, c // cb, h, w, cb)


def _to(b: GraphBuilder, x: int, cb: int) -> int:
    return b.add(Node(Op.TO_NCHWC, (x,), _blocked(b.nodes[x].shape, cb), attrs={"block": cb}))


def _from(b: GraphBuilder, x: int, shape: tuple[int, ...], cb: int) -> int:
    return b.add(Node(Op.FROM_NCHWC, (x,), shape, attrs={"block": cb}))


def _convert_convs(graph: Graph) -> Graph:
    def rw(b: GraphBuilder, i: int, n: Node, ins: list[int]) -> int | None:
        if n.op is not Op.CONV2D or n.attrs["groups"] != 1 or not all(b.nodes[j].op is Op.CONST for j in ins[1:]):
            return None
        k, c, r, s = b.nodes[ins[1]].shape
        if k % BLOCK or (c % BLOCK and c > BLOCK):
            return None
        ib = BLOCK if c % BLOCK == 0 else c  # a few input channels (an RGB stem): one block of all of them
        w = b.consts[b.nodes[ins[1]].attrs["key"]]
        packed = w.reshape(k // BLOCK, BLOCK, c // ib, ib, r, s).transpose(0, 2, 4, 5, 3, 1)
        args = [_to(b, ins[0], ib), b.const(packed, f"{n.name}_wc")]
        if len(ins) > 2:
            args.append(b.const(b.consts[b.nodes[ins[2]].attrs["key"]].reshape(k // BLOCK, BLOCK), f"{n.name}_bc"))
        conv = b.add(Node(Op.CONV2D_NCHWC, tuple(args), _blocked(n.shape, BLOCK), attrs=dict(n.attrs), name=n.name))
        return _from(b, conv, n.shape, BLOCK)
    return rebuild(graph, rw)


def _push(graph: Graph) -> tuple[Graph, bool]:
    changed = False
    made: dict[tuple[int, int], int] = {}  # (value, block) -> its blocked copy, made once

    def to(b: GraphBuilder, x: int, cb: int) -> int:
        if (x, cb) not in made:
            made[(x, cb)] = _to(b, x, cb)
        return made[(x, cb)]

    def rw(b: GraphBuilder, i: int, n: Node, ins: list[int]) -> int | None:
        nonlocal changed
        src = [b.nodes[j] for j in ins]
        if n.op is Op.TO_NCHWC and src[0].op is not Op.FROM_NCHWC:
            key = (ins[0], n.attrs["block"])
            if key in made:
                changed = True
                return made[key]
            made[key] = b.add(Node(n.op, tuple(ins), n.shape, n.dtype, dict(n.attrs), n.name))
            return made[key]
        if n.op is Op.TO_NCHWC and src[0].op is Op.FROM_NCHWC and src[0].attrs["block"] == n.attrs["block"]:
            changed = True
            return src[0].inputs[0]
        if n.op in ELEMENTWISE_UNARY and src[0].op is Op.FROM_NCHWC:
            changed = True
            cb = src[0].attrs["block"]
            y = b.add(Node(n.op, (src[0].inputs[0],), _blocked(n.shape, cb), n.dtype, dict(n.attrs), n.name))
            return _from(b, y, n.shape, cb)
        if n.op in ELEMENTWISE_BINARY and all(s.op is Op.FROM_NCHWC for s in src) and src[0].shape == src[1].shape == n.shape \
                and src[0].attrs["block"] == src[1].attrs["block"]:
            changed = True
            cb = src[0].attrs["block"]
            y = b.add(Node(n.op, (src[0].inputs[0], src[1].inputs[0]), _blocked(n.shape, cb), n.dtype, dict(n.attrs), n.name))
            return _from(b, y, n.shape, cb)
        if n.op in ELEMENTWISE_BINARY and len(n.shape) == 4 and n.shape[1] % BLOCK == 0 and src[0].shape == src[1].shape == n.shape \
                and sum(s.op is Op.FROM_NCHWC for s in src) == 1:
            changed = True
            k = 0 if src[0].op is Op.FROM_NCHWC else 1
            cb = src[k].attrs["block"]
            args = [src[k].inputs[0], to(b, ins[1 - k], cb)]
            if k == 1:
                args.reverse()
            y = b.add(Node(n.op, tuple(args), _blocked(n.shape, cb), n.dtype, dict(n.attrs), n.name))
            return _from(b, y, n.shape, cb)
        if n.op in (Op.MAX_POOL, Op.AVG_POOL) and src[0].op is Op.FROM_NCHWC and len(n.shape) == 4:
            changed = True
            cb = src[0].attrs["block"]
            y = b.add(Node(n.op, (src[0].inputs[0],), _blocked(n.shape, cb), n.dtype, {**n.attrs, "layout": "NCHWc"}, n.name))
            return _from(b, y, n.shape, cb)
        return None
    return rebuild(graph, rw), changed


def transform_layout(graph: Graph) -> Graph:
    g = _convert_convs(graph)
    for _ in range(64):
        g, changed = _push(g)
        if not changed:
            break
    return eliminate_dead_code(g)
