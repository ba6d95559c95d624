"""Tensor expressions, schedule primitives and lowering, run through the C backend."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.compiler import te
from tessera.compiler.backends.c import CBackend
from tessera.compiler.codegen import Arg, Call, Program
from tessera.compiler.lower import For, IfThen, MicroKernel, lower
from tessera.compiler.schedule import Schedule, ScheduleError


def build_and_run(sch: Schedule, ins: list[te.Tensor], out: te.Tensor, arrays: list[np.ndarray], cache: str) -> np.ndarray:
    f = lower(sch, ins, [out], "k")
    prog = Program([Call(f, [Arg("input", i) for i in range(len(ins))] + [Arg("output", 0)], "k")], len(ins), 1,
                   arena_size=f.workspace + 16, workspace_offset=0)
    be = CBackend()
    path, _ = be.build(be.render(prog), cache)
    res = np.empty(out.shape, np.float32)
    be.load(path, prog).run(arrays, [res])
    return res


def matmul(m: int, n: int, k: int) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    a, b = te.placeholder((m, k), "A"), te.placeholder((k, n), "B")
    r = te.reduce_axis(k, "r")
    return a, b, te.compute((m, n), lambda i, j: te.sum_(a[i, r] * b[r, j], r), "C")


@pytest.mark.parametrize("shape", [(64, 128, 32), (13, 37, 19)])
def test_register_blocked_matmul_schedule(cache_dir: str, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    a, b, c = matmul(m, n, k)
    s = Schedule([c])
    cl = s.cache_write(c)
    i, j = s[c].axis
    io, jo, ii, ji = s[c].tile(i, j, 4, 16)  # 13 and 37 do not divide: guarded tails
    s[c].parallel(io)
    s[c].vectorize(ji)
    s[cl].compute_at(s[c], jo)
    ti, tj = s[cl].axis
    (kk,) = s[cl].reduce_axis
    s[cl].reorder(kk, ti, tj)
    s[cl].unroll(ti)
    s[cl].vectorize(tj)
    x, y = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    np.testing.assert_allclose(build_and_run(s, [a, b], c, [x, y], cache_dir), x @ y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(48, 64, 40), (13, 37, 19)])
def test_tensorized_tile_is_one_micro_kernel_with_plain_loops_for_cut_tiles(cache_dir: str, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    a, b, c = matmul(m, n, k)
    s = Schedule([c])
    cl = s.cache_write(c)
    i, j = s[c].axis
    io, jo, ii, ji = s[c].tile(i, j, 6, 16)
    s[c].parallel(s[c].fuse(io, jo))
    s[cl].compute_at(s[c], s[c].leaves[0])
    ti, tj = s[cl].axis
    (kk,) = s[cl].reduce_axis
    ko, ki = s[cl].split(kk, 4)
    s[cl].reorder(ko, ki, ti, tj)
    s[cl].tensorize(ko)
    f = lower(s, [a, b], [c])
    stmts = _walk(f.body)
    (mk,) = [x for x in stmts if isinstance(x, MicroKernel)]
    assert (mk.rows, mk.cols, mk.a_row, mk.init) == (6, 16, k, True)
    assert mk.loops == [(-(-k // 4) * 4, 1, n)]  # (extent, A stride, B stride): ko and ki run contiguously, one loop
    cut = any(isinstance(x, IfThen) and x.orelse is not None for x in stmts)
    assert cut == (m % 6 != 0 or n % 16 != 0 or k % 4 != 0)  # whole tiles only take the micro-kernel
    src = CBackend().render(Program([Call(f, [Arg("input", 0), Arg("input", 1), Arg("output", 0)], "k")], 2, 1))
    assert "ukr_6x16_" in src and "vector_size" in src
    x, y = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    np.testing.assert_allclose(build_and_run(s, [a, b], c, [x, y], cache_dir), x @ y, rtol=1e-4, atol=1e-5)


def test_tensorize_falls_back_to_loops_for_other_bodies(cache_dir: str) -> None:
    x = te.placeholder((8, 32), "X")
    r = te.reduce_axis(32, "r")
    sq = te.compute((8, 16), lambda i, j: te.sum_(x[i, r] * x[i, r] + j * 0.0, r), "S")  # not a product of two loads
    s = Schedule([sq])
    s[sq].reorder(s[sq].reduce_axis[0], *s[sq].axis)
    s[sq].tensorize(s[sq].reduce_axis[0])
    with pytest.raises(ScheduleError, match="not a reduction"):
        s[sq].tensorize(s[sq].axis[0])
    f = lower(s, [x], [sq])
    assert not any(isinstance(st, MicroKernel) for st in _walk(f.body))
    arr = np.random.rand(8, 32).astype(np.float32)
    want = np.repeat((arr * arr).sum(1, keepdims=True), 16, 1)
    np.testing.assert_allclose(build_and_run(s, [x], sq, [arr], cache_dir), want, rtol=1e-4, atol=1e-5)


def test_split_fuse_reorder_inline(cache_dir: str) -> None:
    x = te.placeholder((6, 10), "X")
    e = te.compute((6, 10), lambda i, j: te.call("expf", x[i, j]), "E")
    y = te.compute((10, 6), lambda i, j: e[j, i] * 2.0 + 1.0, "Y")
    s = Schedule([y])
    s[e].compute_inline()
    i, j = s[y].axis
    f = s[y].fuse(i, j)
    fo, fi = s[y].split(f, 7)
    s[y].unroll(fi)
    lowered = lower(s, [x], [y])
    assert sum(isinstance(st, For) for st in _walk(lowered.body)) == 2  # the fused then split loop; E inlined
    arr = np.random.rand(6, 10).astype(np.float32)
    np.testing.assert_allclose(build_and_run(s, [x], y, [arr], cache_dir), (np.exp(arr) * 2 + 1).T, rtol=1e-5)


def test_row_reduction_computed_at_its_row(cache_dir: str) -> None:
    x = te.placeholder((5, 33), "X")
    r = te.reduce_axis(33, "r")
    mx = te.compute((5,), lambda i: te.max_(x[i, r], r), "M")
    y = te.compute((5, 33), lambda i, j: x[i, j] - mx[i], "Y")
    s = Schedule([y])
    s[mx].set_scope("local")
    s[mx].compute_at(s[y], s[y].axis[0])
    s[y].vectorize(s[y].axis[1])
    arr = np.random.rand(5, 33).astype(np.float32)
    np.testing.assert_allclose(build_and_run(s, [x], y, [arr], cache_dir), arr - arr.max(1, keepdims=True))


def test_schedule_errors() -> None:
    a, b, c = matmul(8, 8, 8)
    s = Schedule([c])
    with pytest.raises(ScheduleError, match="reduction"):
        s[c].compute_inline()
    other = te.placeholder((3,), "Z")
    zz = te.compute((3,), lambda i: other[i] + 1.0, "ZZ")
    with pytest.raises(ScheduleError, match="not a loop"):
        s[c].split(Schedule([zz])[zz].axis[0], 2)
    i, j = s[c].axis
    s[c].reorder(j, i)
    with pytest.raises(ScheduleError, match="adjacent"):
        s[c].fuse(i, j)
    with pytest.raises(ScheduleError, match="reduction axis"):
        s[c].fuse(i, s[c].reduce_axis[0])


def _walk(s: object) -> list[object]:
    out = [s]
    for attr in ("body", "orelse"):
        if getattr(s, attr, None) is not None:
            out += _walk(getattr(s, attr))
    for x in getattr(s, "stmts", []):
        out += _walk(x)
    return out


def test_a_loaded_kernel_library_leaves_the_process_floating_point_state_alone(tmp_path: object) -> None:
    """Kernels are compiled with -ffast-math, but linked without it: no flush-to-zero for the process that loads them."""
    x = te.placeholder((4,), "X")
    y = te.compute((4,), lambda i: x[i] * 2.0, "Y")
    arr = np.ones(4, np.float32)
    np.testing.assert_allclose(build_and_run(Schedule([y]), [x], y, [arr], str(tmp_path)), arr * 2)
    assert np.float32(1e-40) * np.float32(1.0) != 0  # a subnormal survives


def test_micro_kernel_loops_collapse_where_a_and_b_run_contiguously() -> None:
    from tessera.compiler.lower import _collapse

    # NCHWc 3x3 stride 1, 64 channels: (channel blocks, window rows, window columns, channels in the block)
    assert _collapse([(4, 16 * 58 * 58, 9 * 256), (3, 16 * 58, 3 * 256), (3, 16, 256), (16, 1, 16)]) == \
        [(4, 16 * 58 * 58, 9 * 256), (3, 16 * 58, 3 * 256), (48, 1, 16)]
    # stride 2: the window column steps 2 blocks in A, so it stays a loop of its own
    assert _collapse([(3, 32, 256), (16, 1, 16)]) == [(3, 32, 256), (16, 1, 16)]


@pytest.mark.parametrize("rows", [4, 6, 7])
def test_wide_register_tiles_stream_b_instead_of_spilling_an_accumulator(cache_dir: str, rows: int) -> None:
    """A tile of rows x 2 vectors needs rows*2 accumulators + 2 B vectors + 1 broadcast; past the register
    file (7 rows with 16 AVX2 registers), the second B vector is read per row as an FMA memory operand."""
    from tessera.compiler.backends.c import _held_b_vectors
    from tessera.compiler.target import vector_lanes

    w = vector_lanes()
    m, n, k = 3 * rows, 2 * w, 24
    assert _held_b_vectors(7, 2, 8) == 1 and _held_b_vectors(6, 2, 8) == 2 and _held_b_vectors(14, 2, 16) == 2 and _held_b_vectors(15, 2, 16) == 1
    a, b, c = matmul(m, n, k)
    s = Schedule([c])
    cl = s.cache_write(c)
    i, j = s[c].axis
    io, jo, ii, ji = s[c].tile(i, j, rows, n)
    s[c].parallel(s[c].fuse(io, jo))
    s[cl].compute_at(s[c], s[c].leaves[0])
    ti, tj = s[cl].axis
    (kk,) = s[cl].reduce_axis
    s[cl].reorder(kk, ti, tj)
    s[cl].tensorize(kk)
    f = lower(s, [a, b], [c])
    src = CBackend().render(Program([Call(f, [Arg("input", 0), Arg("input", 1), Arg("output", 0)], "k")], 2, 1))
    streamed = f"(*(const tsr_v{w}u *)(bp + {w}))" in src
    assert streamed == (2 * rows + 3 > (32 if w >= 16 else 16))
    x, y = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    np.testing.assert_allclose(build_and_run(s, [a, b], c, [x, y], cache_dir), x @ y, rtol=1e-4, atol=1e-5)


def test_parallel_loops_are_handed_out_in_chunks(cache_dir: str) -> None:
    """About 32 chunks per parallel loop, taken by whichever thread is free (not two static halves)."""
    from tessera.compiler.backends.c import PARALLEL_CHUNKS, _chunk

    assert (_chunk(1), _chunk(32), _chunk(33), _chunk(52900)) == (1, 1, 2, 1654)
    assert all(-(-e // _chunk(e)) <= PARALLEL_CHUNKS for e in (1, 7, 100, 224, 4096, 52900))
    a, b, c = matmul(64, 64, 8)
    s = Schedule([c])
    s[c].parallel(s[c].axis[0])
    f = lower(s, [a, b], [c])
    src = CBackend().render(Program([Call(f, [Arg("input", 0), Arg("input", 1), Arg("output", 0)], "k")], 2, 1))
    assert "#pragma omp parallel for schedule(dynamic, 2)" in src and "schedule(static)" not in src
    x, y = np.random.rand(64, 8).astype(np.float32), np.random.rand(8, 64).astype(np.float32)
    np.testing.assert_allclose(build_and_run(s, [a, b], c, [x, y], cache_dir), x @ y, rtol=1e-4, atol=1e-5)
