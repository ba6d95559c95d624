"""Graph passes: each a named pure function Graph -> Graph, run in order by :func:`run_passes`.

Each pass runs under an OpenTelemetry span named after it, and its wall time is kept in
``graph.meta["pass_times"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace

from tessera.compiler.ir import Graph
from tessera.compiler.passes.fusion import fuse_operators
from tessera.compiler.passes.layout import transform_layout
from tessera.compiler.passes.memory import plan_memory
from tessera.compiler.passes.simplify import eliminate_dead_code, fold_batchnorm, fold_constants

Pass = Callable[[Graph], Graph]

PASSES: list[tuple[str, Pass]] = [
    ("fold_constants", fold_constants),
    ("fold_batchnorm", fold_batchnorm),
    ("transform_layout", transform_layout),
    ("fold_constants", fold_constants),  # packs the weights the layout pass re-laid
    ("eliminate_dead_code", eliminate_dead_code),
    ("fuse_operators", fuse_operators),
    ("plan_memory", plan_memory),
]

_tracer = trace.get_tracer("tessera.compiler")


def run_passes(graph: Graph, passes: list[tuple[str, Pass]] | None = None) -> Graph:
    times: list[tuple[str, float]] = []
    for name, fn in passes if passes is not None else PASSES:
        with _tracer.start_as_current_span(name) as span:
            t0 = time.perf_counter()
            graph = fn(graph)
            dt = time.perf_counter() - t0
            span.set_attribute("tessera.compiler.nodes", len(graph.nodes))
        times.append((name, dt))
    return graph.replace(meta={**graph.meta, "pass_times": times})


__all__ = ["PASSES", "run_passes", "fold_constants", "fold_batchnorm", "eliminate_dead_code", "transform_layout",
           "fuse_operators", "plan_memory"]
