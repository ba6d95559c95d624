"""Numerics of the ops added to the frontend's registry against torch (rtol 1e-4), one test each,
and the registry behind ``tessera compile --list-ops``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from test_ops import Fn, r
from torch import nn

from tessera.compiler.frontend import supported_ops

torch.manual_seed(0)

X4 = (2, 4, 5, 6)


def _bn1d() -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(6)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    return bn


CASES: dict[str, tuple[Any, list[tuple[int, ...]]]] = {
    "conv1d": (Fn(lambda m, x: m.mods[0](x), nn.Conv1d(4, 6, 3, stride=2, padding=1)), [(2, 4, 11)]),
    "conv1d_depthwise_dilated": (Fn(lambda m, x: F.conv1d(x, m.mods[0].weight, None, 1, 2, 2, 4), nn.Conv1d(4, 4, 3, groups=4)),
                                 [(2, 4, 9)]),
    "conv_transpose2d": (Fn(lambda m, x: m.mods[0](x), nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)),
                         [X4]),
    "conv_transpose2d_grouped": (Fn(lambda m, x: m.mods[0](x), nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)), [X4]),
    "batchnorm1d": (Fn(lambda m, x: m.mods[0](x), _bn1d()), [(3, 6, 5)]),
    "batchnorm1d_2d_input": (Fn(lambda m, x: m.mods[0](x), _bn1d()), [(3, 6)]),
    "leaky_relu": (Fn(lambda m, x: m.mods[0](x) + F.leaky_relu(x, 0.3), nn.LeakyReLU(0.1)), [X4]),
    "relu6": (Fn(lambda m, x: m.mods[0](x * 4) + F.relu6(x * 5), nn.ReLU6()), [X4]),
    "hardswish": (Fn(lambda m, x: m.mods[0](x * 4) + F.hardsigmoid(x * 4), nn.Hardswish()), [X4]),
    "clamp": (Fn(lambda m, x: torch.clamp(x, -0.5, 0.7) + x.clamp(min=0.1) + torch.clip(x, max=0.2)), [X4]),
    "pow": (Fn(lambda m, x, y: x.pow(2) + torch.pow(y.abs() + 0.5, 1.5) + x ** 3), [X4, X4]),
    "minimum_maximum": (Fn(lambda m, x, y: torch.minimum(x, y) + torch.max(x, y) + torch.min(x, y)), [X4, X4]),
    "max_min_reductions": (Fn(lambda m, x: (torch.max(x), torch.min(x, dim=1)[0], x.amax(dim=(2, 3), keepdim=True),
                                            torch.amin(x, dim=-1))), [X4]),
    "max_with_indices": (Fn(lambda m, x: torch.max(x, dim=2, keepdim=True)), [X4]),
    "argmax": (Fn(lambda m, x: (torch.argmax(x, dim=1), x.argmax(dim=-1, keepdim=True), torch.argmax(x),
                                torch.argmin(x, dim=0))), [X4]),
    "where_and_comparisons": (Fn(lambda m, x, y: torch.where(x > y, x, y * 0.5) + torch.where(x <= 0.1, 1.0, x)
                                 + (x != y).float() * 0 + torch.where(x.ge(0), x, 0.0)), [X4, X4]),
    "masked_fill": (Fn(lambda m, x: x.masked_fill(x < 0, -2.0)), [X4]),
    "interpolate_nearest": (Fn(lambda m, x: (F.interpolate(x, scale_factor=2), F.interpolate(x, size=(7, 4)),
                                             m.mods[0](x)), nn.Upsample(scale_factor=3)), [X4]),
    "interpolate_bilinear": (Fn(lambda m, x: (F.interpolate(x, scale_factor=2, mode="bilinear"),
                                              F.interpolate(x, size=(9, 3), mode="bilinear", align_corners=True),
                                              F.interpolate(x, size=(3, 11), mode="bilinear"))), [X4]),
    "group_norm": (Fn(lambda m, x: m.mods[0](x) + F.group_norm(x, 4), nn.GroupNorm(2, 4)), [X4]),
    "stack": (Fn(lambda m, x, y: (torch.stack([x, y, x * y], dim=1), torch.stack([y, x], dim=-1) * 2)), [(2, 3, 4), (2, 3, 4)]),
    "split_chunk_unbind": (Fn(lambda m, x: (*torch.split(x, [1, 3], dim=1), *x.chunk(3, dim=-1),
                                            *torch.unbind(x, dim=2), *x.split(2, dim=1))), [X4]),
    "sdpa": (Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v)), [(2, 2, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)]),
    "sdpa_causal_and_scale": (Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)),
                              [(1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)]),
    "sdpa_float_mask": (Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.tril(q[0, 0, :, :1]
                                                                                                              @ k[0, 0, :, :1].t()))),
                        [(1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_torch(check: Any, case: str) -> None:
    model, shapes = CASES[case]
    check(model, [r(*s) for s in shapes])


def test_gather(check: Any) -> None:
    idx = torch.randint(0, 5, (2, 4, 3, 6))
    check(Fn(lambda m, x, i: torch.gather(x, 2, i) + x.gather(2, i) * 0.5), [r(*X4), idx])


def test_list_ops_comes_from_the_registry() -> None:
    ops = supported_ops()
    for name in ("torch.nn.ReLU6", "torch.nn.functional.hardswish", "torch.nn.functional.scaled_dot_product_attention",
                 "torch.Tensor.chunk", "torch.gather", "torch.nn.ConvTranspose2d", "aten.conv2d.default", "torch.nn.Conv2d"):
        assert name in ops, name
    assert "torch.nn.LSTM" not in ops and len(ops) == len(set(ops))


class _ExportedOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gn = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> Any:
        y = F.relu6(self.conv(x)) + F.hardswish(x) + F.leaky_relu(x, 0.2) + torch.clamp(x, -0.5, 0.5) + x.pow(2)
        y = self.gn(y)
        up = F.interpolate(y, scale_factor=2, mode="bilinear") + F.interpolate(y, scale_factor=2)
        q = up.flatten(2).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        a, b = att.chunk(2, dim=-1)
        return torch.stack([a, b]).amax(0), torch.where(a > 0, a, b), att.argmax(-1)


def test_the_same_ops_through_torch_export(cache_dir: str) -> None:
    """The ATen ops of a torch.export program map onto the same handlers: the whole program compiles."""
    from tessera.compiler.api import compile as compile_module
    from tessera.compiler.runtime import CompiledModel

    torch.manual_seed(0)
    model, x = _ExportedOps().eval(), r(1, 4, 3, 3)
    cm = compile_module(torch.export.export(model, (x,)).module(), [x], cache_dir=cache_dir)
    assert isinstance(cm, CompiledModel)
    with torch.no_grad():
        ref = model(x)
    got = cm(x)
    for g, want in zip(got, ref, strict=True):
        assert g.dtype == want.dtype
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
