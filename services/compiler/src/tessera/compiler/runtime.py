"""Running a compiled graph: one native call per inference over a planned arena.

:class:`CompiledModel` checks and converts the inputs (numpy arrays or torch tensors), binds
their pointers and the outputs' into the module's argument array, and calls ``run_graph``.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    #: the torch dtypes of the outputs (argmax's int64, a comparison's bool), computed as float32 and
    #: converted on the way out; None: all float32
    output_dtypes: list[str] | None = None

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
            if a.dtype.kind not in ("iu" if dt == "int64" else "fiu"):  # other floats and ints convert
                raise InvalidArgumentError(f"input {i} has dtype {a.dtype}, the model takes {dt}")
            out.append(np.ascontiguousarray(a, dtype=_DT[dt]))
        return out, torch_in

    def __call__(self, *args: Any) -> Any:
        ins, torch_in = self._inputs(args)
        outs = [np.empty(s, np.float32) for s in self.program.output_shapes]
        self.module.run(ins, outs)
        if self.output_dtypes:
            outs = [o if dt == "float32" else o.astype(dt) for o, dt in zip(outs, self.output_dtypes, strict=True)]
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


def pack_artifact(model: CompiledModel) -> bytes:
    """The bundle a replica stores: shared library, weights, and what is needed to call them."""
    p = model.program
    meta = {
        "n_inputs": p.n_inputs, "n_outputs": p.n_outputs, "arena_size": p.arena_size, "workspace_offset": p.workspace_offset,
        "input_shapes": [list(s) for s in p.input_shapes], "input_dtypes": list(p.input_dtypes),
        "output_shapes": [list(s) for s in p.output_shapes], "kernels": [[c.label, c.flops] for c in p.calls],
        "fused_graph": model.graph.format(), "library": Path(model.library).name,
    }
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), weights=p.weights,
             library=np.frombuffer(Path(model.library).read_bytes(), np.uint8),
             source=np.frombuffer(model.source.encode(), np.uint8))
    return buf.getvalue()


def load_artifact(bundle: bytes, cache_dir: str | None = None) -> CompiledModel:
    """A runnable model from a bundle (the library is written to the compile cache once)."""
    from tessera.compiler.backends.c import CModule, default_cache_dir
    from tessera.compiler.codegen import Call
    from tessera.compiler.ir import GraphBuilder
    from tessera.compiler.lower import LoweredFunc, Seq

    try:
        with np.load(io.BytesIO(bundle), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            weights = np.array(z["weights"], np.float32)
            lib_bytes = bytes(z["library"])
            source = bytes(z["source"]).decode()
    except Exception as e:  # a corrupt bundle
        raise InvalidArgumentError(f"not a compiler artifact bundle: {e}") from None
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / meta["library"]
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(lib_bytes)
        os.replace(tmp, path)
    calls = [Call(LoweredFunc(label, [], Seq([])), [], label, float(flops)) for label, flops in meta["kernels"]]
    program = Program(calls, meta["n_inputs"], meta["n_outputs"], meta["arena_size"], meta["workspace_offset"], weights,
                      [tuple(s) for s in meta["input_shapes"]], list(meta["input_dtypes"]),
                      [tuple(s) for s in meta["output_shapes"]])
    graph = GraphBuilder().build([])
    model = CompiledModel(CModule(str(path), program), program, graph, source, str(path), True)
    model.stats["fused_graph"] = meta["fused_graph"]
    return model
