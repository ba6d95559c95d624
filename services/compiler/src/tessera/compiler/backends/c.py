"""The C backend: loop IR -> C with OpenMP pragmas -> gcc -> a shared library, loaded with ctypes.

The library exports ``run_graph(void **io, float *arena, const float *weights)``, which calls
every kernel in order over the planned arena, and ``run_graph_profiled`` that also records each
kernel's wall time: a call from Python is one ctypes crossing for the whole graph.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tessera.common.errors import FailedPreconditionError
from tessera.compiler import te
from tessera.compiler.lower import Allocate, BufLoad, For, IfThen, LoweredFunc, MicroKernel, Seq, Stmt, Store
from tessera.compiler.target import vector_lanes

if TYPE_CHECKING:
    from tessera.compiler.codegen import Program

# -ffast-math whole (finite math included) so that glibc's vector expf/tanhf (libmvec) are used;
# the code never needs infinities: max reductions start from -FLT_MAX. The link is a separate step
# without it: gcc links crtfastmath.o into anything linked with -ffast-math, and that sets
# flush-to-zero / denormals-are-zero for the whole process that loads the library.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fPIC", "-std=gnu11"]
LDFLAGS = ["-shared", "-fopenmp"]
_CTYPE = {"float32": "float", "int64": "int64_t", "bool": "int"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_COMPILER_CACHE_DIR") or Path.home() / ".cache" / "tessera" / "compiler")


def _c_const(c: te.Const) -> str:
    if c.dtype == "float32":
        v = float(c.value)
        if math.isinf(v):
            return "FLT_MAX" if v > 0 else "(-FLT_MAX)"
        return f"{v!r}f" if "e" in repr(v) or "." in repr(v) else f"{v!r}.0f"
    return f"{int(c.value)}L"


def expr(e: te.Expr) -> str:
    if isinstance(e, te.Var):
        return e.name
    if isinstance(e, te.Const):
        return _c_const(e)
    if isinstance(e, te.BinOp):
        op = "/" if e.op == "//" else e.op
        return f"({expr(e.a)} {op} {expr(e.b)})"
    if isinstance(e, te.Call):
        return f"{e.fn}({', '.join(expr(a) for a in e.args)})"
    if isinstance(e, te.Cast):
        return f"(({_CTYPE[e.dtype]})({expr(e.value)}))"
    if isinstance(e, te.Select):
        return f"({expr(e.cond)} ? {expr(e.then)} : {expr(e.other)})"
    if isinstance(e, BufLoad):
        return f"{e.buf.name}[{expr(e.index)}]"
    raise TypeError(f"cannot render {type(e).__name__} in C")


def stmt(s: Stmt, ind: str = "  ") -> list[str]:
    if isinstance(s, Seq):
        return [line for x in s.stmts for line in stmt(x, ind)]
    if isinstance(s, Store):
        return [f"{ind}{s.buf.name}[{expr(s.index)}] = {expr(s.value)};"]
    if isinstance(s, IfThen):
        orelse = [f"{ind}}} else {{", *stmt(s.orelse, ind + "  ")] if s.orelse is not None else []
        return [f"{ind}if ({expr(s.cond)}) {{", *stmt(s.body, ind + "  "), *orelse, f"{ind}}}"]
    if isinstance(s, MicroKernel):
        return [f"{ind}{micro_kernel_name(s)}({s.a_buf.name} + {expr(s.a_index)}, {s.b_buf.name} + {expr(s.b_index)}, "
                f"{s.c_buf.name});"]
    if isinstance(s, Allocate):
        decl = f"{ind}{_CTYPE[s.buf.dtype]} {s.buf.name}[{s.buf.size}] __attribute__((aligned(64)));"
        return [f"{ind}{{", decl, *stmt(s.body, ind + "  "), f"{ind}}}"]
    if isinstance(s, For):
        pragma = {"parallel": f"#pragma omp parallel for schedule(dynamic, {_chunk(s.extent)})", "vectorize": "#pragma omp simd",
                  "unroll": f"#pragma GCC unroll {min(s.extent, 64)}"}.get(s.kind)
        head = f"{ind}for (long {s.var.name} = 0; {s.var.name} < {s.extent}; ++{s.var.name}) {{"
        return [*([ind + pragma] if pragma else []), head, *stmt(s.body, ind + "  "), f"{ind}}}"]
    raise TypeError(f"cannot render {type(s).__name__} in C")


PARALLEL_CHUNKS = 32


def _chunk(extent: int) -> int:
    """Iterations per chunk of a parallel loop: about ``PARALLEL_CHUNKS`` chunks taken by whichever thread is
    free, so that a thread the OS takes off its core for a while (a shared host) does not hold the others at
    the loop's end barrier as it would with equal static halves; a chunk is large enough for the atomic
    that hands it out not to count."""
    return max(1, -(-extent // PARALLEL_CHUNKS))


def kernel(f: LoweredFunc) -> str:
    params = []
    for b in f.params:
        const = "const " if b.name.startswith("in") else ""
        params.append(f"{const}{_CTYPE[b.dtype]} *__restrict__ {b.name}")
    params.append("float *__restrict__ ws")
    lines = [f"static void {f.name}({', '.join(params)}) {{"]
    ws = {id(x.buf): x.buf for x in _bufloads(f.body)} | {id(x.buf): x.buf for x in _stores(f.body)}
    for b in ws.values():
        if b.scope == "workspace":
            lines.append(f"  {_CTYPE[b.dtype]} *__restrict__ {b.name} = ({_CTYPE[b.dtype]} *)(ws + {b.offset});")
    lines += stmt(f.body)
    lines.append("}")
    return "\n".join(lines)


def _walk(s: Stmt) -> list[Stmt]:
    out = [s]
    if isinstance(s, Seq):
        for x in s.stmts:
            out += _walk(x)
    elif isinstance(s, For | IfThen | Allocate):
        out += _walk(s.body)
        if isinstance(s, IfThen) and s.orelse is not None:
            out += _walk(s.orelse)
    return out


# ---------------------------------------------------------------------------- micro-kernels


def _vector_width(cols: int) -> int:
    return next(w for w in (vector_lanes(), 8, 4, 1) if cols % w == 0)


def _held_b_vectors(rows: int, nv: int, w: int) -> int:
    """How many of a tile's B vectors stay in registers for all its rows: all of them when the
    accumulators, the B vectors and one broadcast A value fit the register file; otherwise only
    as many as fit, and the others are FMA memory operands (read once per row)."""
    regs = 32 if w >= 16 else 16
    return nv if rows * nv + nv + 1 <= regs or w == 1 else max(0, min(nv, regs - rows * nv - 1))


def micro_kernel_name(mk: MicroKernel) -> str:
    sig = repr((mk.rows, mk.cols, mk.loops, mk.a_row, mk.init, _vector_width(mk.cols)))
    return f"ukr_{mk.rows}x{mk.cols}_{hashlib.sha256(sig.encode()).hexdigest()[:10]}"


def micro_kernel(mk: MicroKernel) -> str:
    """rows x cols accumulators in vector registers (GCC vector extensions: a broadcast A value times
    vectors of B, contracted to FMAs), the reduction loops around them, one store of the tile at the end."""
    w = _vector_width(mk.cols)
    nv = mk.cols // w
    vt, vu = (f"tsr_v{w}", f"tsr_v{w}u") if w > 1 else ("float", "float")
    acc = [[f"c{r}_{v}" for v in range(nv)] for r in range(mk.rows)]
    lines = [f"static inline __attribute__((always_inline)) void {micro_kernel_name(mk)}"
             "(const float *__restrict__ a, const float *__restrict__ b, float *__restrict__ c) {"]
    for r in range(mk.rows):
        for v in range(nv):
            init = "{0}" if w > 1 else "0.0f"
            lines.append(f"  {vt} {acc[r][v]} = {init if mk.init else f'*(const {vu} *)(c + {r * mk.cols + v * w})'};")
    ind = "  "
    for d, (ext, _, _) in enumerate(mk.loops):
        if d == len(mk.loops) - 1:
            lines.append(f"{ind}#pragma GCC unroll 4")
        lines.append(f"{ind}for (long l{d} = 0; l{d} < {ext}; ++l{d}) {{")
        ind += "  "
    aoff = " + ".join(f"l{d} * {sa}" for d, (_, sa, _) in enumerate(mk.loops) if sa) or "0"
    boff = " + ".join(f"l{d} * {sb}" for d, (_, _, sb) in enumerate(mk.loops) if sb) or "0"
    lines.append(f"{ind}const float *ap = a + {aoff};")
    lines.append(f"{ind}const float *bp = b + {boff};")
    held = _held_b_vectors(mk.rows, nv, w)
    for v in range(held):
        lines.append(f"{ind}const {vt} b{v} = *(const {vu} *)(bp + {v * w});")
    for r in range(mk.rows):
        lines.append(f"{ind}const float a{r} = ap[{r * mk.a_row}];")
        if held < nv and r:
            # the compiler may not reuse the B vectors loaded for the row above: each is read again,
            # straight into the FMA (an L1 hit), instead of spilling an accumulator to the stack
            lines.append(f'{ind}__asm__("" : "+r"(bp));')
        for v in range(nv):
            bv = f"b{v}" if v < held else f"(*(const {vu} *)(bp + {v * w}))"
            lines.append(f"{ind}{acc[r][v]} += a{r} * {bv};")
    for _ in mk.loops:
        ind = ind[:-2]
        lines.append(f"{ind}}}")
    for r in range(mk.rows):
        for v in range(nv):
            lines.append(f"  *({vu} *)(c + {r * mk.cols + v * w}) = {acc[r][v]};")
    lines.append("}")
    return "\n".join(lines)


def _micro_kernels(funcs: Sequence[LoweredFunc]) -> list[MicroKernel]:
    out: dict[str, MicroKernel] = {}
    for f in funcs:
        for x in _walk(f.body):
            if isinstance(x, MicroKernel):
                out.setdefault(micro_kernel_name(x), x)
    return list(out.values())


def _stores(s: Stmt) -> list[Store]:
    return [x for x in _walk(s) if isinstance(x, Store)]


def _bufloads(s: Stmt) -> list[BufLoad]:
    out: list[BufLoad] = []
    exprs: list[te.Expr] = []
    for x in _walk(s):
        if isinstance(x, MicroKernel):
            out += [BufLoad(x.a_buf, x.a_index), BufLoad(x.b_buf, x.b_index)]
            exprs += [x.a_index, x.b_index]
        if isinstance(x, Store):
            exprs += [x.index, x.value]
        elif isinstance(x, IfThen):
            exprs.append(x.cond)
    while exprs:
        e = exprs.pop()
        if isinstance(e, BufLoad):
            out.append(e)
            exprs.append(e.index)
        exprs.extend(te.children(e))
    return out


class CModule:
    """A loaded library; one arena per module (calls on one module are serialized)."""

    def __init__(self, path: str, program: Program) -> None:
        self.lib = ctypes.CDLL(path)
        self.program = program
        self._run = self.lib.run_graph
        self._run.restype = None
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._prof = self.lib.run_graph_profiled
        self._prof.restype = None
        self._prof.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.arena = np.zeros(max(program.arena_size, 16) + 16, np.float32)
        self._arena_ptr = self.arena.ctypes.data + (-self.arena.ctypes.data % 64)
        self.weights = program.weights
        self._weights_ptr = self.weights.ctypes.data
        self._n = program.n_inputs + program.n_outputs
        self._io = (ctypes.c_void_p * max(self._n, 1))()
        self._lock = threading.Lock()

    def _bind(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        for i, a in enumerate([*inputs, *outputs]):
            self._io[i] = a.ctypes.data

    def run(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        with self._lock:
            self._bind(inputs, outputs)
            self._run(self._io, self._arena_ptr, self._weights_ptr)

    def profile(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> list[float]:
        times = np.zeros(max(len(self.program.calls), 1), np.float64)
        with self._lock:
            self._bind(inputs, outputs)
            self._prof(self._io, self._arena_ptr, self._weights_ptr, times.ctypes.data)
        return [float(t) for t in times[: len(self.program.calls)]]


class CBackend:
    name = "c"

    def render(self, program: Program) -> str:
        out = ["// generated by tessera.compiler (C backend)", "#include <float.h>", "#include <math.h>", "#include <stdint.h>",
               "#include <omp.h>", ""]
        mks = _micro_kernels([c.func for c in program.calls])
        widths = sorted({_vector_width(mk.cols) for mk in mks} - {1})
        for w in widths:
            out.append(f"typedef float tsr_v{w} __attribute__((vector_size({4 * w})));")
            out.append(f"typedef float tsr_v{w}u __attribute__((vector_size({4 * w}), aligned(4), may_alias));")
        out += [micro_kernel(mk) + "\n" for mk in mks]
        seen: set[str] = set()
        for call in program.calls:
            if call.func.name not in seen:
                seen.add(call.func.name)
                out += [f"// {call.label}", kernel(call.func), ""]
        def call_line(c: object) -> str:
            from tessera.compiler.codegen import Call as _Call
            assert isinstance(c, _Call)
            args = []
            for a, b in zip(c.args, c.func.params, strict=True):
                ty = _CTYPE[b.dtype]
                if a.kind in ("input", "output"):
                    pos = a.index if a.kind == "input" else program.n_inputs + a.index
                    args.append(f"({ty} *)io[{pos}]")
                elif a.kind == "arena":
                    args.append(f"({ty} *)(arena + {a.index})")
                else:
                    args.append(f"({ty} *)(weights + {a.index})")
            args.append(f"arena + {program.workspace_offset}")
            return f"{c.func.name}({', '.join(args)});"
        out.append("void run_graph(void **io, float *arena, const float *weights) {")
        out += [f"  {call_line(c)}" for c in program.calls]
        out.append("}")
        out.append("void run_graph_profiled(void **io, float *arena, const float *weights, double *times) {")
        out.append("  double t0;")
        for i, c in enumerate(program.calls):
            out.append(f"  t0 = omp_get_wtime(); {call_line(c)} times[{i}] = omp_get_wtime() - t0;")
        out.append("}")
        return "\n".join(out) + "\n"

    def build(self, source: str, cache_dir: str | None = None) -> tuple[str, bool]:
        """Compile with gcc into ``<cache>/<sha256 of source and flags>.so`` (reused when present)."""
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256((" ".join(CFLAGS + LDFLAGS) + "\n" + source).encode()).hexdigest()[:32]
        lib = cache / f"{key}.so"
        if lib.exists():
            return str(lib), True
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "kernels.c"
            src.write_text(source)
            out = Path(tmp) / "kernels.so"
            obj = Path(tmp) / "kernels.o"
            r = subprocess.run(["gcc", *CFLAGS, "-c", "-o", str(obj), str(src)], capture_output=True, text=True)
            if r.returncode == 0:
                r = subprocess.run(["gcc", *LDFLAGS, "-o", str(out), str(obj), "-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                raise FailedPreconditionError(f"gcc failed: {r.stderr[-2000:]}")
            (cache / f"{key}.c").write_text(source)
            os.replace(out, lib)  # atomic: concurrent builders of the same key agree
        return str(lib), False

    def load(self, path: str, program: Program) -> CModule:
        return CModule(path, program)
