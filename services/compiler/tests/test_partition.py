"""Partitioning with fallback: unsupported ops run in torch behind one callable, strict refuses naming
every op and line, a model torch.fx cannot trace runs whole in torch, and bad input at call time."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tessera.compiler.api import compile as compile_module
from tessera.compiler.api import compile_graph
from tessera.compiler.frontend import TraceBrokenError, UnsupportedOpError
from tessera.compiler.partition import PartitionedModel
from tessera.compiler.runtime import CompiledModel


class Mixed(nn.Module):
    """Compiled parts around an LSTM, a MultiheadAttention, a Conv3d and a function the frontend does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv3d = nn.Conv3d(1, 2, 3, padding=1)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> Any:
        h = F.relu6(self.inp(x))
        o, _ = self.lstm(h)
        a, _ = self.mha(o, o, o)
        v = self.conv3d(a.unsqueeze(1).unsqueeze(1)).mean((1, 2))
        c = torch.cumsum(v, dim=1)
        return self.out(F.hardswish(c) + h).softmax(-1), c > 0


def _line(text: str) -> int:
    """The line of this file that holds ``text`` (where the model's op is)."""
    with open(__file__) as f:
        return next(k for k, ln in enumerate(f, 1) if text in ln and "_line(" not in ln)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -x


def test_unsupported_ops_run_in_torch_behind_one_callable(cache_dir: str) -> None:
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 5, 8)
    pm = compile_module(model, [x], cache_dir=cache_dir)
    assert isinstance(pm, PartitionedModel)
    with torch.no_grad():
        ref = model(x)
    got = pm(x)
    np.testing.assert_allclose(got[0].numpy(), ref[0].numpy(), rtol=1e-4, atol=1e-5)
    assert got[1].dtype == torch.bool and torch.equal(got[1], ref[1])
    got_np = pm(x.numpy())  # numpy in, numpy out
    np.testing.assert_allclose(got_np[0], ref[0].numpy(), rtol=1e-4, atol=1e-5)
    report = pm.report()
    kinds = [s.kind for s in pm.segments]
    assert kinds.count("compiled") >= 2 and kinds[0] == "compiled"
    for what in ("LSTM", "MultiheadAttention", "Conv3d", "torch.cumsum"):
        assert what in report, report
    assert f"test_partition.py\", line {_line('o, _ = self.lstm(h)')}" in report  # the LSTM's source line
    assert all(isinstance(s.model, CompiledModel) for s in pm.compiled_segments)


def test_strict_names_every_unsupported_op_and_its_line() -> None:
    with pytest.raises(UnsupportedOpError) as e:
        compile_module(Mixed(), [torch.randn(2, 5, 8)], strict=True)
    msg = str(e.value)
    assert msg.startswith("4 unsupported op(s)")
    for what, text in (("LSTM", "self.lstm(h)"), ("MultiheadAttention", "self.mha(o"), ("Conv3d", "self.conv3d("),
                       ("torch.cumsum", "torch.cumsum(")):
        assert what in msg and f"line {_line(text)}" in msg, msg


def test_data_dependent_control_flow(cache_dir: str) -> None:
    with pytest.raises(TraceBrokenError) as e:
        compile_module(Branchy(), [torch.randn(2, 4)], strict=True)
    where = f"test_partition.py:{_line('if x.sum() > 0:')}"
    assert where in str(e.value) and "if x.sum() > 0" in str(e.value)
    model = Branchy().eval()
    pm = compile_module(model, [torch.randn(2, 4)], cache_dir=cache_dir)
    assert isinstance(pm, PartitionedModel) and "the whole model runs in torch" in pm.report()
    assert where in pm.report()
    for x in (torch.ones(2, 4), -torch.ones(2, 4)):  # both branches, as torch takes them
        with torch.no_grad():
            assert torch.equal(pm(x), model(x))


def test_wrong_shape_and_dtype_at_call_time(cache_dir: str) -> None:
    x = torch.randn(2, 5, 8)
    pm = compile_module(Mixed(), [x], cache_dir=cache_dir)
    cm = compile_module(nn.Sequential(nn.Linear(8, 4), nn.ReLU6()), [x], cache_dir=cache_dir)
    assert isinstance(cm, CompiledModel)
    for m in (pm, cm):
        with pytest.raises(ValueError, match=r"input 0 has shape \[3, 5, 8\], the model was compiled for \[2, 5, 8\]"):
            m(torch.randn(3, 5, 8))
        with pytest.raises(ValueError, match="input 0 has dtype bool, the model takes float32"):
            m(x > 0)
        a, b = m(x.double()), m(x)  # another float dtype is converted
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="takes 1 inputs, got 2"):
        pm(x, x)


def test_a_subgraph_slower_than_eager_stays_in_torch(cache_dir: str) -> None:
    """keep_faster: each compiled subgraph is timed against torch eager on the same ops; one measured
    slower goes back to torch (here the first is made slow on purpose), and the result stays right."""
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 5, 8)
    built: list[Any] = []

    def build(g: Any) -> Any:
        cm = compile_graph(g, cache_dir=cache_dir)
        if built:
            return cm

        def slow(*args: Any) -> Any:
            time.sleep(0.005)
            return cm(*args)
        built.append(cm)
        return slow
    pm = compile_module(model, [x], keep_faster=True, compile_segment=build)
    assert isinstance(pm, PartitionedModel)
    first = pm.segments[0]
    assert first.kind == "torch" and "slower compiled than in torch eager" in first.reason and first.times is not None
    assert first.times[0] > first.times[1]
    assert "slower compiled than in torch eager" in pm.report()
    with torch.no_grad():
        ref = model(x)
    np.testing.assert_allclose(pm(x)[0].numpy(), ref[0].numpy(), rtol=1e-4, atol=1e-5)


class _Slow:
    """A compiled model made slower than torch eager on purpose (a sleep before each call)."""

    def __init__(self, cm: Any) -> None:
        self.cm, self.stats = cm, cm.stats

    def __call__(self, *args: Any) -> Any:
        time.sleep(0.005)
        return self.cm(*args)


def test_a_whole_model_slower_than_eager_stays_in_torch(cache_dir: str) -> None:
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU6()).eval(), torch.randn(2, 8)
    fast = compile_module(model, [x], cache_dir=cache_dir, keep_faster=True,
                          compile_segment=lambda g: compile_graph(g, cache_dir=cache_dir))
    slow = compile_module(model, [x], keep_faster=True, compile_segment=lambda g: _Slow(compile_graph(g, cache_dir=cache_dir)))
    assert isinstance(slow, PartitionedModel) and "slower compiled than in torch eager" in slow.report()
    with torch.no_grad():
        assert torch.equal(slow(x), model(x))
    if isinstance(fast, CompiledModel):  # measured faster (the usual case): the times are kept with it
        assert fast.stats["vs_eager"][0] <= fast.stats["vs_eager"][1]
    else:  # a loaded host can make the eager run look faster; then the choice is in the report
        assert "slower compiled than in torch eager" in fast.report()


def test_index_and_bool_outputs_keep_their_dtypes(cache_dir: str) -> None:
    cm = compile_module(_MaxIdx().eval(), [torch.randn(2, 3, 4)], cache_dir=cache_dir)
    assert isinstance(cm, CompiledModel)
    x = torch.randn(2, 3, 4)
    values, idx, pos = cm(x)
    ref = _MaxIdx()(x)
    assert idx.dtype == torch.int64 and pos.dtype == torch.bool
    assert torch.equal(values, ref[0]) and torch.equal(idx, ref[1]) and torch.equal(pos, ref[2])


class _MaxIdx(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        v, i = torch.max(x, dim=-1)
        return v, i, x > 0


class Gated(nn.Module):
    """Branchy (data-dependent control flow) as a submodule between two traced, compilable parts."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = nn.Linear(4, 4), Branchy(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.leaky_relu(self.gate(torch.relu(self.a(x)))))


def test_a_submodule_fx_cannot_trace_runs_in_torch_and_the_rest_compiles(cache_dir: str) -> None:
    torch.manual_seed(0)
    model, x = Gated().eval(), torch.randn(3, 4)
    pm = compile_module(model, [x], cache_dir=cache_dir)
    assert isinstance(pm, PartitionedModel) and [s.kind for s in pm.segments] == ["compiled", "torch", "compiled"]
    where = f"test_partition.py:{_line('if x.sum() > 0:')}"
    assert "module Branchy at 'gate' cannot be traced" in pm.report() and where in pm.report()
    for t in (x, x * 10, -x * 10):  # whichever branch torch takes at call time
        with torch.no_grad():
            torch.testing.assert_close(pm(t), model(t), rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedOpError, match=f"module Branchy at 'gate' cannot be traced.*{where}"):
        compile_module(model, [x], strict=True)
