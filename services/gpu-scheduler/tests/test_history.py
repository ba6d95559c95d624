"""A job's placement history: one entry per time slice on a node's GPUs, closed by what ended it."""

from __future__ import annotations

from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as pb
from tessera.gpu_scheduler.scheduler import HISTORY, record_placement

S = pb.JobState


def place(j: pb.JobInfo, node: str, slots: list[int], packed: str = "") -> None:
    j.state, j.node_id, j.packed_with = S.JOB_STATE_RUNNING, node, packed
    del j.gpu_slots[:]
    j.gpu_slots.extend(slots)


def test_placements_open_and_close_with_what_ended_them() -> None:
    j = pb.JobInfo(job_id="j", state=S.JOB_STATE_QUEUED)
    record_placement(j, 1.0)
    assert not j.history, "queued: nowhere"
    place(j, "a", [0])
    record_placement(j, 2.0)
    record_placement(j, 2.5)  # saved again, same place: nothing new
    place(j, "a", [0], packed="k")
    record_placement(j, 3.0)
    j.state = S.JOB_STATE_SUSPENDED
    del j.gpu_slots[:]
    record_placement(j, 4.0)
    place(j, "a", [0, 1])
    record_placement(j, 5.0)
    place(j, "a", [1])
    record_placement(j, 6.0)
    place(j, "b", [1])
    record_placement(j, 7.0)
    j.state = S.JOB_STATE_SUCCEEDED
    del j.gpu_slots[:]
    record_placement(j, 8.0)
    got = [(h.node_id, list(h.gpu_slots), h.start, h.end, h.packed_with, h.ended_by) for h in j.history]
    assert got == [("a", [0], 2.0, 3.0, "", "repacked"), ("a", [0], 3.0, 4.0, "k", "suspended"),
                   ("a", [0, 1], 5.0, 6.0, "", "resized"), ("a", [1], 6.0, 7.0, "", "migrated"),
                   ("b", [1], 7.0, 8.0, "", "succeeded")]


def test_the_history_keeps_the_last_placements() -> None:
    j = pb.JobInfo(job_id="j")
    for i in range(HISTORY + 10):
        place(j, "a" if i % 2 else "b", [0])
        record_placement(j, float(i))
    assert len(j.history) == HISTORY and j.history[-1].start == float(HISTORY + 9) and not j.history[-1].end
