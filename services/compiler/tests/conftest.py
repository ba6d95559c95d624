"""Fixtures of the compiler tests: one compile cache per session, and helpers to compare with torch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # models.py


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("compile-cache"))


@pytest.fixture
def check(cache_dir: str) -> Callable[..., Any]:
    """Compile ``model`` for ``inputs`` and assert the result matches torch (rtol 1e-4, atol 1e-5)."""
    import torch

    from tessera.compiler.api import compile as compile_module

    def run(model: Any, inputs: Sequence[Any], rtol: float = 1e-4, atol: float = 1e-5) -> Any:
        model = model.eval()
        cm = compile_module(model, inputs, cache_dir=cache_dir)
        with torch.no_grad():
            ref = model(*inputs)
        got = cm(*[x.numpy() for x in inputs])
        refs = ref if isinstance(ref, tuple) else (ref,)
        gots = got if isinstance(got, tuple) else (got,)
        for g, r in zip(gots, refs, strict=True):
            np.testing.assert_allclose(g, r.numpy(), rtol=rtol, atol=atol)
        return cm
    return run
