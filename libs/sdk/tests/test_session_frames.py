"""How a driver's session batches the frames queued for its sender (no processes)."""

from __future__ import annotations

import queue

from tessera._api import _coalesced, _coalesced_counted
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb


def _submit(name: str) -> pb.ClientFrame:
    return pb.ClientFrame(submit=[pb.TaskSpec(name=name)])


def test_queued_submissions_travel_as_one_frame_in_order_and_each_batch_says_how_many_frames_it_took() -> None:
    box: queue.SimpleQueue[pb.ClientFrame | None] = queue.SimpleQueue()
    for frame in [_submit("a"), _submit("b"), pb.ClientFrame(cancel=[b"t" * 16]), _submit("c"), _submit("d"),
                  _submit("e"), None]:
        box.put(frame)
    out = list(_coalesced_counted(box))
    assert [([s.name for s in f.submit], list(f.cancel), n) for f, n in out] == [
        (["a", "b"], [], 2), ([], [b"t" * 16], 1), (["c", "d", "e"], [], 3)]
    assert sum(n for _, n in out) == 6  # every frame taken is counted once: the sender's count of unwritten drops to 0


def test_a_lone_frame_and_the_end_of_the_queue() -> None:
    box: queue.SimpleQueue[pb.ClientFrame | None] = queue.SimpleQueue()
    box.put(pb.ClientFrame(kill_actor=[b"k" * 16]))
    box.put(_submit("x"))
    box.put(None)
    box.put(_submit("after the end"))
    assert [(list(f.kill_actor), [s.name for s in f.submit]) for f in _coalesced(box)] == [
        ([b"k" * 16], []), ([], ["x"])]
