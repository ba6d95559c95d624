"""`make demo`'s story as one trace: examples/demo.py against `tessera up --nodes 2 --gpus-per-node 1`,
exporting to the test's OTLP receiver; the trace's service edges are asserted.

The default test runs ``demo.py --small`` (the same story and trace, fewer mini-batches and
pipelines); ``-m slow`` runs the full demo.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stacks import BIN, Cluster, running

pytest.importorskip("torch")
pytest.importorskip("sklearn")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
SDK = "tessera-demo"
Span = Any  # conftest.Span: service, name, trace_id, span_id, parent_span_id

# (caller, callee, how the callee's span is named): the hops of the story, each one a parent -> child span pair
EDGES = [
    (SDK, "control-store", "/tessera.control_store.v1.ControlStoreService/"),
    (SDK, "task-scheduler", "/tessera.task_scheduler.v1.TaskSchedulerService/Session"),
    (SDK, "task-scheduler", "task "),  # a task runs in its submitter's trace (TaskSpec.traceparent)
    ("task-scheduler", "object-store", "/tessera.object_store.v1.ObjectStoreService/"),  # arguments and results
    (SDK, "object-store", "/tessera.object_store.v1.ObjectStoreService/"),
    (SDK, "gpu-scheduler", "/tessera.gpu_scheduler.v1.GpuSchedulerService/SubmitJob"),
    ("gpu-scheduler", "gpu-agent", "process tessera.gpu.agent."),  # over NATS: request to the node agent
    ("gpu-agent", "gpu-job", "gpu job train"),  # TRACEPARENT in the job's environment
    ("gpu-job", "object-store", "/tessera.object_store.v1.ObjectStoreService/"),  # reads the dataset by id
    ("gpu-agent", "object-store", "/tessera.object_store.v1.ObjectStoreService/"),  # checkpoints into the store
    (SDK, "compiler", "/tessera.compiler.v1.CompilerService/Compile"),
    ("compiler", "compiler", "process tessera.compiler."),  # a compile job taken from JetStream
    ("compiler", "object-store", "/tessera.object_store.v1.ObjectStoreService/"),  # the artifact
    (SDK, "serving", "/tessera.serving.v1.ServingService/Register"),
    (SDK, "serving", "/tessera.serving.v1.ServingService/Predict"),
]


@pytest.fixture(scope="module")
def gpu_stack(tmp_path_factory: pytest.TempPathFactory, otlp: Any) -> Iterator[Cluster]:
    with running(tmp_path_factory, "run", "--nodes", "2", "--gpus-per-node", "1", timeout=180,
                 otlp_endpoint=otlp.endpoint, TESSERA_GPU_SCHEDULER_QUANTUM_S="2") as c:
        yield c


def run_demo(stack: Cluster, *args: str) -> tuple[str, str]:
    """Run the demo; returns its output and the trace id it printed."""
    out = subprocess.run([str(BIN / "python"), str(DEMO), *args], env=stack.env, capture_output=True, text=True,
                         timeout=480)
    assert out.returncode == 0, f"the demo failed:\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
    m = re.search(r"trace id: ([0-9a-f]{32})", out.stdout)
    assert m, out.stdout
    return out.stdout, m.group(1)


def edges(spans: list[Span]) -> set[tuple[str, str, str]]:
    by_id = {s.span_id: s for s in spans}
    return {(by_id[s.parent_span_id].service, s.service, s.name) for s in spans if s.parent_span_id in by_id}


def has_edge(found: set[tuple[str, str, str]], caller: str, callee: str, name: str) -> bool:
    return any(a == caller and b == callee and n.startswith(name) for a, b, n in found)


def check_story(otlp: Any, poll_until: Callable[..., Any], stdout: str, trace_id: str) -> None:
    for step in ("cluster", "rollouts into a dataset", "train, time-sliced", "compile the policy",
                 "serve it beside text pipelines"):
        assert re.search(rf"^\s+{re.escape(step)}\s+\S+\s+\d+\.\ds\s+\S", stdout, re.M), f"no summary row {step!r}"
    suspensions = re.search(r"(\d+) suspensions; best", stdout)
    assert suspensions and int(suspensions.group(1)) > 0, "three jobs on two slots: some were time-sliced"
    assert re.search(r"agree with the compiled model (\d+)/\1", stdout), "serving and the compiled model disagree"

    def complete() -> list[Span] | None:
        spans = otlp.trace(trace_id)
        found = edges(spans)
        return spans if all(has_edge(found, *e) for e in EDGES) else None

    try:
        spans = poll_until(complete, timeout=30, interval=0.5, what=f"every edge in trace {trace_id}")
    except AssertionError:
        found = edges(otlp.trace(trace_id))
        missing = [e for e in EDGES if not has_edge(found, *e)]
        pairs = sorted({(a, b) for a, b, _ in found if a != b})
        raise AssertionError(f"edges missing from the trace: {missing}\nservice edges found: {pairs}") from None

    [root] = [s for s in spans if not s.parent_span_id]
    assert root.service == SDK and root.name.startswith("tessera demo")
    ids = {s.span_id for s in spans}
    orphans = [(s.service, s.name) for s in spans if s.parent_span_id and s.parent_span_id not in ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans[:10]}"
    assert {s.service for s in spans} >= {SDK, "control-store", "object-store", "task-scheduler", "compiler",
                                          "gpu-scheduler", "gpu-agent", "gpu-job", "serving"}
    assert not any("grpc.health" in s.name for s in otlp.spans), "health checks are not traced"


@pytest.mark.long
def test_demo_story_is_one_connected_trace(gpu_stack: Cluster, otlp: Any, poll: Callable[..., Any]) -> None:
    stdout, trace_id = run_demo(gpu_stack, "--small")
    check_story(otlp, poll, stdout, trace_id)


@pytest.mark.slow
def test_full_demo_is_one_connected_trace(gpu_stack: Cluster, otlp: Any, poll: Callable[..., Any]) -> None:
    stdout, trace_id = run_demo(gpu_stack)
    check_story(otlp, poll, stdout, trace_id)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
