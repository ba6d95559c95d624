"""A tensor-expression language: compute declarations over index variables, with reduction axes.

    A = placeholder((M, K), "A")
    B = placeholder((K, N), "B")
    k = reduce_axis(K, "k")
    C = compute((M, N), lambda i, j: sum_(A[i, k] * B[k, j], k), "C")

Expressions are trees of :class:`Expr`; ``Tensor[...]`` is a load. Index arithmetic is int,
values are float32 (or int64 for index tensors). :func:`simplify` folds constants.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


class Expr:
    dtype: str = "float32"

    def _b(self, op: str, other: Any, rev: bool = False) -> Expr:
        o = as_expr(other, self.dtype)
        return BinOp(op, o, self) if rev else BinOp(op, self, o)

    def __add__(self, o: Any) -> Expr:
        return self._b("+", o)

    def __radd__(self, o: Any) -> Expr:
        return self._b("+", o, True)

    def __sub__(self, o: Any) -> Expr:
        return self._b("-", o)

    def __rsub__(self, o: Any) -> Expr:
        return self._b("-", o, True)

    def __mul__(self, o: Any) -> Expr:
        return self._b("*", o)

    def __rmul__(self, o: Any) -> Expr:
        return self._b("*", o, True)

    def __truediv__(self, o: Any) -> Expr:
        return self._b("/", o)

    def __rtruediv__(self, o: Any) -> Expr:
        return self._b("/", o, True)

    def __floordiv__(self, o: Any) -> Expr:
        return self._b("//", o)

    def __mod__(self, o: Any) -> Expr:
        return self._b("%", o)

    def __neg__(self) -> Expr:
        return BinOp("-", Const(0, self.dtype), self)

    def __lt__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._b("<", o)

    def __le__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._b("<=", o)

    def __gt__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._b(">", o)

    def __ge__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._b(">=", o)

    def __and__(self, o: Any) -> Expr:
        return self._b("&&", o)

    __hash__ = object.__hash__


@dataclass(eq=False)
class Var(Expr):
    name: str
    dtype: str = "int64"


@dataclass(eq=False)
class Const(Expr):
    value: float | int
    dtype: str = "float32"


@dataclass(eq=False)
class BinOp(Expr):
    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        if self.op in ("<", "<=", ">", ">=", "==", "&&", "||"):
            self.dtype = "bool"
        elif self.op in ("//", "%"):
            self.dtype = "int64"
        else:
            self.dtype = self.a.dtype if self.a.dtype == self.b.dtype else "float32"


@dataclass(eq=False)
class Call(Expr):
    fn: str  # a C math function: expf, tanhf, erff, sqrtf, fmaxf, fminf
    args: tuple[Expr, ...]
    dtype: str = "float32"


@dataclass(eq=False)
class Cast(Expr):
    value: Expr
    dtype: str = "float32"


@dataclass(eq=False)
class Select(Expr):
    cond: Expr
    then: Expr
    other: Expr

    def __post_init__(self) -> None:
        self.dtype = self.then.dtype


@dataclass(eq=False)
class IterVar:
    var: Var
    extent: int
    kind: str = "data"  # "data" or "reduce"

    @property
    def name(self) -> str:
        return self.var.name

    def __repr__(self) -> str:
        return f"IterVar({self.name}, {self.extent}, {self.kind})"


@dataclass(eq=False)
class Reduce(Expr):
    combiner: str  # "sum" or "max"
    body: Expr
    axes: tuple[IterVar, ...]

    def __post_init__(self) -> None:
        self.dtype = self.body.dtype

    @property
    def init(self) -> Const:
        return Const(0.0 if self.combiner == "sum" else -math.inf, self.dtype)


@dataclass(eq=False)
class Load(Expr):
    tensor: Tensor
    indices: tuple[Expr, ...]

    def __post_init__(self) -> None:
        self.dtype = self.tensor.dtype


@dataclass(eq=False)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    axes: tuple[IterVar, ...] = ()  # empty for a placeholder
    body: Expr | None = None  # None for a placeholder
    tag: str = ""  # what made it (conv2d, matmul, pad, ...): schedule templates key on it
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def is_placeholder(self) -> bool:
        return self.body is None

    @property
    def reduce_axes(self) -> tuple[IterVar, ...]:
        return self.body.axes if isinstance(self.body, Reduce) else ()

    def __getitem__(self, idx: Any) -> Load:
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(idx) != len(self.shape):
            raise IndexError(f"{self.name} has rank {len(self.shape)}, indexed with {len(idx)}")
        return Load(self, tuple(as_expr(i, "int64") for i in idx))

    def __call__(self, *idx: Any) -> Load:
        return self[tuple(idx)]

    def __repr__(self) -> str:
        return f"Tensor({self.name}, {list(self.shape)})"

    __hash__ = object.__hash__


def as_expr(x: Any, dtype: str = "float32") -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, IterVar):
        return x.var
    if isinstance(x, bool | int) and dtype != "float32":
        return Const(int(x), "int64")
    if isinstance(x, int | float):
        return Const(float(x) if dtype == "float32" else x, dtype)
    raise TypeError(f"not an expression: {x!r}")


def placeholder(shape: Sequence[int], name: str, dtype: str = "float32") -> Tensor:
    return Tensor(name, tuple(int(s) for s in shape), dtype)


def reduce_axis(extent: int, name: str) -> IterVar:
    return IterVar(Var(name), int(extent), "reduce")


def compute(shape: Sequence[int], fcompute: Callable[..., Expr | float], name: str, dtype: str | None = None,
            tag: str = "") -> Tensor:
    axes = tuple(IterVar(Var(f"{name}_{'ijklmnop'[d] if d < 8 else d}"), int(s)) for d, s in enumerate(shape))
    body = as_expr(fcompute(*[a.var for a in axes]))
    return Tensor(name, tuple(int(s) for s in shape), dtype or body.dtype, axes, body, tag)


def sum_(body: Expr, axes: IterVar | Sequence[IterVar]) -> Reduce:
    return Reduce("sum", body, (axes,) if isinstance(axes, IterVar) else tuple(axes))


def max_(body: Expr, axes: IterVar | Sequence[IterVar]) -> Reduce:
    return Reduce("max", body, (axes,) if isinstance(axes, IterVar) else tuple(axes))


def call(fn: str, *args: Any) -> Call:
    return Call(fn, tuple(as_expr(a) for a in args))


def select(cond: Expr, then: Any, other: Any) -> Select:
    t = as_expr(then)
    return Select(cond, t, as_expr(other, t.dtype))


def call_int_min(a: Any, b: Any) -> Expr:
    """min of two index expressions."""
    a, b = as_expr(a, "int64"), as_expr(b, "int64")
    return Select(BinOp("<", a, b), a, b)


def maximum(a: Any, b: Any) -> Expr:
    return call("fmaxf", a, b)


def minimum(a: Any, b: Any) -> Expr:
    return call("fminf", a, b)


# ---------------------------------------------------------------------------- traversal


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, BinOp):
        return (e.a, e.b)
    if isinstance(e, Call):
        return e.args
    if isinstance(e, Cast):
        return (e.value,)
    if isinstance(e, Select):
        return (e.cond, e.then, e.other)
    if isinstance(e, Reduce):
        return (e.body,)
    if isinstance(e, Load):
        return e.indices
    return ()


def rebuild(e: Expr, f: Callable[[Expr], Expr]) -> Expr:
    """Apply ``f`` bottom-up (post-order) and rebuild."""
    if isinstance(e, BinOp):
        e = BinOp(e.op, rebuild(e.a, f), rebuild(e.b, f))
    elif isinstance(e, Call):
        e = Call(e.fn, tuple(rebuild(a, f) for a in e.args), e.dtype)
    elif isinstance(e, Cast):
        e = Cast(rebuild(e.value, f), e.dtype)
    elif isinstance(e, Select):
        e = Select(rebuild(e.cond, f), rebuild(e.then, f), rebuild(e.other, f))
    elif isinstance(e, Reduce):
        e = Reduce(e.combiner, rebuild(e.body, f), e.axes)
    elif isinstance(e, Load):
        e = Load(e.tensor, tuple(rebuild(i, f) for i in e.indices))
    return f(e)


def substitute(e: Expr, mapping: dict[Var, Expr]) -> Expr:
    return rebuild(e, lambda x: mapping.get(x, x) if isinstance(x, Var) else x)


def loads(e: Expr) -> list[Load]:
    out: list[Load] = []
    stack = [e]
    while stack:
        x = stack.pop()
        if isinstance(x, Load):
            out.append(x)
        stack.extend(children(x))
    return out


def input_tensors(t: Tensor) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    if t.body is not None:
        for ld in loads(t.body):
            seen.setdefault(ld.tensor.uid, ld.tensor)
    return list(seen.values())


def post_order(outputs: Sequence[Tensor]) -> list[Tensor]:
    """Every tensor reachable from ``outputs``, producers before consumers."""
    order: list[Tensor] = []
    seen: set[int] = set()

    def visit(t: Tensor) -> None:
        if t.uid in seen:
            return
        seen.add(t.uid)
        for p in input_tensors(t):
            visit(p)
        order.append(t)

    for o in outputs:
        visit(o)
    return order


# ---------------------------------------------------------------------------- simplification


def _const(e: Expr) -> int | float | None:
    return e.value if isinstance(e, Const) else None


def _fold(e: Expr) -> Expr:
    if not isinstance(e, BinOp):
        return e
    a, b = _const(e.a), _const(e.b)
    if a is not None and b is not None and e.dtype != "bool":
        if e.op == "+":
            return Const(a + b, e.dtype)
        if e.op == "-":
            return Const(a - b, e.dtype)
        if e.op == "*":
            return Const(a * b, e.dtype)
        if e.op == "//" and b != 0:
            return Const(int(a) // int(b), "int64")
        if e.op == "%" and b != 0:
            return Const(int(a) % int(b), "int64")
    if e.dtype == "int64":
        if e.op == "+" and a == 0:
            return e.b
        if e.op in ("+", "-") and b == 0:
            return e.a
        if e.op == "*" and (a == 0 or b == 0):
            return Const(0, "int64")
        if e.op == "*" and a == 1:
            return e.b
        if e.op in ("*", "//") and b == 1:
            return e.a
        if e.op == "%" and b == 1:
            return Const(0, "int64")
        # (x*c + y) - (x*c + z) -> y - z, the shape of every tile offset
        if e.op == "-" and isinstance(e.a, BinOp) and isinstance(e.b, BinOp) and e.a.op == "+" and e.b.op == "+" \
                and same(e.a.a, e.b.a):
            return _fold(BinOp("-", e.a.b, e.b.b))
        if e.op == "-" and isinstance(e.a, BinOp) and e.a.op == "+" and same(e.a.a, e.b):
            return e.a.b
        if e.op == "-" and same(e.a, e.b):
            return Const(0, "int64")
        # (x // a) // b -> x // (a*b)
        if e.op == "//" and b is not None and isinstance(e.a, BinOp) and e.a.op == "//" and isinstance(e.a.b, Const):
            return BinOp("//", e.a.a, Const(int(e.a.b.value) * int(b), "int64"))
        # (x // c) * (c*s) + (x % c) * s -> x * s: the flat index of fused loops
        if e.op == "+":
            m = _merge_divmod(e.a, e.b)
            if m is not None:
                return m
    return e


def _divmod_term(e: Expr, op: str) -> tuple[Expr, int, int] | None:
    """Match (x op c) * k (or x op c, k = 1); returns (x, c, k)."""
    k = 1
    if isinstance(e, BinOp) and e.op == "*" and isinstance(e.b, Const):
        k, e = int(e.b.value), e.a
    if isinstance(e, BinOp) and e.op == op and isinstance(e.b, Const):
        return e.a, int(e.b.value), k
    return None


def _merge_divmod(a: Expr, b: Expr) -> Expr | None:
    rest: Expr | None = None
    if isinstance(a, BinOp) and a.op == "+" and _divmod_term(a.b, "//") is not None:
        rest, a = a.a, a.b
    da, mb = _divmod_term(a, "//"), _divmod_term(b, "%")
    if da is None or mb is None:
        return None
    (x1, c1, k1), (x2, c2, k2) = da, mb
    if isinstance(x2, BinOp) and x2.op == "//" and isinstance(x2.b, Const) and same(x1, x2.a):
        # (x // (a*c)) * (c*s) + ((x // a) % c) * s -> (x // a) * s
        if c1 != int(x2.b.value) * c2 or k1 != c2 * k2:
            return None
    elif c1 != c2 or k1 != c1 * k2 or not same(x1, x2):
        return None
    merged = _fold(BinOp("*", x2 if isinstance(x2, BinOp) and x2.op == "//" else x1, Const(k2, "int64")))
    return merged if rest is None else _fold(BinOp("+", rest, merged))


def same(a: Expr, b: Expr) -> bool:
    """Structural equality of two expressions."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, Const):
        return a.value == b.value and a.dtype == b.dtype  # type: ignore[attr-defined]
    if isinstance(a, Var):
        return False
    if isinstance(a, BinOp) and a.op != b.op:  # type: ignore[attr-defined]
        return False
    if isinstance(a, Call) and a.fn != b.fn:  # type: ignore[attr-defined]
        return False
    if isinstance(a, Load) and a.tensor is not b.tensor:  # type: ignore[attr-defined]
        return False
    ca, cb = children(a), children(b)
    return len(ca) == len(cb) and all(same(x, y) for x, y in zip(ca, cb, strict=True))


def simplify(e: Expr) -> Expr:
    return rebuild(e, _fold)
