"""Numerics of every covered op against torch (rtol 1e-4, atol 1e-5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

torch.manual_seed(0)


class _Fn(nn.Module):
    def __init__(self, f: Any, *mods: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.mods = nn.ModuleList(mods)


class _Fn1(_Fn):
    def forward(self, x: torch.Tensor) -> Any:
        return self.f(self, x)


class _Fn2(_Fn):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.f(self, x, y)


class _Fn3(_Fn):
    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> Any:
        return self.f(self, x, y, z)


def Fn(f: Any, *mods: nn.Module) -> _Fn:  # noqa: N802 - reads like a class
    """A module whose forward is ``f(self, *inputs)`` (torch.fx needs a fixed number of inputs)."""
    arity = f.__code__.co_argcount - 1
    return {1: _Fn1, 2: _Fn2, 3: _Fn3}[arity](f, *mods)


def r(*s: int) -> torch.Tensor:
    return torch.randn(*s)


CONV_CASES = {
    "plain": dict(cin=8, cout=12, k=3, stride=1, padding=1, dilation=1, groups=1),
    "stride2": dict(cin=8, cout=8, k=3, stride=2, padding=1, dilation=1, groups=1),
    "dilated": dict(cin=4, cout=6, k=3, stride=1, padding=2, dilation=2, groups=1),
    "grouped": dict(cin=8, cout=8, k=3, stride=1, padding=1, dilation=1, groups=4),
    "depthwise": dict(cin=16, cout=16, k=3, stride=2, padding=1, dilation=1, groups=16),
    "blocked_nchwc": dict(cin=32, cout=32, k=3, stride=1, padding=1, dilation=1, groups=1),
    "blocked_1x1_stride2": dict(cin=16, cout=32, k=1, stride=2, padding=0, dilation=1, groups=1),
    "7x7_nopad": dict(cin=3, cout=16, k=7, stride=2, padding=0, dilation=1, groups=1),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d(check: Any, case: str) -> None:
    c = CONV_CASES[case]
    conv = nn.Conv2d(c["cin"], c["cout"], c["k"], c["stride"], c["padding"], c["dilation"], c["groups"], bias=True)
    check(Fn(lambda m, x: m.mods[0](x), conv), [r(2, c["cin"], 15, 14)])


def test_conv_batchnorm_activations(check: Any) -> None:
    conv, bn = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    check(Fn(lambda m, x: F.silu(torch.sigmoid(m.mods[1](m.mods[0](x))) + torch.tanh(x)), conv, bn), [r(1, 16, 9, 9)])


def test_standalone_batchnorm_and_gelu(check: Any) -> None:
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2.0)
    check(Fn(lambda m, x: F.gelu(m.mods[0](x)) + F.gelu(x, approximate="tanh"), bn), [r(2, 4, 5, 5)])


def test_elementwise_broadcasting(check: Any) -> None:
    check(Fn(lambda m, x, y, z: (x * y - z) / (torch.exp(z) + 1.0) + 2.0 * x - torch.relu(-y)),
          [r(2, 3, 4, 5), r(3, 1, 5), r(5)])


def test_pooling(check: Any) -> None:
    mp, ap, aap = nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d((3, 2))
    check(Fn(lambda m, x: torch.cat([m.mods[0](x), m.mods[1](x)], 1), mp, ap), [r(2, 3, 8, 8)])
    check(Fn(lambda m, x: m.mods[0](x), aap), [r(2, 3, 7, 5)])
    check(Fn(lambda m, x: F.adaptive_avg_pool2d(x, 1) + F.max_pool2d(x, 7), nn.Identity()), [r(1, 32, 7, 7)])


def test_blocked_pool_and_residual(check: Any) -> None:
    c1, c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
    check(Fn(lambda m, x: F.max_pool2d(F.relu(m.mods[1](F.relu(m.mods[0](x))) + m.mods[0](x)), 2), c1, c2), [r(1, 16, 8, 8)])


def test_linear_matmul_bmm(check: Any) -> None:
    lin = nn.Linear(20, 33)
    check(Fn(lambda m, x: m.mods[0](x), lin), [r(5, 20)])
    check(Fn(lambda m, x: m.mods[0](x), lin), [r(2, 7, 20)])
    check(Fn(lambda m, a, b: torch.matmul(a, b), nn.Identity()), [r(2, 3, 9, 17), r(17, 70)])
    check(Fn(lambda m, a, b: torch.bmm(a, b), nn.Identity()), [r(4, 8, 16), r(4, 16, 64)])


def test_micro_kernels_and_packed_panels(check: Any) -> None:
    """Whole register tiles run as micro-kernels (cut tiles as plain loops); B is packed into panels for tall products."""
    cm = check(Fn(lambda m, x: torch.relu(m.mods[0](x)), nn.Conv2d(32, 32, 3, 1, 1)), [r(1, 32, 15, 14)])
    assert "ukr_" in cm.source
    cm = check(Fn(lambda m, x: m.mods[0](x), nn.Linear(96, 70)), [r(67, 96)])
    assert "ukr_" in cm.source and "bpack" not in cm.source  # a constant B: its panels are packed at build time
    cm = check(Fn(lambda m, a, b: torch.matmul(a, b), nn.Identity()), [r(2, 3, 80, 17), r(3, 17, 40)])  # broadcast batch
    assert "bpack" in cm.source
    check(Fn(lambda m, a, b: torch.bmm(a, b), nn.Identity()), [r(2, 64, 24), r(2, 24, 48)])


def test_softmax_layernorm(check: Any) -> None:
    ln = nn.LayerNorm(24)
    check(Fn(lambda m, x: torch.softmax(x, -1) + m.mods[0](x), ln), [r(3, 5, 24)])
    check(Fn(lambda m, x: F.softmax(x, dim=1), nn.Identity()), [r(2, 6, 5)])
    check(Fn(lambda m, x: F.layer_norm(x, (4, 6)), nn.Identity()), [r(3, 4, 6)])


def test_data_movement(check: Any) -> None:
    def f(m: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1).reshape(2, -1, 4)
        z = torch.transpose(y, 1, 2)[:, 1:3, ::2]
        return torch.cat([z, z * 2], dim=-1).flatten(1).unsqueeze(0)
    check(Fn(f, nn.Identity()), [r(2, 4, 3, 5)])


def test_embedding(check: Any) -> None:
    emb = nn.Embedding(50, 16)
    model = Fn(lambda m, i: m.mods[0](i) * 2.0, emb).eval()
    from tessera.compiler.api import compile as compile_module

    idx = torch.randint(0, 50, (3, 7))
    cm = compile_module(model, [idx])
    torch.testing.assert_close(torch.from_numpy(cm(idx.numpy())), model(idx).detach(), rtol=1e-4, atol=1e-5)


def test_mean_and_sizes(check: Any) -> None:
    check(Fn(lambda m, x: x.mean(dim=(2, 3)).view(x.size(0), -1) - x.mean(-1, keepdim=True).mean((1, 2, 3)).unsqueeze(1),
             nn.Identity()), [r(2, 3, 4, 5)])


def test_torch_tensors_in_and_out(cache_dir: str) -> None:
    from tessera.compiler import compile as compile_module

    model = Fn(lambda m, x: torch.relu(x) * 3.0, nn.Identity())
    cm = compile_module(model, [r(4, 4)], cache_dir=cache_dir)
    x = r(4, 4)
    y = cm(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, torch.relu(x) * 3.0)


def test_constant_weights_are_packed_once_at_build_time(check: Any) -> None:
    """A linear layer's weight panels are laid out once in the weights blob; calls read them and pack nothing."""
    from tessera.compiler.templates import pack_panels

    lin = nn.Linear(200, 90)
    cm = check(Fn(lambda m, x: torch.relu(m.mods[0](x)), lin), [r(70, 200)])
    (call,) = cm.program.calls
    ((pos, nr),) = call.func.prepacked.items()
    assert "bpack" not in cm.source and "_bpack" not in str(call.func.body)
    panels = pack_panels(lin.weight.detach().numpy().T.copy(), nr)
    assert panels.shape == (-(-90 // nr), 200, nr) and not panels[-1, :, 90 % nr or nr:].any()
    off = call.args[pos].index
    assert call.args[pos].kind == "const"
    np.testing.assert_array_equal(cm.program.weights[off:off + panels.size], panels.ravel())
    before = cm.program.weights.copy()
    for _ in range(2):  # the same packed buffer serves every call, unchanged
        x = r(70, 200)
        with torch.no_grad():
            np.testing.assert_allclose(cm(x.numpy()), torch.relu(lin(x)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(cm.program.weights, before)
    assert cm.module.weights is cm.program.weights  # type: ignore[attr-defined]
    # a B that is not a constant is still packed by the kernel, on every call
    cm = check(Fn(lambda m, a, b: a @ b, nn.Identity()), [r(70, 200), r(200, 90)])
    assert "bpack" in cm.source and not cm.program.calls[0].func.prepacked
