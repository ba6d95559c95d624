"""Tessera compiler: PyTorch models to fused, generated C kernels (TVM's design, no TVM).

    import tessera.compiler
    cm = tessera.compiler.compile(model, [x])   # torch.nn.Module + example inputs
    y = cm(x_numpy)                             # numpy arrays or torch tensors in, the same out

Ops the compiler does not cover run in torch (:mod:`partition`); ``strict=True`` refuses them instead.

The pipeline: :mod:`frontend` (torch.fx) -> :mod:`ir` -> :mod:`passes` -> per fused group,
:mod:`topi` tensor expressions scheduled by :mod:`templates` (:mod:`schedule` primitives) ->
:mod:`lower` loop IR -> :mod:`backends` (C + OpenMP, gcc) -> :mod:`runtime` (one native call).
The service (``tessera-compiler``) takes Compile/Run/GetArtifact over gRPC; :mod:`client` talks to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tessera.compiler.partition import PartitionedModel
    from tessera.compiler.runtime import CompiledModel


def compile(module: Any, example_inputs: Any, **kw: Any) -> CompiledModel | PartitionedModel:  # noqa: A001
    """Compile ``module`` for ``example_inputs``; see :func:`tessera.compiler.api.compile`."""
    from tessera.compiler.api import compile as _compile

    return _compile(module, example_inputs, **kw)


__all__ = ["compile"]
