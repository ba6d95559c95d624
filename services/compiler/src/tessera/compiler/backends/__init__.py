"""Code-generation backends, one module per target: ``c`` (CPU, gcc + OpenMP) now.

A backend renders a :class:`~tessera.compiler.codegen.Program` (kernels lowered to the loop
IR, plus the order and buffers of their calls) into source, builds it, and loads it as a
:class:`Module` that runs the whole graph in one call. A CUDA backend would implement the same
protocol (kernels as ``__global__`` functions, the arena in device memory, launches in
``run_graph``); none ships yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from tessera.compiler.codegen import Program


class Module(Protocol):
    """A built program: runs the graph over caller-owned arrays."""

    def run(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None: ...

    def profile(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> list[float]: ...


class Backend(Protocol):
    name: str

    def render(self, program: Program) -> str: ...

    def build(self, source: str, cache_dir: str | None = None) -> tuple[str, bool]:
        """Compile ``source``; returns the artifact path and whether it came from the cache."""
        ...

    def load(self, path: str, program: Program) -> Module: ...


def get_backend(target: str) -> Backend:
    """The backend for ``target`` (``c`` / ``cpu`` / ``llvm``-style names map to C)."""
    if target in ("c", "cpu", "x86", "x86_64", ""):
        from tessera.compiler.backends.c import CBackend

        return CBackend()
    from tessera.common.errors import InvalidArgumentError

    raise InvalidArgumentError(f"unknown target {target!r}: this build has the 'c' (CPU) backend only")
