"""Default schedules: one template per kind of fused group, keyed on the anchor's tag.

The knobs (tile sizes) are picked so that the tiles divide the extents where possible:
register tiles for matmul (rows x vector columns) and NCHWc conv (output columns x channel
block), one row per thread for row reductions, a parallel outer loop and a vectorized inner
loop for everything injective.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from tessera.compiler import te
from tessera.compiler.schedule import Schedule, Stage
from tessera.compiler.target import vector_lanes
from tessera.compiler.te import Tensor

ANCHORS = ("conv2d", "conv2d_nchwc", "matmul")
PARALLEL_MIN = 4096  # elements below which a kernel runs on one thread


def choose(n: int, prefs: Sequence[int]) -> int:
    for p in prefs:
        if p <= n and n % p == 0:
            return p
    return min(n, max(p for p in prefs if p <= max(n, 1)) if any(p <= n for p in prefs) else n)


def schedule_group(out: Tensor, knobs: dict[str, Any] | None = None, consts: Collection[int] = ()) -> Schedule:
    """The default schedule of a fused group (``knobs`` override its choices). ``consts``: uids of the
    placeholders bound to constants; a matmul whose B is one of them reads panels packed once, at build
    time, instead of packing them on every call (``Schedule.prepacked``)."""
    knobs = knobs or {}
    mm = next((t for t in te.post_order([out]) if t.tag == "matmul"), None)
    prepacked: dict[int, tuple[Tensor, int]] = {}
    if mm is not None and mm.shape == out.shape and knobs.get("mm_pack", _pack_default(mm)):
        nr = int(knobs.get("mm_cols") or _mm_cols(mm.shape[-1]))
        b = _pack_b(mm, nr, _readers(out), consts)
        if b is not None:
            prepacked[b[0].uid] = (b[1], nr)
    s = Schedule([out])
    s.prepacked = prepacked
    for st in s.stages:
        if st.tensor is out:
            continue
        if st.tensor.tag in ("pad", "pack"):
            _injective(st)
        elif not st.tensor.reduce_axes:
            st.compute_inline()
    if out.reduce_axes:
        s.cache_write(out)
    reds = [st for st in s.stages if st.tensor.reduce_axes]
    ost = s[out]
    anchor = next((st for st in reds if st.tensor.tag in ANCHORS), None)
    size = int(te_prod(out.shape))
    if anchor is not None and anchor.tensor.shape == out.shape:
        if anchor.tensor.tag == "matmul":
            _matmul(s, ost, anchor, knobs)
        elif anchor.tensor.tag == "conv2d_nchwc":
            _conv_nchwc(s, ost, anchor, knobs)
        else:
            _rows(ost, [anchor], len(out.shape) - 1, size)
    elif reds:
        lead = min(len(r.tensor.shape) for r in reds)
        if all(r.tensor.shape == out.shape[:len(r.tensor.shape)] for r in reds):
            lead = min(lead, len(out.shape) - 1) if all(r.tensor.shape == out.shape for r in reds) else lead
            _rows(ost, reds, lead, size)
        else:
            _injective(ost)
    else:
        _injective(ost)
    return s


def te_prod(shape: Sequence[int]) -> int:
    p = 1
    for x in shape:
        p *= int(x)
    return p


def _injective(st: Stage) -> None:
    axes = st.axis
    size = te_prod(st.tensor.shape)
    if not axes:
        return
    if len(axes) == 1:
        if size >= PARALLEL_MIN:
            o, i = st.split(axes[0], 64)
            st.parallel(o)
            st.vectorize(i)
        else:
            st.vectorize(axes[0])
        return
    outer = st.fuse(*axes[:-1])
    if size >= PARALLEL_MIN:
        st.parallel(outer)
    st.vectorize(axes[-1])


def _rows(ost: Stage, reds: list[Stage], lead: int, size: int) -> None:
    """One output row per iteration of a parallel loop; each reduction computed for that row only."""
    axes = ost.axis
    if lead <= 0:  # no rows: a scalar output (a whole-tensor reduction)
        _injective(ost)
        return
    outer = ost.fuse(*axes[:lead])
    if size >= PARALLEL_MIN:
        ost.parallel(outer)
    if len(axes) > lead:
        ost.vectorize(axes[-1])
    for r in reds:
        r.set_scope("local")
        r.compute_at(ost, outer)
        data = [a for a in r.axis if a.extent > 1]
        if data:
            r.reorder(*r.reduce_axis, *data)
            r.vectorize(data[-1])


def _mm_cols(n: int) -> int:
    lanes = vector_lanes()
    return choose(n, [2 * lanes, lanes, 3 * lanes, 4 * lanes]) if n >= lanes else n


def _pack_default(mm: Tensor) -> int:
    """Pack B when enough row tiles reuse each panel to pay for the copy."""
    return int(mm.shape[-2] >= 64 and mm.shape[-1] >= vector_lanes())


def pack_panels(b: np.ndarray, nr: int) -> np.ndarray:
    """``B[.., k, n]`` as the panels ``Bp[.., n // nr, k, n % nr]`` (zeros past N) that :func:`_pack_b` reads."""
    *bshape, kdim, n = b.shape
    cols = -(-n // nr) * nr
    padded = np.zeros((*bshape, kdim, cols), np.float32)
    padded[..., :n] = b
    return np.ascontiguousarray(padded.reshape(*bshape, kdim, cols // nr, nr).swapaxes(-3, -2))


def _readers(out: Tensor) -> dict[int, int]:
    """How many of the group's tensors read each tensor (uid -> count)."""
    readers: dict[int, int] = {}
    for t in te.post_order([out]):
        if t.body is None:
            continue
        seen: set[int] = set()
        stack: list[te.Expr] = [t.body]
        while stack:
            e = stack.pop()
            if isinstance(e, te.Load) and e.tensor.uid not in seen:
                seen.add(e.tensor.uid)
                readers[e.tensor.uid] = readers.get(e.tensor.uid, 0) + 1
            stack.extend(te.children(e))
    return readers


def _pack_b(mm: Tensor, nr: int, readers: dict[int, int] | None = None,
            consts: Collection[int] = ()) -> tuple[Tensor, Tensor] | None:
    """Read B of ``mm`` (``A[.., i, k] * B[.., k, j]``) from panels ``Bp[.., j // nr, k, j % nr]`` (zeros past
    N): the columns of a register tile are one contiguous run per k. A B that is a constant placeholder
    (in ``consts``) read by ``mm`` only becomes a placeholder of its panels, packed once at build time
    (returns (B, its panels)); any other B is packed by a stage of its own, on every call."""
    red = mm.body
    assert isinstance(red, te.Reduce) and isinstance(red.body, te.BinOp)
    bl = red.body.b
    if not isinstance(bl, te.Load):
        return None
    b = bl.tensor
    *bshape, kdim, n = b.shape
    nb = len(bshape)
    *bi, k, j = bl.indices
    if b.is_placeholder and b.uid in consts and (readers or {}).get(b.uid, 0) == 1:
        panels = te.placeholder((*bshape, -(-n // nr), kdim, nr), f"{b.name}_panels")
        mm.body = te.Reduce(red.combiner, te.BinOp("*", red.body.a, te.Load(panels, (*bi[:nb], j // nr, k, j % nr))), red.axes)
        return b, panels

    def f(*idx: te.Expr) -> te.Expr:
        *bi, jo, k, ji = idx
        j = jo * nr + ji
        v = b[(*bi, k, j)]
        return v if n % nr == 0 else te.select(j < n, b[(*bi, k, te.call_int_min(j, n - 1))], 0.0)
    bp = te.compute((*bshape, -(-n // nr), kdim, nr), f, f"{mm.name}_bpack", tag="pack")
    new = te.Load(bp, (*bi[:nb], j // nr, k, j % nr))
    mm.body = te.Reduce(red.combiner, te.BinOp("*", red.body.a, new), red.axes)
    return None


def _matmul(s: Schedule, ost: Stage, acc: Stage, knobs: dict[str, Any]) -> None:
    *batch, i, j = ost.axis
    m, n = i.extent, j.extent
    ukernel = bool(knobs.get("mm_ukernel", 1))
    # a register tile of rows x (2 vectors): 12 accumulators of the 16 (AVX2) or 32 (AVX-512) registers
    mi = knobs.get("mm_rows") or choose(m, [6, 4, 5, 3, 2, 1] if ukernel else [6, 4, 8, 5, 3, 7, 2, 1])
    nj = knobs.get("mm_cols") or _mm_cols(n)
    io, jo, ii, ji = ost.tile(i, j, mi, nj)
    if knobs.get("mm_order", _pack_default(acc.tensor)):  # column panels outside: one panel of B stays in cache for every row tile
        ost.reorder(jo, io)
        outer = ost.fuse(*batch, jo, io)
    else:
        outer = ost.fuse(*batch, io, jo)
    if te_prod(ost.tensor.shape) * acc.tensor.reduce_axes[0].extent >= 65536:
        ost.parallel(outer)
    ost.vectorize(ji)
    acc.set_scope("local")
    acc.compute_at(ost, outer)
    *_, ti, tj = acc.axis
    (k,) = acc.reduce_axis
    ku = int(knobs.get("mm_kunroll") or 1)
    if ku > 1 and k.extent % ku == 0:
        ko, ki = acc.split(k, ku)
        acc.reorder(ko, ki, ti, tj)
        acc.unroll(ki)
    else:
        ko = k
        acc.reorder(k, ti, tj)
    acc.unroll(ti)
    acc.vectorize(tj)
    if ukernel and tj.extent % 4 == 0:
        acc.tensorize(ko)


def _conv_nchwc(s: Schedule, ost: Stage, acc: Stage, knobs: dict[str, Any]) -> None:
    n, ko, p, q, ki = ost.axis
    # output columns per register tile: each needs block/lanes accumulators
    prefs = [14, 16, 12, 8, 7, 10, 9, 6, 5, 4, 3, 2, 1] if vector_lanes() >= 16 else [7, 6, 4, 5, 8, 3, 2, 1]
    qb = knobs.get("conv_cols") or choose(q.extent, prefs)
    qo, qi = ost.split(q, qb)
    outer = ost.fuse(n, ko, p)
    ost.parallel(outer)
    ost.vectorize(ki)
    acc.set_scope("local")
    acc.compute_at(ost, qo)
    tn, tko, tp, tq, tk = acc.axis
    rco, ry, rx, rci = acc.reduce_axis
    if knobs.get("conv_order") == 1:  # the window outside the input-channel blocks
        acc.reorder(ry, rx, rco, rci, tq, tk)
        first = ry
    else:
        acc.reorder(rco, ry, rx, rci, tq, tk)
        first = rco
    cu = int(knobs.get("conv_ci_unroll") or 1)
    if cu > 1 and rci.extent % cu == 0:
        _, ci_in = acc.split(rci, cu)
        acc.unroll(ci_in)
    acc.unroll(tq)
    acc.vectorize(tk)
    if knobs.get("conv_ukernel", 1) and tk.extent % 4 == 0:  # the whole reduction on accumulators in registers
        acc.tensorize(first)

