"""What becomes of an actor whose node died (the global scheduler's rule, on its own)."""

from __future__ import annotations

import os

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.task_scheduler.scheduler import restart_plan

NODE = b"\x07" * 16


def actor(*, restarts: int, max_restarts: int, **spec_fields: object) -> cpb.ActorInfo:
    spec = pb.TaskSpec(task_id=os.urandom(16), kind=pb.TASK_KIND_ACTOR_CREATE, actor_id=b"a" * 16, **spec_fields)
    return cpb.ActorInfo(actor_id=b"a" * 16, node_id=NODE, restarts=restarts, max_restarts=max_restarts,
                         state=cpb.ACTOR_STATE_ALIVE, creation_spec=spec.SerializeToString())


def test_restarts_left_give_the_creation_task_without_its_soft_affinity() -> None:
    spec, cause = restart_plan(actor(restarts=0, max_restarts=1, affinity_node_id=NODE, affinity_soft=True,
                                     scheduling_strategy="SPREAD"))
    assert spec is not None and cause == ""
    assert (spec.affinity_node_id, spec.affinity_soft, spec.scheduling_strategy) == (b"", False, "")
    spec, _ = restart_plan(actor(restarts=50, max_restarts=-1))
    assert spec is not None


def test_no_restarts_left_or_pinned_to_the_node_is_dead_naming_the_node() -> None:
    for a, why in ((actor(restarts=0, max_restarts=0), "no restarts left (max_restarts=0, restarts=0)"),
                   (actor(restarts=1, max_restarts=1), "no restarts left (max_restarts=1, restarts=1)"),
                   (actor(restarts=0, max_restarts=1, affinity_node_id=NODE), "soft=False) pins it there")):
        spec, cause = restart_plan(a)
        assert spec is None and cause.startswith(f"its node {NODE.hex()} died") and why in cause
    bare = cpb.ActorInfo(actor_id=b"a" * 16, node_id=NODE, max_restarts=3)
    assert restart_plan(bare) == (None, f"its node {NODE.hex()} died before its creation task was recorded")
