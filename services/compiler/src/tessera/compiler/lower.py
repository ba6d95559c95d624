"""Lowering: a scheduled tensor-expression program to a loop IR over flat buffers.

The loop IR is what a backend renders: :class:`For` (serial / parallel / vectorize / unroll),
:class:`Store`, :class:`Allocate` (a local buffer), :class:`IfThen` (split tails) and
:class:`Seq`. Loads become :class:`BufLoad` of a flat index. Inline stages are substituted into
their consumers; stages computed at root that are not outputs live in the kernel's workspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tessera.compiler import te
from tessera.compiler.schedule import Schedule, ScheduleError, Split, Stage
from tessera.compiler.te import Expr, IterVar, Tensor, Var


@dataclass(eq=False)
class Buffer:
    name: str
    size: int
    dtype: str = "float32"
    scope: str = "param"  # param, workspace, local
    offset: int = 0  # elements into the workspace

    __hash__ = object.__hash__


@dataclass(eq=False)
class BufLoad(Expr):
    buf: Buffer
    index: Expr

    def __post_init__(self) -> None:
        self.dtype = self.buf.dtype


class Stmt:
    pass


@dataclass(eq=False)
class For(Stmt):
    var: Var
    extent: int
    kind: str  # serial, parallel, vectorize, unroll
    body: Stmt


@dataclass(eq=False)
class Seq(Stmt):
    stmts: list[Stmt]


@dataclass(eq=False)
class Store(Stmt):
    buf: Buffer
    index: Expr
    value: Expr


@dataclass(eq=False)
class Allocate(Stmt):
    buf: Buffer
    body: Stmt


@dataclass(eq=False)
class IfThen(Stmt):
    cond: Expr
    body: Stmt
    orelse: Stmt | None = None


@dataclass(eq=False)
class MicroKernel(Stmt):
    """A register-blocked tile of a sum of products, for a backend to emit as one unit:

        for each (l0, l1, ...) of ``loops`` (extent, stride in A, stride in B), outermost first:
            C[r * cols + c] += A[a_index + r * a_row + sum(l * a_stride)] * B[b_index + c + sum(l * b_stride)]

    for r < rows, c < cols, with C a local tile (zeroed first when ``init``). B is contiguous along c,
    so the columns are whole vector registers, and the rows x cols accumulators stay in registers
    for the whole reduction.
    """

    rows: int
    cols: int
    loops: list[tuple[int, int, int]]
    a_buf: Buffer
    a_index: Expr
    a_row: int
    b_buf: Buffer
    b_index: Expr
    c_buf: Buffer
    init: bool


@dataclass
class LoweredFunc:
    name: str
    params: list[Buffer]
    body: Stmt
    workspace: int = 0  # float32 elements of scratch the kernel needs
    stats: dict[str, float] = field(default_factory=dict)
    prepacked: dict[int, int] = field(default_factory=dict)  # input position -> panel width: that constant comes as B panels


def _strides(shape: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= int(s)
    return out[::-1]


def _flat(indices: Sequence[Expr], shape: Sequence[int]) -> Expr:
    idx: Expr = te.Const(0, "int64")
    for i, st in zip(indices, _strides(shape), strict=True):
        idx = idx + i * st
    return te.simplify(idx)


def _vars_in(e: Expr) -> set[int]:
    out: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if isinstance(x, Var):
            out.add(id(x))
        elif isinstance(x, BufLoad):
            stack.append(x.index)
        stack.extend(te.children(x))
    return out


class _Lowering:
    def __init__(self, sch: Schedule, inputs: Sequence[Tensor], outputs: Sequence[Tensor], name: str) -> None:
        self.sch, self.name = sch, name
        self.buffers: dict[int, Buffer] = {}
        for i, t in enumerate(inputs):
            self.buffers[t.uid] = Buffer(f"in{i}", int(np.prod(t.shape)), t.dtype)
        for i, t in enumerate(outputs):
            self.buffers[t.uid] = Buffer(f"out{i}", int(np.prod(t.shape)), t.dtype)
        self.params = [self.buffers[t.uid] for t in [*inputs, *outputs]]
        missing = [t.name for t in sch.placeholders if t.uid not in self.buffers]
        if missing:
            raise ScheduleError(f"{name}: placeholders {missing} are not kernel inputs")
        self.workspace = 0
        for st in sch.stages:
            if st.tensor.uid in self.buffers or st.attach == "inline":
                continue
            size = int(np.prod(st.region if st.region and st.attach != "root" and st.scope == "local" else st.tensor.shape))
            if st.scope == "local":
                self.buffers[st.tensor.uid] = Buffer(f"{st.tensor.name}_l", size, st.tensor.dtype, "local")
            else:
                self.buffers[st.tensor.uid] = Buffer(f"ws_{st.tensor.name}", size, st.tensor.dtype, "workspace", self.workspace)
                self.workspace += size + (-size % 16)
        self.inline = {st.tensor.uid: st for st in sch.stages if st.attach == "inline"}
        self.bases: dict[int, list[Expr]] = {}  # attached stage -> base of its tile, in the consumer's loop vars
        self.attached: dict[int, list[Stage]] = {}  # id(consumer axis) -> stages computed there
        for st in sch.stages:
            if isinstance(st.attach, tuple):
                self.attached.setdefault(id(st.attach[1]), []).append(st)

    # ------------------------------------------------------------------ expressions

    def expand(self, e: Expr) -> Expr:
        """Substitute inline stages, recursively."""
        def f(x: Expr) -> Expr:
            if isinstance(x, te.Load) and x.tensor.uid in self.inline:
                t = x.tensor
                assert t.body is not None
                return self.expand(te.substitute(t.body, {a.var: i for a, i in zip(t.axes, x.indices, strict=True)}))
            return x
        return te.rebuild(e, f)

    def to_buffers(self, e: Expr) -> Expr:
        """Loads of tensors -> loads of flat buffers (tile-relative for local attached stages)."""
        def f(x: Expr) -> Expr:
            if not isinstance(x, te.Load):
                return x
            buf = self.buffers[x.tensor.uid]
            st = self.sch._by_tensor.get(x.tensor.uid)
            if st is not None and buf.scope == "local" and isinstance(st.attach, tuple):
                base = self.bases[st.tensor.uid]
                rel = [te.simplify(i - b) for i, b in zip(x.indices, base, strict=False)]
                return BufLoad(buf, _flat(rel, st.region))
            return BufLoad(buf, _flat(x.indices, x.tensor.shape))
        return te.rebuild(e, f)

    # ------------------------------------------------------------------ stages

    def leaf_values(self, st: Stage) -> dict[Var, Expr]:
        val: dict[Var, Expr] = {a.var: (te.Const(0, "int64") if a.extent == 1 else a.var) for a in st.leaves}
        for rel in reversed(st.relations):
            if isinstance(rel, Split):
                val[rel.parent.var] = te.simplify(val[rel.outer.var] * rel.factor + val[rel.inner.var])
            else:
                f = val[rel.fused.var]
                val[rel.outer.var] = te.simplify(f // rel.inner.extent)
                val[rel.inner.var] = te.simplify(f % rel.inner.extent)
        return val

    def stage(self, st: Stage, parallel_ok: bool) -> Stmt:
        t = st.tensor
        assert t.body is not None
        val = self.leaf_values(st)
        guards: list[Expr] = []
        for rel in st.relations:
            if isinstance(rel, Split) and rel.parent.extent % rel.factor:
                guards.append(val[rel.parent.var] < rel.parent.extent)
        data_vals = [val[a.var] for a in st.data_axes]
        if isinstance(st.attach, tuple):
            base = self.bases[t.uid]
            full = [te.simplify(b + v) for b, v in zip(base, data_vals, strict=True)]
            for a, tl, fv in zip(t.axes, st.region, full, strict=True):
                if a.extent % tl:
                    guards.append(fv < a.extent)
        else:
            full = data_vals
        sub: dict[Var, Expr] = {a.var: v for a, v in zip(t.axes, full, strict=True)}
        for r in st.red_axes:
            sub[r.var] = val[r.var]
        buf = self.buffers[t.uid]
        if buf.scope == "local" and isinstance(st.attach, tuple):
            out_index = _flat(data_vals, st.region)
        else:
            out_index = _flat(full, t.shape)
        body = self.expand(t.body)
        red = body if isinstance(body, te.Reduce) else None
        value = self.to_buffers(te.simplify(te.substitute(red.body if red else body, sub)))
        guards = [self.to_buffers(te.simplify(te.substitute(g, {}))) for g in guards]
        red_vars = {id(r.var) for r in st.leaves if r.kind == "reduce"}

        def guarded(s: Stmt, conds: list[Expr]) -> Stmt:
            if not conds:
                return s
            c = conds[0]
            for x in conds[1:]:
                c = c & x
            return IfThen(c, s)

        if red is not None:
            cur = BufLoad(buf, out_index)
            upd = cur + value if red.combiner == "sum" else te.call("fmaxf", cur, value)
            core: Stmt = guarded(Store(buf, out_index, upd), guards)
            init: Stmt = guarded(Store(buf, out_index, red.init), [g for g in guards if not (_vars_in(g) & red_vars)])
        else:
            core = guarded(Store(buf, out_index, value), guards)
            init = Seq([])
        first_red = next((i for i, a in enumerate(st.leaves) if a.kind == "reduce"), None)

        def loop(a: IterVar, body: Stmt, outermost: bool) -> Stmt:
            if a.extent == 1:
                return body
            kind = st.ann.get(a, "serial")
            if kind == "parallel" and not (parallel_ok and outermost):
                kind = "serial"
            return For(a.var, a.extent, kind, body)

        def tensorized(pos: int, emitted_any: bool, did_init: bool) -> Stmt | None:
            """The micro-kernel for the loops from ``pos`` in, with plain loops for the tiles it cannot take."""
            assert red is not None
            inner = st.leaves[pos:]
            mk = self.micro_kernel(inner, value, buf, out_index, init=not did_init)
            if mk is None:
                return None
            plain = build(pos, emitted_any, did_init, plain=True)
            if not guards:
                return mk
            at_max = {a.var: te.Const(a.extent - 1, "int64") for a in inner}
            full = guards[0]
            for g in guards[1:]:
                full = full & g
            return IfThen(te.simplify(te.substitute(full, at_max)), mk, plain)

        def build(pos: int, emitted_any: bool, did_init: bool, plain: bool = False) -> Stmt:
            if pos == len(st.leaves):
                return core
            if not plain and red is not None and st.tensorized is st.leaves[pos] and red.combiner == "sum":
                mk = tensorized(pos, emitted_any, did_init or pos != first_red)
                if mk is not None:
                    return mk
            if red is not None and pos == first_red and not did_init:
                data_after = [a for a in st.leaves[pos:] if a.kind == "data"]
                init_nest = init
                for a in reversed(data_after):
                    init_nest = loop(a, init_nest, False)
                return Seq([init_nest, build(pos, emitted_any, True, plain)])
            a = st.leaves[pos]
            inner = build(pos + 1, emitted_any or a.extent > 1, did_init, plain)
            here = [self.attached_stage(c, st) for c in self.attached.get(id(a), [])]
            if here:
                inner = Seq([*here, inner])
                for c in self.attached.get(id(a), []):
                    cb = self.buffers[c.tensor.uid]
                    if cb.scope == "local":
                        inner = Allocate(cb, inner)
            return loop(a, inner, not emitted_any)

        return build(0, False, False)

    def micro_kernel(self, inner: list[IterVar], value: Expr, c_buf: Buffer, c_index: Expr, init: bool) -> MicroKernel | None:
        """``value`` (a product of two loads) accumulated into ``c_buf`` over the ``inner`` loops as one
        :class:`MicroKernel`, or None when the loops or the indices do not have its shape."""
        loops = [a for a in inner if a.extent > 1]
        reds = [a for a in loops if a.kind == "reduce"]
        data = [a for a in loops if a.kind == "data"]
        if not reds or not 1 <= len(data) <= 2 or loops != reds + data or c_buf.scope != "local":
            return None
        if not (isinstance(value, te.BinOp) and value.op == "*" and isinstance(value.a, BufLoad) and isinstance(value.b, BufLoad)):
            return None
        row, col = (data[0], data[1]) if len(data) == 2 else (None, data[0])
        try:
            sc = _strides_of(c_index, loops)
            sa = _strides_of(value.a.index, loops)
            sb = _strides_of(value.b.index, loops)
        except _NotLinear:
            return None
        if sa[col] == 1 and sb[col] == 0:
            sa, sb = sb, sa
            a, b = value.b, value.a
        else:
            a, b = value.a, value.b
        rows = row.extent if row is not None else 1
        if sc[col] != 1 or (row is not None and sc[row] != col.extent) or any(sc[r] for r in reds) or _eval(c_index, {}) != 0:
            return None
        if sa[col] != 0 or sb[col] != 1 or (row is not None and sb[row] != 0):
            return None
        zero = {x.var: te.Const(0, "int64") for x in inner}
        return MicroKernel(rows, col.extent, _collapse([(r.extent, sa[r], sb[r]) for r in reds]), a.buf,
                           te.simplify(te.substitute(a.index, zero)), sa[row] if row is not None else 0, b.buf,
                           te.simplify(te.substitute(b.index, zero)), c_buf, init)

    def attached_stage(self, st: Stage, consumer: Stage) -> Stmt:
        assert isinstance(st.attach, tuple)
        cval = self.leaf_values(consumer)
        pos = consumer._leaf_index(st.attach[1])
        zero = {a.var: te.Const(0, "int64") for a in consumer.leaves[pos + 1:]}
        self.bases[st.tensor.uid] = [te.simplify(te.substitute(cval[a.var], zero)) for a in consumer.tensor.axes[:len(st.tensor.axes)]]
        return self.stage(st, parallel_ok=False)

    def run(self) -> LoweredFunc:
        # bases of attached stages are needed when their consumer's body is lowered: compute them first
        for st in self.sch.stages:
            if isinstance(st.attach, tuple):
                consumer, ax = st.attach
                cval = self.leaf_values(consumer)
                pos = consumer._leaf_index(ax)
                zero = {a.var: te.Const(0, "int64") for a in consumer.leaves[pos + 1:]}
                self.bases[st.tensor.uid] = [te.simplify(te.substitute(cval[a.var], zero))
                                             for a in consumer.tensor.axes[:len(st.tensor.axes)]]
        body = [self.stage(st, parallel_ok=True) for st in self.sch.stages if st.attach == "root"]
        return LoweredFunc(self.name, self.params, Seq(body), self.workspace)


class _NotLinear(Exception):
    pass


def _eval(e: Expr, env: dict[int, int]) -> int:
    """An index expression's value with the variables in ``env`` (by id) set and every other variable 0."""
    if isinstance(e, te.Const):
        return int(e.value)
    if isinstance(e, Var):
        return env.get(id(e), 0)
    if isinstance(e, te.BinOp):
        a, b = _eval(e.a, env), _eval(e.b, env)
        ops = {"+": a + b, "-": a - b, "*": a * b, "<": int(a < b), "<=": int(a <= b), ">": int(a > b),
               ">=": int(a >= b), "==": int(a == b), "&&": int(bool(a and b)), "||": int(bool(a or b))}
        if e.op in ops:
            return ops[e.op]
        if e.op in ("//", "%") and b > 0 and a >= 0:
            return a // b if e.op == "//" else a % b
    if isinstance(e, te.Select):
        return _eval(e.then, env) if _eval(e.cond, env) else _eval(e.other, env)
    raise _NotLinear(str(e))


def _collapse(loops: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Merge each loop with the one inside it where both run through A and B contiguously (outer strides
    = inner extent x inner strides): a 3x3 window's columns and the channel block of a stride-1 NCHWc
    conv are one loop of 3 x 16, the stem's 7 x 3 one of 21; longer inner loops, less loop overhead."""
    out: list[tuple[int, int, int]] = []
    for ext, sa, sb in loops:
        if out and out[-1][1] == ext * sa and out[-1][2] == ext * sb:
            out[-1] = (out[-1][0] * ext, sa, sb)
        else:
            out.append((ext, sa, sb))
    return out


def _strides_of(index: Expr, loops: Sequence[IterVar]) -> dict[IterVar, int]:
    """The stride of ``index`` along each loop; raises _NotLinear unless it is affine in them over their ranges."""
    base = _eval(index, {})
    out: dict[IterVar, int] = {}
    for a in loops:
        s = _eval(index, {id(a.var): 1}) - base
        if _eval(index, {id(a.var): a.extent - 1}) - base != s * (a.extent - 1):
            raise _NotLinear(a.name)
        out[a] = s
    top = {id(a.var): a.extent - 1 for a in loops}
    if _eval(index, top) - base != sum(s * (a.extent - 1) for a, s in out.items()):
        raise _NotLinear("mixed")
    return out


def lower(sch: Schedule, inputs: Sequence[Tensor], outputs: Sequence[Tensor], name: str = "kernel") -> LoweredFunc:
    """Lower ``sch`` to one function over ``inputs`` then ``outputs`` (flat buffers) and a workspace."""
    return _Lowering(sch, inputs, outputs, name).run()
