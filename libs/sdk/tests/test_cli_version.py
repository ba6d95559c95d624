"""``tessera --version`` names the installed package's version and needs no cluster."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path


def test_version_prints_the_installed_version() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "tessera"), "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tessera {version('tessera')}"
