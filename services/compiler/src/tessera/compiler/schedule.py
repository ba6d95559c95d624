"""Schedule primitives over tensor-expression stages, TVM style.

    s = Schedule([C])
    io, jo, ii, ji = s[C].tile(*s[C].axis, 4, 64)
    CL = s.cache_write(C)                 # accumulate in a local buffer ...
    s[CL].compute_at(s[C], jo)            # ... one register tile per (io, jo)
    s[CL].reorder(*s[CL].reduce_axis, *s[CL].axis)
    s[CL].vectorize(s[CL].axis[-1])
    s[C].parallel(io)

A stage's loops are its *leaf* axes; split/fuse relations map them back to the root axes.
compute_at fixes the producer's region to the consumer's tile below the attach axis (its
root axes shrink to the tile's extents): schedule the consumer's loops before attaching.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.compiler import te
from tessera.compiler.te import Expr, IterVar, Tensor, Var


class ScheduleError(ValueError):
    """A primitive that does not apply (unknown axis, inlining a reduction, ...)."""


@dataclass(eq=False)
class Split:
    parent: IterVar
    outer: IterVar
    inner: IterVar
    factor: int


@dataclass(eq=False)
class Fuse:
    outer: IterVar
    inner: IterVar
    fused: IterVar


class Stage:
    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.data_axes: list[IterVar] = list(tensor.axes)  # root data axes (replaced by tile axes on compute_at)
        self.red_axes: list[IterVar] = list(tensor.reduce_axes)
        self.leaves: list[IterVar] = self.data_axes + self.red_axes
        self.relations: list[Split | Fuse] = []
        self.ann: dict[IterVar, str] = {}
        self.attach: str | tuple[Stage, IterVar] = "root"  # "root", "inline" or (consumer stage, axis)
        self.scope = "global"
        self.region: list[int] = []  # extents of the region computed per attach point (compute_at)
        self.tensorized: IterVar | None = None  # loops from this one inward run as one micro-kernel

    def __repr__(self) -> str:
        return f"Stage({self.tensor.name}, leaves={[a.name for a in self.leaves]}, attach={self.attach_name})"

    @property
    def attach_name(self) -> str:
        return self.attach if isinstance(self.attach, str) else f"{self.attach[0].tensor.name}.{self.attach[1].name}"

    @property
    def axis(self) -> list[IterVar]:
        return list(self.data_axes)

    @property
    def reduce_axis(self) -> list[IterVar]:
        return list(self.red_axes)

    def _leaf_index(self, ax: IterVar) -> int:
        for i, a in enumerate(self.leaves):
            if a is ax:
                return i
        raise ScheduleError(f"{ax.name} is not a loop of stage {self.tensor.name} (loops: {[a.name for a in self.leaves]})")

    # ---------------------------------------------------------------- loop structure

    def split(self, ax: IterVar, factor: int) -> tuple[IterVar, IterVar]:
        if factor < 1:
            raise ScheduleError(f"split factor must be >= 1, got {factor}")
        i = self._leaf_index(ax)
        factor = min(factor, ax.extent)
        outer = IterVar(Var(f"{ax.name}_o"), -(-ax.extent // factor), ax.kind)
        inner = IterVar(Var(f"{ax.name}_i"), factor, ax.kind)
        self.leaves[i:i + 1] = [outer, inner]
        self.relations.append(Split(ax, outer, inner, factor))
        return outer, inner

    def tile(self, x: IterVar, y: IterVar, fx: int, fy: int) -> tuple[IterVar, IterVar, IterVar, IterVar]:
        xo, xi = self.split(x, fx)
        yo, yi = self.split(y, fy)
        self.reorder(xo, yo, xi, yi)
        return xo, yo, xi, yi

    def fuse(self, *axes: IterVar) -> IterVar:
        if not axes:
            raise ScheduleError("fuse needs at least one axis")
        fused = axes[0]
        for ax in axes[1:]:
            i, j = self._leaf_index(fused), self._leaf_index(ax)
            if j != i + 1:
                raise ScheduleError(f"fuse: {fused.name} and {ax.name} are not adjacent loops")
            if fused.kind != ax.kind:
                raise ScheduleError("fuse: cannot fuse a data axis with a reduction axis")
            f = IterVar(Var(f"{fused.name}_{ax.name}"), fused.extent * ax.extent, ax.kind)
            self.leaves[i:j + 1] = [f]
            self.relations.append(Fuse(fused, ax, f))
            fused = f
        return fused

    def reorder(self, *axes: IterVar) -> None:
        idx = [self._leaf_index(a) for a in axes]
        slots = sorted(idx)
        new = list(self.leaves)
        for slot, ax in zip(slots, axes, strict=True):
            new[slot] = ax
        self.leaves = new

    # ---------------------------------------------------------------- annotations

    def vectorize(self, ax: IterVar) -> None:
        self._leaf_index(ax)
        self.ann[ax] = "vectorize"

    def parallel(self, ax: IterVar) -> None:
        self._leaf_index(ax)
        self.ann[ax] = "parallel"

    def unroll(self, ax: IterVar) -> None:
        self._leaf_index(ax)
        self.ann[ax] = "unroll"

    def tensorize(self, ax: IterVar) -> None:
        """Run the loops from ``ax`` inward as one register-blocked micro-kernel: they must be the
        reduction loops then the tile's rows and (vector) columns of a sum of products; lowering
        falls back to plain loops for tiles cut by the extents and for bodies of another shape."""
        self._leaf_index(ax)
        if ax.kind != "reduce":
            raise ScheduleError(f"tensorize: {ax.name} is not a reduction loop")
        self.tensorized = ax

    # ---------------------------------------------------------------- placement

    def compute_inline(self) -> None:
        if self.tensor.reduce_axes:
            raise ScheduleError(f"cannot inline {self.tensor.name}: it has a reduction")
        self.attach = "inline"

    def compute_root(self) -> None:
        self.attach = "root"

    def set_scope(self, scope: str) -> None:
        if scope not in ("global", "local"):
            raise ScheduleError(f"unknown scope {scope!r}")
        self.scope = scope

    def compute_at(self, consumer: Stage, ax: IterVar) -> None:
        """Compute this stage inside ``consumer``'s loop ``ax``: only the region that the loops below ``ax`` read.

        The producer's axis j must match the consumer's root axis j (same extent): the consumer
        reads it elementwise or by a prefix of its indices (a row reduction).
        """
        pos = consumer._leaf_index(ax)
        if consumer.attach != "root":
            raise ScheduleError("compute_at: the consumer must itself be computed at root")
        if self.relations:
            raise ScheduleError("compute_at: attach a stage before splitting its loops")
        croot = consumer.tensor.axes
        if len(self.tensor.axes) > len(croot) or any(a.extent != b.extent for a, b in zip(self.tensor.axes, croot, strict=False)):
            raise ScheduleError(f"compute_at: {self.tensor.name}{list(self.tensor.shape)} does not match a prefix of "
                                f"{consumer.tensor.name}{list(consumer.tensor.shape)}")
        inner = {id(a.var) for a in consumer.leaves[pos + 1:]}
        values = root_values(consumer)
        exts = extents_of(consumer)
        self.region = [tile_extent(values[b.var], inner, exts, a.extent) for a, b in zip(self.tensor.axes, croot, strict=False)]
        self.data_axes = [IterVar(Var(f"{a.name}_t"), t) for a, t in zip(self.tensor.axes, self.region, strict=True)]
        self.leaves = self.data_axes + self.red_axes
        self.attach = (consumer, ax)


def root_values(st: Stage) -> dict[Var, Expr]:
    """Each root axis (and intermediate axis) of ``st`` as an expression of its leaf loop variables."""
    val: dict[Var, Expr] = {a.var: a.var for a in st.leaves}
    for rel in reversed(st.relations):
        if isinstance(rel, Split):
            val[rel.parent.var] = te.simplify(val[rel.outer.var] * rel.factor + val[rel.inner.var])
        else:
            f = val[rel.fused.var]
            val[rel.outer.var] = te.simplify(f // rel.inner.extent)
            val[rel.inner.var] = te.simplify(f % rel.inner.extent)
    return val


def _interval(e: Expr, inner: set[int], extents: dict[int, int]) -> tuple[int, int]:
    if isinstance(e, te.Const):
        return int(e.value), int(e.value)
    if isinstance(e, te.Var):
        return (0, extents.get(id(e), 1) - 1) if id(e) in inner else (0, 0)
    if isinstance(e, te.BinOp):
        (a0, a1), (b0, b1) = _interval(e.a, inner, extents), _interval(e.b, inner, extents)
        if e.op == "+":
            return a0 + b0, a1 + b1
        if e.op == "-":
            return a0 - b1, a1 - b0
        if e.op == "*":
            p = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
            return min(p), max(p)
        if e.op == "//" and b0 == b1 and b0 > 0:
            return a0 // b0, a1 // b0
        if e.op == "%" and b0 == b1 and b0 > 0:
            return (a0 % b0, a1 % b0) if a1 - a0 < b0 and a0 % b0 <= a1 % b0 else (0, b0 - 1)
    raise ScheduleError(f"compute_at: cannot bound {e}")


def tile_extent(value: Expr, inner: set[int], extents: dict[int, int], extent: int) -> int:
    """How many values ``value`` takes while the ``inner`` loop variables run (the others fixed)."""
    lo, hi = _interval(value, inner, extents)
    return max(1, min(extent, hi - lo + 1))


class Schedule:
    """Stages of the tensors that ``outputs`` depend on (placeholders excluded), producers first."""

    def __init__(self, outputs: list[Tensor]) -> None:
        self.outputs = list(outputs)
        self.stages: list[Stage] = [Stage(t) for t in te.post_order(self.outputs) if not t.is_placeholder]
        self._by_tensor: dict[int, Stage] = {s.tensor.uid: s for s in self.stages}
        # placeholder uid -> (the placeholder read in its place, panel width): a constant input whose
        # B panels the kernel reads ready-made, packed once when the program's weights are laid out
        self.prepacked: dict[int, tuple[Tensor, int]] = {}

    def __getitem__(self, t: Tensor) -> Stage:
        try:
            return self._by_tensor[t.uid]
        except KeyError:
            raise ScheduleError(f"{t.name} is not computed in this schedule") from None

    @property
    def placeholders(self) -> list[Tensor]:
        return [t for t in te.post_order(self.outputs) if t.is_placeholder]

    def cache_write(self, t: Tensor, scope: str = "local") -> Tensor:
        """Compute ``t`` into a new stage (in ``scope``); ``t`` becomes a copy of it. Returns the new tensor."""
        st = self[t]
        if st.relations:
            raise ScheduleError("cache_write: call it before scheduling the stage")
        body = t.body
        assert body is not None
        cached = Tensor(f"{t.name}_{scope}", t.shape, t.dtype, t.axes, body, t.tag)
        new_axes = tuple(IterVar(Var(f"{a.name}_c"), a.extent) for a in t.axes)
        t.axes = new_axes
        t.body = cached[tuple(a.var for a in new_axes)]
        cst = Stage(cached)
        cst.scope = scope
        st.__init__(t)  # type: ignore[misc]
        i = self.stages.index(st)
        self.stages.insert(i, cst)
        self._by_tensor[cached.uid] = cst
        return cached

    def describe(self) -> str:
        lines = []
        for st in self.stages:
            loops = ", ".join(f"{a.name}:{a.extent}{'/' + st.ann[a] if a in st.ann else ''}"
                              f"{'/tensorize' if a is st.tensorized else ''}" for a in st.leaves)
            lines.append(f"{st.tensor.name} @{st.attach_name} [{st.scope}] ({loops})")
        return "\n".join(lines)


def extents_of(st: Stage) -> dict[int, int]:
    out = {id(a.var): a.extent for a in st.leaves}
    for rel in st.relations:
        if isinstance(rel, Split):
            out[id(rel.parent.var)] = rel.parent.extent
    return out

