"""``tessera.timeline``: the tasks of this job as a Chrome trace (Ray's function).

Each task's worker stamps when it started and ended on the result it sends back, with
the node and worker it ran on. The driver keeps these for the tasks it submitted (the
last ``_core.TIMELINE_EVENTS``, actor calls included); the control store's records of
the job's tasks carry them too, which adds the tasks that tasks submitted, for as long
as their records are kept (while their results are alive, and a few seconds more). The
trace opens in chrome://tracing or Perfetto: one process per node, one thread per
worker, one complete ("X") event per task.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tessera import _api
from tessera._core import TaskEvent
from tessera.api.control_store.v1 import control_store_pb2 as cpb

#: Most task records of the job read from the control store.
RECORDS_LIMIT = 10_000


def timeline(filename: str | None = None) -> list[dict[str, Any]] | None:
    """The finished tasks this driver submitted, as Chrome trace events; written to ``filename`` as JSON
    (then None is returned) or returned as a list."""
    if filename is not None and not isinstance(filename, str | os.PathLike):
        raise TypeError(f"filename must be a path, got {type(filename).__name__}")
    st = _api.state()
    core = st.core
    with core.cond:
        events = list(core.events)
    events.extend(_recorded(st.control_store(), core.job_id, {e[1] for e in events}))
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


def _recorded(cs: Any, job_id: bytes, known: set[bytes]) -> list[TaskEvent]:
    """The job's finished tasks the control store records with their times, less those in ``known``."""
    resp = cs.ListTasks(cpb.ListTasksRequest(job_id=job_id, limit=RECORDS_LIMIT), timeout=30.0)
    out: list[TaskEvent] = []
    for r in resp.tasks:
        s = r.spec
        if s.end_us and s.task_id not in known:
            out.append((s.function_name, s.task_id, r.node_id, s.worker_id, s.start_us, s.end_us,
                        r.state == cpb.TASK_STATE_FAILED))
    return out
