"""``compile(module, example_inputs) -> CompiledModel``: the whole pipeline in one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace

from tessera.compiler import codegen
from tessera.compiler.backends import get_backend
from tessera.compiler.backends.c import default_cache_dir
from tessera.compiler.frontend import TraceBrokenError, UnsupportedOpError, trace_torch
from tessera.compiler.ir import Graph
from tessera.compiler.partition import PartitionedModel, median_time, partition
from tessera.compiler.passes import run_passes
from tessera.compiler.runtime import CompiledModel
from tessera.compiler.tune import FileTuningLog, TuningLog, logged_knobs, tune_graph

_tracer = trace.get_tracer("tessera.compiler")
Progress = Callable[[str], None]


def compile_graph(graph: Graph, *, target: str = "c", cache_dir: str | None = None,
                  progress: Progress | None = None, knobs: dict[int, dict[str, Any]] | None = None,
                  tuning_log: TuningLog | None = None, tune_trials: int = 0,
                  tune_progress: Callable[[str, int, int, float], None] | None = None) -> CompiledModel:
    """Passes, kernels, code generation and build of an IR graph (``knobs``: schedule knobs per fused node).

    Kernels use the best schedules in ``tuning_log`` (default: ``tuning.json`` in the compile cache)
    for their workloads; with ``tune_trials`` > 0 the tunable kernels are tuned first (that many
    measured trials in all) and the log is updated.
    """
    say = progress or (lambda _msg: None)
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    say("graph passes")
    g = run_passes(graph)
    stats["passes_s"] = time.perf_counter() - t0
    log = tuning_log or FileTuningLog(Path(cache_dir or default_cache_dir()) / "tuning.json")
    if knobs is None:
        if tune_trials > 0:
            say(f"tuning ({tune_trials} trials)")
            with _tracer.start_as_current_span("tune"):
                t3 = time.perf_counter()
                knobs = tune_graph(g, tune_trials, log, cache_dir=cache_dir, target=target, progress=tune_progress)
                stats["tune_s"] = time.perf_counter() - t3
        else:
            knobs = logged_knobs(g, log, target)
    stats["tuned_kernels"] = len(knobs)
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


def compile(module: Any, example_inputs: Sequence[Any], *, target: str = "c", cache_dir: str | None = None,  # noqa: A001
            progress: Progress | None = None, strict: bool = False, keep_faster: bool = False,
            compile_segment: Callable[[Graph], Any] | None = None, **kw: Any) -> CompiledModel | PartitionedModel:
    """Compile a ``torch.nn.Module`` for the shapes of ``example_inputs``.

    Returns a :class:`CompiledModel` when the whole model compiles, callable on numpy arrays or torch
    tensors. Otherwise the ops the compiler does not cover (and the whole model, when torch.fx cannot
    trace it) run in torch and the rest compiles: a :class:`PartitionedModel` (``.report()`` says what
    went where). ``strict=True`` refuses such a model instead, naming every unsupported op and its line.
    ``keep_faster=True`` times each compiled subgraph against torch eager on the example inputs and
    keeps torch for those that are slower compiled (the report records both times).
    ``compile_segment`` builds one IR subgraph (default: :func:`compile_graph` here).
    """
    import torch

    build = compile_segment or (lambda g: compile_graph(g, target=target, cache_dir=cache_dir, progress=progress, **kw))
    specs = [(tuple(x.shape), torch.as_tensor(x).dtype) for x in example_inputs]
    with _tracer.start_as_current_span("frontend"):
        try:
            traced = trace_torch(module, example_inputs)
        except TraceBrokenError as e:
            if strict:
                raise
            return PartitionedModel(module.eval(), None, [], specs, whole_reason=str(e))
    if traced.torch_nodes and strict:
        raise UnsupportedOpError(traced.unsupported_message())
    if not traced.torch_nodes:
        whole = build(traced.whole_graph())
        if isinstance(whole, CompiledModel) and any(d != "float32" for d in traced.output_dtypes()):
            whole.output_dtypes = traced.output_dtypes()
        if not keep_faster:
            return whole  # type: ignore[no-any-return]
        t_c, t_e = _against_eager(whole, module, example_inputs)
        whole.stats["vs_eager"] = (t_c, t_e)
        if t_c <= t_e:
            return whole  # type: ignore[no-any-return]
        return PartitionedModel(module.eval(), None, [], specs, whole_reason=(
            f"slower compiled than in torch eager ({t_c * 1e6:.0f} us against {t_e * 1e6:.0f} us): kept in torch"))
    segments = partition(traced)
    for seg in segments:
        if seg.kind == "compiled":
            assert seg.graph is not None
            seg.model = build(seg.graph)
    model = PartitionedModel(traced.gm, traced, segments, specs)
    if keep_faster:
        model.keep_faster(example_inputs)
    return model


def _against_eager(compiled: Any, module: Any, example_inputs: Sequence[Any], repeat: int = 10) -> tuple[float, float]:
    """Median seconds of the compiled model and of torch eager on the example inputs."""
    import torch

    ins = [torch.as_tensor(x) for x in example_inputs]
    with torch.no_grad():
        return median_time(lambda: compiled(*ins), repeat), median_time(lambda: module(*ins), repeat)
