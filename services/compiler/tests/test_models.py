"""Whole models against torch: a small MLP, a depthwise-separable block, a BERT layer, ResNet-18."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import MLP, BertLayer, DepthwiseSeparable, ElementwiseChain, ResNet18, randomize_bn


def test_mlp(check: Any) -> None:
    torch.manual_seed(0)
    check(MLP(), [torch.randn(5, 32)])


def test_depthwise_separable_block(check: Any) -> None:
    torch.manual_seed(0)
    check(randomize_bn(DepthwiseSeparable(32, 64)), [torch.randn(2, 32, 14, 14)])


def test_small_bert_layer(check: Any) -> None:
    torch.manual_seed(0)
    cm = check(BertLayer(hidden=64, heads=4, ff=128), [torch.randn(2, 16, 64)])
    labels = [c.label for c in cm.program.calls]
    assert "softmax" in labels and "layer_norm" in labels
    assert any(lbl.startswith("matmul+add+gelu") for lbl in labels)  # the FFN's activation runs in the GEMM epilogue


@pytest.mark.slow
def test_small_resnet(check: Any) -> None:
    torch.manual_seed(0)
    cm = check(randomize_bn(ResNet18(num_classes=10, width=16)), [torch.randn(1, 3, 32, 32)], rtol=1e-4, atol=2e-5)
    labels = [c.label for c in cm.program.calls]
    assert "batch_norm" not in " ".join(labels)  # folded into the convolutions
    assert any(lbl == "conv2d_nchwc+add+relu" for lbl in labels)  # residual add and relu fused into the conv


def test_elementwise_chain_is_one_native_kernel(check: Any) -> None:
    cm = check(ElementwiseChain(), [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)])
    assert len(cm.program.calls) == 1


@pytest.mark.slow
def test_resnet18_full(check: Any) -> None:
    torch.manual_seed(0)
    check(randomize_bn(ResNet18()), [torch.randn(1, 3, 224, 224)], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_bert_base_layer(check: Any) -> None:
    torch.manual_seed(0)
    check(BertLayer(), [torch.randn(1, 128, 768)], rtol=1e-4, atol=2e-5)
