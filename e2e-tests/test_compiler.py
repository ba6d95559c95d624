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
