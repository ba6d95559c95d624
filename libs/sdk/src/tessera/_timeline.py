"""``tessera.timeline``: the tasks of this job as a Chrome trace (Ray's function).

Each task's worker stamps when it started and ended on the result it sends back, with
the node and worker it ran on; the owner keeps the last of these (``_core.TIMELINE_EVENTS``).
The trace opens in chrome://tracing or Perfetto: one process per node, one thread per
worker, one complete ("X") event per task.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tessera import _api


def timeline(filename: str | None = None) -> list[dict[str, Any]] | None:
    """The finished tasks this driver submitted, as Chrome trace events; written to ``filename`` as JSON
    (then None is returned) or returned as a list."""
    if filename is not None and not isinstance(filename, str | os.PathLike):
        raise TypeError(f"filename must be a path, got {type(filename).__name__}")
    core = _api.state().core
    with core.cond:
        events = list(core.events)
    trace = [{
        "name": name,
        "cat": "task",
        "ph": "X",
        "pid": f"node {node_id.hex()}",
        "tid": f"worker {worker_id.hex()}",
        "ts": start_us,
        "dur": end_us - start_us,
        "args": {"task_id": task_id.hex(), "failed": failed},
    } for name, task_id, node_id, worker_id, start_us, end_us, failed in sorted(events, key=lambda e: e[4])]
    if filename is None:
        return trace
    with open(filename, "w") as f:
        json.dump(trace, f)
    return None
