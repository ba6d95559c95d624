"""The compile cache: a second compile of the same model reuses the shared library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from models import MLP

from tessera.compiler.api import compile as compile_module
from tessera.compiler.cache import graph_key
from tessera.compiler.frontend import from_torch
from tessera.compiler.runtime import load_artifact, pack_artifact


def test_second_compile_hits_the_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 32)
    first = compile_module(model, [x], cache_dir=str(tmp_path))
    assert not first.cache_hit
    libs = sorted(p.name for p in tmp_path.glob("*.so"))
    second = compile_module(model, [x], cache_dir=str(tmp_path))
    assert second.cache_hit and second.library == first.library
    assert sorted(p.name for p in tmp_path.glob("*.so")) == libs  # nothing new was built
    np.testing.assert_array_equal(first(x.numpy()), second(x.numpy()))


def test_other_weights_same_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b, x = MLP().eval(), MLP().eval(), torch.randn(3, 32)
    assert graph_key(from_torch(a, [x])) != graph_key(from_torch(b, [x]))  # the graph key covers the weights
    ca, cb = compile_module(a, [x], cache_dir=str(tmp_path)), compile_module(b, [x], cache_dir=str(tmp_path))
    assert cb.cache_hit  # weights live outside the generated code: one library serves both
    np.testing.assert_allclose(cb(x.numpy()), b(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(ca(x.numpy()), cb(x.numpy()))


def test_bundle_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 32)
    cm = compile_module(model, [x], cache_dir=str(tmp_path / "a"))
    loaded = load_artifact(pack_artifact(cm), str(tmp_path / "b"))
    np.testing.assert_array_equal(loaded(x.numpy()), cm(x.numpy()))
