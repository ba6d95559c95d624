from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")


@pytest.fixture
def shm_path(tmp_path: Path) -> Iterator[Path]:
    """A unique arena path on tmpfs when there is one (else under tmp_path), removed afterwards."""
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else tmp_path
    path = base / f"tessera-test-arena-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)
