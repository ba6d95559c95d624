"""The compiler on a stack brought up by `tessera up`: the demo step (Compile and Run through the
service, found by the SDK from the run directory) and the `tessera compile` CLI."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_demo_step_compiles_on_the_service(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_RUN_DIR", str(stack.run_dir))
    spec = importlib.util.spec_from_file_location("compiler_demo", ROOT / "examples" / "compiler_demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows: list[str] = []
    demo.run(lambda _step, text: rows.append(text))
    assert len(rows) == 3, rows
    assert re.search(r"artifact [0-9a-f]{12} built by compiler", rows[0]) and "conv2d" in rows[0]
    errors = [float(m) for m in re.findall(r"(?:max \|tessera - torch\| =|max error) ([0-9.e+-]+)", " ".join(rows))]
    assert len(errors) == 2 and max(errors) < 1e-4, rows


def test_cli_prints_the_fused_graph_and_kernel_times(tmp_path: Path) -> None:
    model = tmp_path / "net.py"
    model.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 16, 3, padding=1)
                self.fc = nn.Linear(16, 4)

            def forward(self, x):
                return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
    """))
    r = subprocess.run([str(BIN / "tessera"), "compile", f"{model}:Net", "--shape", "2,3,16,16", "--repeat", "5",
                        "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert re.search(r"fused\[conv2d(_nchwc)?\+relu\]", r.stdout) and "GFLOP/s" in r.stdout
    assert re.search(r"max \|tessera - torch\| = ([0-9.]+e-0[5-9]|0\.00e\+00)", r.stdout), r.stdout
    bad = subprocess.run([str(BIN / "tessera"), "compile", f"{model}:Missing", "--shape", "1,3,8,8"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "Missing" in bad.stderr


def test_partitioned_models_through_the_service(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the stack's compiler: a MobileNet-style block (depthwise conv, BatchNorm, ReLU6) compiles
    whole; a model with an LSTM compiles with the LSTM left to torch; strict refuses that model."""
    import numpy as np
    import torch
    from torch import nn

    from tessera.common.errors import InvalidArgumentError
    from tessera.compiler.client import CompilerClient
    from tessera.compiler.partition import PartitionedModel
    from tessera.compiler.runtime import CompiledModel

    monkeypatch.setenv("TESSERA_RUN_DIR", str(stack.run_dir))
    torch.manual_seed(0)

    def bn(c: int) -> nn.BatchNorm2d:
        b = nn.BatchNorm2d(c)
        b.running_mean.uniform_(-0.2, 0.2)
        b.running_var.uniform_(0.5, 1.5)
        return b
    block = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), bn(16), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), bn(16), nn.ReLU6(),
                          nn.Conv2d(16, 8, 1, bias=False), bn(8)).eval()

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.lstm, self.out = nn.Linear(6, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o, _ = self.lstm(torch.relu(self.inp(x)))
            return self.out(o)
    tagger = Tagger().eval()
    x, t = torch.randn(1, 8, 12, 12), torch.randn(2, 5, 6)
    with CompilerClient(timeout=240) as client, torch.no_grad():
        cm = client.compile_model(block, [x])
        assert isinstance(cm, CompiledModel) and len(cm.stats["artifact_id"]) == 32
        np.testing.assert_allclose(cm(x).numpy(), block(x).numpy(), rtol=1e-4, atol=1e-5)
        pm = client.compile_model(tagger, [t])
        assert isinstance(pm, PartitionedModel) and [s.kind for s in pm.segments] == ["compiled", "torch", "compiled"]
        assert "LSTM" in pm.report()
        np.testing.assert_allclose(pm(t).numpy(), tagger(t).numpy(), rtol=1e-4, atol=1e-5)
        with pytest.raises(InvalidArgumentError, match=r"unsupported module LSTM .*line \d+"):
            client.compile_model(tagger, [t], strict=True)
