"""Running a compiled graph: one native call per inference over a planned arena.

:class:`CompiledModel` checks and converts the inputs (numpy arrays or torch tensors), binds
their pointers and the outputs' into the module's argument array, and calls ``run_graph``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError
from tessera.compiler.backends import Module
from tessera.compiler.codegen import Program
from tessera.compiler.ir import Graph

_DT = {"float32": np.float32, "int64": np.int64}


@dataclass
class CompiledModel:
    module: Module
    program: Program
    graph: Graph  # after the passes: fused and planned
    source: str = ""
    library: str = ""
    cache_hit: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    def _inputs(self, args: Sequence[Any]) -> tuple[list[np.ndarray], bool]:
        p = self.program
        if len(args) != p.n_inputs:
            raise InvalidArgumentError(f"the model takes {p.n_inputs} inputs, got {len(args)}")
        out, torch_in = [], False
        for i, (a, shape, dt) in enumerate(zip(args, p.input_shapes, p.input_dtypes, strict=True)):
            if not isinstance(a, np.ndarray):
                if hasattr(a, "detach"):
                    torch_in = True
                    a = a.detach().cpu().numpy()
                else:
                    a = np.asarray(a)
            if tuple(a.shape) != tuple(shape):
                raise InvalidArgumentError(f"input {i} has shape {list(a.shape)}, the model was compiled for {list(shape)}")
            out.append(np.ascontiguousarray(a, dtype=_DT[dt]))
        return out, torch_in

    def __call__(self, *args: Any) -> Any:
        ins, torch_in = self._inputs(args)
        outs = [np.empty(s, np.float32) for s in self.program.output_shapes]
        self.module.run(ins, outs)
        if torch_in:
            import torch

            res: list[Any] = [torch.from_numpy(o) for o in outs]
        else:
            res = list(outs)
        return res[0] if len(res) == 1 else tuple(res)

    def run(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """The hot path: caller-owned, already contiguous arrays of the right dtype (no checks)."""
        self.module.run(inputs, outputs)

    def profile(self, *args: Any, repeat: int = 10) -> list[tuple[str, float, float]]:
        """Per kernel: (label, median seconds, GFLOP/s) over ``repeat`` runs."""
        ins, _ = self._inputs(args)
        outs = [np.empty(s, np.float32) for s in self.program.output_shapes]
        runs = np.array([self.module.profile(ins, outs) for _ in range(repeat)])
        med = np.median(runs, axis=0)
        return [(c.label, float(t), c.flops / t / 1e9 if t > 0 else 0.0) for c, t in zip(self.program.calls, med, strict=True)]

    def benchmark(self, *args: Any, repeat: int = 20, warmup: int = 3) -> float:
        """Median seconds of one whole-graph call."""
        ins, _ = self._inputs(args)
        outs = [np.empty(s, np.float32) for s in self.program.output_shapes]
        for _ in range(warmup):
            self.module.run(ins, outs)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.module.run(ins, outs)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))
