"""State machines of tasks, actors and jobs: which transitions are legal.

A transition outside these tables is refused with FAILED_PRECONDITION and
changes nothing. Re-entering PENDING from FINISHED or FAILED is how lineage
reconstruction and retries re-run a task.
"""

from __future__ import annotations

from typing import Any

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common.errors import FailedPreconditionError, InvalidArgumentError

T = pb.TaskState
TASK: dict[int, frozenset[int]] = {
    # Schedulers write states in batches: a task may finish before its RUNNING state was ever written.
    T.TASK_STATE_PENDING: frozenset({T.TASK_STATE_SCHEDULED, T.TASK_STATE_RUNNING, T.TASK_STATE_FINISHED,
                                     T.TASK_STATE_FAILED, T.TASK_STATE_CANCELLED}),
    T.TASK_STATE_SCHEDULED: frozenset({T.TASK_STATE_PENDING, T.TASK_STATE_RUNNING, T.TASK_STATE_FINISHED,
                                       T.TASK_STATE_FAILED, T.TASK_STATE_CANCELLED}),
    T.TASK_STATE_RUNNING: frozenset({T.TASK_STATE_PENDING, T.TASK_STATE_FINISHED, T.TASK_STATE_FAILED,
                                     T.TASK_STATE_CANCELLED}),
    T.TASK_STATE_FINISHED: frozenset({T.TASK_STATE_PENDING}),  # lineage reconstruction
    T.TASK_STATE_FAILED: frozenset({T.TASK_STATE_PENDING}),  # retry
    T.TASK_STATE_CANCELLED: frozenset(),
}

A = pb.ActorState
ACTOR: dict[int, frozenset[int]] = {
    A.ACTOR_STATE_PENDING: frozenset({A.ACTOR_STATE_ALIVE, A.ACTOR_STATE_DEAD}),
    A.ACTOR_STATE_ALIVE: frozenset({A.ACTOR_STATE_RESTARTING, A.ACTOR_STATE_DEAD}),
    A.ACTOR_STATE_RESTARTING: frozenset({A.ACTOR_STATE_ALIVE, A.ACTOR_STATE_DEAD}),
    A.ACTOR_STATE_DEAD: frozenset(),
}

J = pb.JobState
JOB: dict[int, frozenset[int]] = {
    J.JOB_STATE_RUNNING: frozenset({J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED, J.JOB_STATE_STOPPED}),
    J.JOB_STATE_SUCCEEDED: frozenset(),
    J.JOB_STATE_FAILED: frozenset(),
    J.JOB_STATE_STOPPED: frozenset(),
}


def check(table: dict[int, frozenset[int]], enum: Any, what: str, ident: str, old: int, new: int) -> None:
    """Raise unless ``old -> new`` is legal (``old == new`` is a no-op and always legal)."""
    if new not in table:
        raise InvalidArgumentError(f"{what} state must be one of {', '.join(enum.Name(s) for s in table)}, "
                                   f"got {enum.Name(new) if new in enum.values() else new}")
    if old != new and new not in table.get(old, frozenset()):
        raise FailedPreconditionError(f"{what} {ident}: illegal transition {enum.Name(old)} -> {enum.Name(new)}")
