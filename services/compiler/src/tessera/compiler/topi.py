"""Operators as tensor expressions (compute declarations), one function per graph op.

``compute_node(node, inputs)`` returns the node's output tensor; the intermediate tensors an
op needs (a padded input, a reduction) carry a ``tag`` that the schedule templates key on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tessera.compiler import te
from tessera.compiler.ir import Node, Op
from tessera.compiler.te import Expr, Tensor

Fn = Callable[[Node, list[Tensor], str], Tensor]
_OPS: dict[Op, Fn] = {}


def register(*ops: Op) -> Callable[[Fn], Fn]:
    def deco(f: Fn) -> Fn:
        for op in ops:
            _OPS[op] = f
        return f
    return deco


def compute_node(node: Node, inputs: list[Tensor], name: str) -> Tensor:
    try:
        f = _OPS[node.op]
    except KeyError:
        raise NotImplementedError(f"no tensor expression for {node.op.value}") from None
    return f(node, inputs, name)


def _bcast(t: Tensor, idx: Sequence[Expr], out_rank: int) -> te.Load:
    """Index ``t`` (numpy-broadcast against an output of rank ``out_rank``) at output index ``idx``."""
    off = out_rank - len(t.shape)
    return t[tuple(te.Const(0, "int64") if s == 1 else idx[off + d] for d, s in enumerate(t.shape))]


# ---------------------------------------------------------------------------- elementwise

_UNARY: dict[Op, Callable[[Expr], Expr]] = {
    Op.NEG: lambda x: -x,
    Op.RELU: lambda x: te.maximum(x, 0.0),
    Op.GELU: lambda x: 0.5 * x * (1.0 + te.call("erff", x * 0.7071067811865476)),
    Op.GELU_TANH: lambda x: 0.5 * x * (1.0 + te.call("tanhf", 0.7978845608028654 * (x + 0.044715 * x * x * x))),
    Op.SIGMOID: lambda x: 1.0 / (1.0 + te.call("expf", -x)),
    Op.TANH: lambda x: te.call("tanhf", x),
    Op.SILU: lambda x: x / (1.0 + te.call("expf", -x)),
    Op.EXP: lambda x: te.call("expf", x),
    Op.SQRT: lambda x: te.call("sqrtf", x),
    Op.RSQRT: lambda x: 1.0 / te.call("sqrtf", x),
}
_BINARY: dict[Op, Callable[[Expr, Expr], Expr]] = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: a / b,
    Op.MAXIMUM: lambda a, b: te.maximum(a, b),
    Op.MINIMUM: lambda a, b: te.minimum(a, b),
    Op.POW: lambda a, b: te.call("powf", a, b),
    # comparisons give 1.0 or 0.0 (a torch bool tensor is float32 inside a compiled graph)
    Op.GT: lambda a, b: te.select(a > b, 1.0, 0.0),
    Op.GE: lambda a, b: te.select(a >= b, 1.0, 0.0),
    Op.LT: lambda a, b: te.select(a < b, 1.0, 0.0),
    Op.LE: lambda a, b: te.select(a <= b, 1.0, 0.0),
    Op.EQ: lambda a, b: te.select(te.BinOp("==", a, b), 1.0, 0.0),
    Op.NE: lambda a, b: te.select(te.BinOp("==", a, b), 0.0, 1.0),
}


@register(*_UNARY)
def unary(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    f = _UNARY[node.op]
    return te.compute(node.shape, lambda *i: f(x[i]), name, tag="elemwise")


@register(*_BINARY)
def binary(node: Node, ins: list[Tensor], name: str) -> Tensor:
    a, b = ins
    f = _BINARY[node.op]
    r = len(node.shape)
    return te.compute(node.shape, lambda *i: f(_bcast(a, i, r), _bcast(b, i, r)), name, tag="elemwise")


@register(Op.WHERE)
def where(node: Node, ins: list[Tensor], name: str) -> Tensor:
    c, a, b = ins
    r = len(node.shape)
    return te.compute(node.shape, lambda *i: te.select(te.BinOp("==", _bcast(c, i, r), te.Const(0.0)), _bcast(b, i, r),
                                                       _bcast(a, i, r)), name, tag="elemwise")


@register(Op.BATCH_NORM)
def batch_norm(node: Node, ins: list[Tensor], name: str) -> Tensor:
    x, w, b, mean, var = ins
    eps = float(node.attrs.get("eps", 1e-5))
    return te.compute(node.shape, lambda n, c, *hw: (x[(n, c, *hw)] - mean[c]) * (w[c] / te.call("sqrtf", var[c] + eps)) + b[c],
                      name, tag="elemwise")


# ---------------------------------------------------------------------------- data movement


def _unravel(flat: Expr, shape: Sequence[int]) -> list[Expr]:
    out: list[Expr] = []
    stride = int(math.prod(shape))
    for s in shape:
        stride //= s
        out.append(te.simplify((flat // stride) % s) if stride > 0 else te.Const(0, "int64"))
    return out


@register(Op.RESHAPE)
def reshape(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    strides = [int(math.prod(node.shape[d + 1:])) for d in range(len(node.shape))]

    def f(*i: Expr) -> Expr:
        flat: Expr = te.Const(0, "int64")
        for v, st in zip(i, strides, strict=True):
            flat = flat + v * st
        return x[tuple(_unravel(te.simplify(flat), x.shape))]
    return te.compute(node.shape, f, name, tag="injective")


@register(Op.TRANSPOSE)
def transpose(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    perm = node.attrs["perm"]

    def f(*i: Expr) -> Expr:
        idx: list[Expr] = [te.Const(0, "int64")] * len(perm)
        for d, p in enumerate(perm):
            idx[p] = i[d]
        return x[tuple(idx)]
    return te.compute(node.shape, f, name, tag="injective")


@register(Op.SLICE)
def slice_(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    starts, steps = node.attrs["starts"], node.attrs["steps"]
    return te.compute(node.shape, lambda *i: x[tuple(v * st + s0 for v, s0, st in zip(i, starts, steps, strict=True))],
                      name, tag="injective")


@register(Op.CONCAT)
def concat(node: Node, ins: list[Tensor], name: str) -> Tensor:
    axis = node.attrs["axis"]

    def f(*i: Expr) -> Expr:
        offsets = [0]
        for t in ins:
            offsets.append(offsets[-1] + t.shape[axis])
        expr: Expr = ins[-1][tuple(v - offsets[-2] if d == axis else v for d, v in enumerate(i))]
        for k in range(len(ins) - 2, -1, -1):
            here = ins[k][tuple(v - offsets[k] if d == axis else v for d, v in enumerate(i))]
            expr = te.select(i[axis] < offsets[k + 1], here, expr)
        return expr
    return te.compute(node.shape, f, name, tag="injective")


@register(Op.PAD)
def pad(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    return _pad(x, node.attrs["pads"], float(node.attrs.get("value", 0.0)), name)


def _pad(x: Tensor, pads: Sequence[tuple[int, int]], value: float, name: str) -> Tensor:
    if not any(lo or hi for lo, hi in pads):
        return x
    shape = [s + lo + hi for s, (lo, hi) in zip(x.shape, pads, strict=True)]

    def f(*i: Expr) -> Expr:
        cond: Expr | None = None
        idx = []
        for v, (lo, hi), s in zip(i, pads, x.shape, strict=True):
            if lo or hi:
                c = (v >= lo) & (v < lo + s)
                cond = c if cond is None else cond & c
            idx.append(te.simplify(v - lo))
        assert cond is not None
        return te.select(cond, x[tuple(idx)], value)
    return te.compute(shape, f, name, tag="pad")


@register(Op.DILATE)
def dilate(node: Node, ins: list[Tensor], name: str) -> Tensor:
    """``strides`` per axis: out[i] = x[i / s] where every i % s == 0, else 0."""
    (x,) = ins
    strides = node.attrs["strides"]

    def f(*i: Expr) -> Expr:
        cond: Expr | None = None
        idx: list[Expr] = []
        for v, s in zip(i, strides, strict=True):
            if s == 1:
                idx.append(v)
                continue
            c = te.BinOp("==", v % s, te.Const(0, "int64"))
            cond = c if cond is None else cond & c
            idx.append(te.simplify(v // s))
        load = x[tuple(idx)]
        return load if cond is None else te.select(cond, load, 0.0)
    return te.compute(node.shape, f, name, tag="injective")


@register(Op.RESIZE)
def resize(node: Node, ins: list[Tensor], name: str) -> Tensor:
    """torch's interpolate over the last two axes: ``mode`` nearest (floor(dst * in / out), torch's
    legacy nearest) or bilinear (``align_corners`` either way)."""
    (x,) = ins
    h, w = x.shape[-2:]
    oh, ow = node.shape[-2:]
    mode, align = node.attrs["mode"], bool(node.attrs.get("align_corners", False))
    sh, sw = node.attrs.get("scale", (h / oh, w / ow))
    if mode == "nearest":
        def near(*i: Expr) -> Expr:
            *lead, p, q = i
            hp = te.call_int_min(te.Cast(te.call("floorf", te.Cast(p, "float32") * float(sh)), "int64"), h - 1)
            wq = te.call_int_min(te.Cast(te.call("floorf", te.Cast(q, "float32") * float(sw)), "int64"), w - 1)
            return x[(*lead, hp, wq)]
        return te.compute(node.shape, near, name, tag="injective")

    def src(d: Expr, size: int, out: int, scale: float) -> tuple[Expr, Expr, Expr]:
        fd = te.Cast(d, "float32")
        if align:
            s = fd * ((size - 1) / (out - 1) if out > 1 else 0.0)
        else:
            s = te.maximum((fd + 0.5) * float(scale) - 0.5, 0.0)
        i0 = te.call_int_min(te.Cast(te.call("floorf", s), "int64"), size - 1)
        i1 = te.call_int_min(i0 + 1, size - 1)
        return i0, i1, s - te.Cast(i0, "float32")

    def bil(*i: Expr) -> Expr:
        *lead, p, q = i
        h0, h1, lh = src(p, h, oh, sh)
        w0, w1, lw = src(q, w, ow, sw)
        top = x[(*lead, h0, w0)] * (1.0 - lw) + x[(*lead, h0, w1)] * lw
        bot = x[(*lead, h1, w0)] * (1.0 - lw) + x[(*lead, h1, w1)] * lw
        return top * (1.0 - lh) + bot * lh
    return te.compute(node.shape, bil, name, tag="injective")


@register(Op.TO_NCHWC)
def to_nchwc(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    cb = node.attrs["block"]
    return te.compute(node.shape, lambda n, co, h, w, ci: x[n, co * cb + ci, h, w], name, tag="injective")


@register(Op.FROM_NCHWC)
def from_nchwc(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    cb = node.attrs["block"]
    return te.compute(node.shape, lambda n, c, h, w: x[n, c // cb, h, w, c % cb], name, tag="injective")


# ---------------------------------------------------------------------------- complex-out-fusable


@register(Op.CONV2D)
def conv2d(node: Node, ins: list[Tensor], name: str) -> Tensor:
    x, w = ins[0], ins[1]
    (sh, sw), (ph, pw), (dh, dw), groups = node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"], node.attrs["groups"]
    n_, k_, p_, q_ = node.shape
    kg, cg, r_, s_ = w.shape[0] // groups, w.shape[1], w.shape[2], w.shape[3]
    xp = _pad(x, [(0, 0), (0, 0), (ph, ph), (pw, pw)], 0.0, f"{name}_pad")
    rc, ry, rx = te.reduce_axis(cg, f"{name}_rc"), te.reduce_axis(r_, f"{name}_ry"), te.reduce_axis(s_, f"{name}_rx")

    def f(n: Expr, k: Expr, p: Expr, q: Expr) -> Expr:
        c = (k // kg) * cg + rc.var if groups > 1 else rc.var
        return te.sum_(xp[n, c, p * sh + ry.var * dh, q * sw + rx.var * dw] * w[k, rc.var, ry.var, rx.var], [rc, ry, rx])
    out = te.compute(node.shape, f, f"{name}_conv", tag="conv2d")
    if len(ins) > 2:
        b = ins[2]
        return te.compute(node.shape, lambda n, k, p, q: out[n, k, p, q] + b[k], name, tag="elemwise")
    return out


@register(Op.CONV2D_NCHWC)
def conv2d_nchwc(node: Node, ins: list[Tensor], name: str) -> Tensor:
    """x [N, C/cb, H, W, cb], w [K/kb, C/cb, R, S, cb, kb] -> [N, K/kb, P, Q, kb] (groups=1)."""
    x, w = ins[0], ins[1]
    (sh, sw), (ph, pw), (dh, dw) = node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"]
    _, co_, r_, s_, cb, _ = w.shape
    xp = _pad(x, [(0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)], 0.0, f"{name}_pad")
    rco, ry, rx, rci = (te.reduce_axis(co_, f"{name}_rco"), te.reduce_axis(r_, f"{name}_ry"),
                        te.reduce_axis(s_, f"{name}_rx"), te.reduce_axis(cb, f"{name}_rci"))

    def f(n: Expr, ko: Expr, p: Expr, q: Expr, ki: Expr) -> Expr:
        return te.sum_(xp[n, rco.var, p * sh + ry.var * dh, q * sw + rx.var * dw, rci.var]
                       * w[ko, rco.var, ry.var, rx.var, rci.var, ki], [rco, ry, rx, rci])
    out = te.compute(node.shape, f, f"{name}_conv", tag="conv2d_nchwc")
    if len(ins) > 2:
        b = ins[2]
        return te.compute(node.shape, lambda n, ko, p, q, ki: out[n, ko, p, q, ki] + b[ko, ki], name, tag="elemwise")
    return out


@register(Op.MATMUL)
def matmul(node: Node, ins: list[Tensor], name: str) -> Tensor:
    a, b = ins
    kdim = a.shape[-1]
    k = te.reduce_axis(kdim, f"{name}_k")
    r = len(node.shape)

    def f(*i: Expr) -> Expr:
        batch = i[:-2]
        ai = _bcast_batch(a, batch, r - 2) + (i[-2], k.var)
        bi = _bcast_batch(b, batch, r - 2) + (k.var, i[-1])
        return te.sum_(a[ai] * b[bi], k)
    return te.compute(node.shape, f, f"{name}_mm", tag="matmul")


def _bcast_batch(t: Tensor, batch: Sequence[Expr], nb: int) -> tuple[Expr, ...]:
    tb = t.shape[:-2]
    off = nb - len(tb)
    return tuple(te.Const(0, "int64") if s == 1 else batch[off + d] for d, s in enumerate(tb))


# ---------------------------------------------------------------------------- reductions


def _window_pool(node: Node, x: Tensor, name: str, combiner: str) -> Tensor:
    (kh, kw), (sh, sw), (ph, pw) = node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"]
    dh, dw = node.attrs.get("dilation", (1, 1))
    fill = -math.inf if combiner == "max" else 0.0
    blocked = node.attrs.get("layout") == "NCHWc"
    sp = [(ph, ph), (pw, pw)] + ([(0, 0)] if blocked else [])
    xp = _pad(x, [(0, 0)] * (len(x.shape) - len(sp)) + sp, fill, f"{name}_pad")
    ry, rx = te.reduce_axis(kh, f"{name}_ry"), te.reduce_axis(kw, f"{name}_rx")
    red = te.max_ if combiner == "max" else te.sum_

    def f(*i: Expr) -> Expr:
        if blocked:
            *lead, p, q, c = i
            return red(xp[(*lead, p * sh + ry.var * dh, q * sw + rx.var * dw, c)], [ry, rx])
        *lead, p, q = i
        return red(xp[(*lead, p * sh + ry.var * dh, q * sw + rx.var * dw)], [ry, rx])
    return te.compute(node.shape, f, f"{name}_pool", tag="pool")


@register(Op.MAX_POOL)
def max_pool(node: Node, ins: list[Tensor], name: str) -> Tensor:
    return _window_pool(node, ins[0], name, "max")


@register(Op.AVG_POOL)
def avg_pool(node: Node, ins: list[Tensor], name: str) -> Tensor:
    kh, kw = node.attrs["kernel"]
    s = _window_pool(node, ins[0], name, "sum")
    return te.compute(node.shape, lambda *i: s[i] * (1.0 / (kh * kw)), name, tag="elemwise")


@register(Op.ADAPTIVE_AVG_POOL)
def adaptive_avg_pool(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    h, w = x.shape[-2:]
    oh, ow = node.shape[-2:]
    mh, mw = -(-h // oh) + 1, -(-w // ow) + 1
    if h % oh == 0 and w % ow == 0:
        mh, mw = h // oh, w // ow
    ry, rx = te.reduce_axis(mh, f"{name}_ry"), te.reduce_axis(mw, f"{name}_rx")
    exact = h % oh == 0 and w % ow == 0

    def f(*i: Expr) -> Expr:
        *lead, p, q = i
        h0, w0 = (p * h) // oh, (q * w) // ow
        if exact:
            return te.sum_(x[(*lead, h0 + ry.var, w0 + rx.var)], [ry, rx])
        h1, w1 = ((p + 1) * h + oh - 1) // oh, ((q + 1) * w + ow - 1) // ow
        cond = ((h0 + ry.var) < h1) & ((w0 + rx.var) < w1)
        hh = te.call_int_min(h0 + ry.var, h - 1)
        ww = te.call_int_min(w0 + rx.var, w - 1)
        return te.sum_(te.select(cond, x[(*lead, hh, ww)], 0.0), [ry, rx])
    s = te.compute(node.shape, f, f"{name}_pool", tag="pool")

    def g(*i: Expr) -> Expr:
        *_, p, q = i
        if exact:
            return s[i] * (1.0 / (mh * mw))
        cnt = ((((p + 1) * h + oh - 1) // oh) - (p * h) // oh) * ((((q + 1) * w + ow - 1) // ow) - (q * w) // ow)
        return s[i] / te.Cast(cnt, "float32")
    return te.compute(node.shape, g, name, tag="elemwise")


def _split_axes(shape: Sequence[int], axes: Sequence[int]) -> tuple[list[int], list[int]]:
    keep = [d for d in range(len(shape)) if d not in axes]
    return keep, list(axes)


@register(Op.SOFTMAX)
def softmax(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    axis = node.attrs["axis"] % len(x.shape)
    r = len(x.shape)
    keep = [d for d in range(r) if d != axis]
    rk = te.reduce_axis(x.shape[axis], f"{name}_r")
    rk2 = te.reduce_axis(x.shape[axis], f"{name}_r2")

    def full(i: Sequence[Expr], v: Expr) -> tuple[Expr, ...]:
        idx = list(i)
        idx.insert(axis, v)
        return tuple(idx)
    kshape = [x.shape[d] for d in keep]
    mx = te.compute(kshape, lambda *i: te.max_(x[full(i, rk.var)], rk), f"{name}_max", tag="rowreduce")
    sm = te.compute(kshape, lambda *i: te.sum_(te.call("expf", x[full(i, rk2.var)] - mx[i]), rk2), f"{name}_sum",
                    tag="rowreduce")

    def out(*i: Expr) -> Expr:
        red = tuple(v for d, v in enumerate(i) if d != axis)
        return te.call("expf", x[i] - mx[red]) / sm[red]
    return te.compute(node.shape, out, name, tag="rowout")


@register(Op.LAYER_NORM)
def layer_norm(node: Node, ins: list[Tensor], name: str) -> Tensor:
    x = ins[0]
    nd = node.attrs["ndim"]
    eps = float(node.attrs.get("eps", 1e-5))
    lead, norm = x.shape[:-nd], x.shape[-nd:]
    count = float(math.prod(norm))
    ra = [te.reduce_axis(s, f"{name}_r{d}") for d, s in enumerate(norm)]
    rb = [te.reduce_axis(s, f"{name}_q{d}") for d, s in enumerate(norm)]
    mean = te.compute(lead, lambda *i: te.sum_(x[(*i, *[a.var for a in ra])], ra), f"{name}_mean", tag="rowreduce")
    var = te.compute(lead, lambda *i: te.sum_(_sq(x[(*i, *[a.var for a in rb])] - mean[i] * (1.0 / count)), rb),
                     f"{name}_var", tag="rowreduce")
    w = ins[1] if len(ins) > 1 else None
    b = ins[2] if len(ins) > 2 else None

    def out(*i: Expr) -> Expr:
        li, ni = i[: len(lead)], i[len(lead):]
        y = (x[i] - mean[li] * (1.0 / count)) / te.call("sqrtf", var[li] * (1.0 / count) + eps)
        if w is not None:
            y = y * w[ni]
        if b is not None:
            y = y + b[ni]
        return y
    return te.compute(node.shape, out, name, tag="rowout")


def _sq(e: Expr) -> Expr:
    return e * e


@register(Op.MEAN)
def mean(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    axes = sorted(d % len(x.shape) for d in node.attrs["axes"])
    keepdim = node.attrs.get("keepdim", False)
    rs = [te.reduce_axis(x.shape[d], f"{name}_r{d}") for d in axes]
    count = float(math.prod(x.shape[d] for d in axes))

    def f(*i: Expr) -> Expr:
        return te.sum_(x[tuple(_reduce_index(x, i, axes, keepdim, rs))], rs)
    s = te.compute(node.shape, f, f"{name}_sum", tag="pool")
    return te.compute(node.shape, lambda *i: s[i] * (1.0 / count), name, tag="elemwise")


def _reduce_index(x: Tensor, out_i: Sequence[Expr], axes: Sequence[int], keepdim: bool, rs: Sequence[te.IterVar]) -> list[Any]:
    """The input index of an output index of a reduction over ``axes`` (reduction variables there)."""
    it, ri = iter(out_i), iter(rs)
    idx: list[Any] = []
    for d in range(len(x.shape)):
        if d in axes:
            if keepdim:
                next(it)
            idx.append(next(ri).var)
        else:
            idx.append(next(it))
    return idx


@register(Op.REDUCE_MAX)
def reduce_max(node: Node, ins: list[Tensor], name: str) -> Tensor:
    (x,) = ins
    axes = sorted(d % len(x.shape) for d in node.attrs["axes"])
    rs = [te.reduce_axis(x.shape[d], f"{name}_r{d}") for d in axes]
    keepdim = bool(node.attrs.get("keepdim", False))
    return te.compute(node.shape, lambda *i: te.max_(x[tuple(_reduce_index(x, i, axes, keepdim, rs))], rs), name,
                      tag="pool")


@register(Op.ARGMAX)
def argmax(node: Node, ins: list[Tensor], name: str) -> Tensor:
    """Two max-reductions: the maximum, then the largest of -k over the positions k holding it (the first)."""
    (x,) = ins
    axis = node.attrs["axis"] % len(x.shape)
    keepdim = bool(node.attrs.get("keepdim", False))
    r1, r2 = te.reduce_axis(x.shape[axis], f"{name}_r"), te.reduce_axis(x.shape[axis], f"{name}_r2")
    mx = te.compute(node.shape, lambda *i: te.max_(x[tuple(_reduce_index(x, i, [axis], keepdim, [r1]))], r1),
                    f"{name}_max", tag="pool")

    def first(*i: Expr) -> Expr:
        v = x[tuple(_reduce_index(x, i, [axis], keepdim, [r2]))]
        return te.max_(te.select(te.BinOp("==", v, mx[i]), -te.Cast(r2.var, "float32"), -float(x.shape[axis])), r2)
    neg = te.compute(node.shape, first, f"{name}_first", tag="pool")
    return te.compute(node.shape, lambda *i: -neg[i], name, tag="elemwise")


# ---------------------------------------------------------------------------- opaque


@register(Op.GATHER)
def gather(node: Node, ins: list[Tensor], name: str) -> Tensor:
    x, idx = ins
    axis = node.attrs["axis"]
    return te.compute(node.shape, lambda *i: x[tuple(te.Cast(idx[i], "int64") if d == axis else v for d, v in enumerate(i))],
                      name, tag="gather")


@register(Op.EMBEDDING)
def embedding(node: Node, ins: list[Tensor], name: str) -> Tensor:
    idx, w = ins
    return te.compute(node.shape, lambda *i: w[te.Cast(idx[i[:-1]], "int64"), i[-1]], name, tag="gather")
