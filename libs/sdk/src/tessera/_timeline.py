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
from tessera._state import chrome_trace, recorded_task_events

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
    known = {e[1] for e in events}
    events.extend(e for e in recorded_task_events(st.control_store(), job_id=core.job_id, limit=RECORDS_LIMIT)
                  if e[1] not in known)
    trace = chrome_trace(events)
    if filename is None:
        return trace
    with open(filename, "w") as f:
        json.dump(trace, f)
    return None
