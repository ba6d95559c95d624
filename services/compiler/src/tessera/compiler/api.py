"""``compile(module, example_inputs) -> CompiledModel``: the whole pipeline in one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace

from tessera.compiler import codegen
from tessera.compiler.backends import get_backend
from tessera.compiler.frontend import from_torch
from tessera.compiler.ir import Graph
from tessera.compiler.passes import run_passes
from tessera.compiler.runtime import CompiledModel

_tracer = trace.get_tracer("tessera.compiler")
Progress = Callable[[str], None]


def compile_graph(graph: Graph, *, target: str = "c", cache_dir: str | None = None,
                  progress: Progress | None = None, knobs: dict[int, dict[str, Any]] | None = None) -> CompiledModel:
    """Passes, kernels, code generation and build of an IR graph."""
    say = progress or (lambda _msg: None)
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    say("graph passes")
    g = run_passes(graph)
    stats["passes_s"] = time.perf_counter() - t0
    say(f"scheduling and lowering {sum(1 for n in g.nodes if n.op.value == 'fused')} kernels")
    with _tracer.start_as_current_span("lower"):
        t1 = time.perf_counter()
        program = codegen.build_program(g, knobs)
        stats["lower_s"] = time.perf_counter() - t1
    backend = get_backend(target)
    with _tracer.start_as_current_span("codegen"):
        source = backend.render(program)
    say(f"building with the {backend.name} backend")
    with _tracer.start_as_current_span("build") as span:
        t2 = time.perf_counter()
        lib, hit = backend.build(source, cache_dir)
        stats["build_s"] = time.perf_counter() - t2
        span.set_attribute("tessera.compiler.cache_hit", hit)
    stats["total_s"] = time.perf_counter() - t0
    module = backend.load(lib, program)
    return CompiledModel(module, program, g, source, lib, hit, stats)


def compile(module: Any, example_inputs: Sequence[Any], *, target: str = "c", cache_dir: str | None = None,
            progress: Progress | None = None) -> CompiledModel:  # noqa: A001
    """Compile a ``torch.nn.Module`` for the shapes of ``example_inputs``.

    Returns a :class:`CompiledModel`, callable on numpy arrays or torch tensors.
    """
    with _tracer.start_as_current_span("frontend"):
        graph = from_torch(module, example_inputs)
    return compile_graph(graph, target=target, cache_dir=cache_dir, progress=progress)
