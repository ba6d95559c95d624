"""The placement policy of placement groups (pure) and the agent's bundle reservations."""

from __future__ import annotations

import pytest

from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common import bundles as bnd
from tessera.task_scheduler.agent import NodeAgent
from tessera.task_scheduler.placement import InfeasibleGroup, NodeView, place_bundles

A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


def node(nid: bytes, cpus: float, free: float | None = None, **extra: float) -> NodeView:
    total = {"CPU": cpus, **extra}
    return NodeView(nid, total=total, available={**total, "CPU": cpus if free is None else free})


def test_pack_uses_one_node_while_it_fits() -> None:
    assert place_bundles([{"CPU": 1}, {"CPU": 1}], "PACK", [node(A, 4), node(B, 4)]) in ([A, A], [B, B])


def test_pack_spills_over_when_one_node_is_not_enough() -> None:
    out = place_bundles([{"CPU": 2}, {"CPU": 2}], "PACK", [node(A, 2), node(B, 2)])
    assert out is not None and sorted(out) == [A, B]


def test_spread_and_strict_spread_use_distinct_nodes() -> None:
    nodes = [node(A, 4), node(B, 4)]
    for strategy in ("SPREAD", "STRICT_SPREAD"):
        out = place_bundles([{"CPU": 1}, {"CPU": 1}], strategy, nodes)
        assert out is not None and sorted(out) == [A, B]


def test_spread_doubles_up_but_strict_spread_is_infeasible() -> None:
    nodes = [node(A, 4), node(B, 4)]
    out = place_bundles([{"CPU": 1}] * 3, "SPREAD", nodes)
    assert out is not None and set(out) == {A, B}
    with pytest.raises(InfeasibleGroup, match="STRICT_SPREAD needs 3 distinct nodes.*2 node"):
        place_bundles([{"CPU": 1}] * 3, "STRICT_SPREAD", nodes)


def test_strict_spread_matches_bundles_to_the_nodes_that_can_hold_them() -> None:
    out = place_bundles([{"CPU": 1}, {"GPU": 1}], "STRICT_SPREAD", [node(A, 4, GPU=1), node(B, 4)])
    assert out == [B, A]


def test_strict_pack_needs_one_node_for_all() -> None:
    assert place_bundles([{"CPU": 2}, {"CPU": 2}], "STRICT_PACK", [node(A, 2), node(B, 4)]) == [B, B]
    with pytest.raises(InfeasibleGroup, match="STRICT_PACK.*CPU=5.*largest of its 2 node"):
        place_bundles([{"CPU": 2}, {"CPU": 3}], "STRICT_PACK", [node(A, 4), node(B, 4)])


def test_bundle_larger_than_any_node_names_the_resource_and_the_largest_node() -> None:
    with pytest.raises(InfeasibleGroup, match=r"bundle 1 .*CPU=8.*has CPU=4"):
        place_bundles([{"CPU": 1}, {"CPU": 8}], "PACK", [node(A, 2), node(B, 4)])


def test_busy_nodes_mean_wait_not_infeasible() -> None:
    assert place_bundles([{"CPU": 2}], "PACK", [node(A, 2, free=1), node(B, 2, free=0)]) is None
    assert place_bundles([{"CPU": 1}, {"CPU": 1}], "STRICT_SPREAD", [node(A, 2, free=1), node(B, 2, free=0)]) is None


class Ports:
    def __init__(self) -> None:
        self.results: list[pb.TaskResult] = []
        self.started = 0

    def execute(self, worker_id: bytes, spec: pb.TaskSpec) -> None: ...
    def interrupt(self, worker_id: bytes, task_ids: list[bytes], *, force: bool, recursive: bool) -> None: ...
    def start_worker(self, *, actor_id: bytes = b"", gpu_ids: object = (), runtime_env: str = "") -> bytes:
        self.started += 1
        return bytes([self.started]) * 8
    def stop_worker(self, worker_id: bytes) -> None: ...
    def deliver(self, owner_node: bytes, results: list[pb.TaskResult]) -> None:
        self.results.extend(results)
    def spill(self, specs: list[pb.TaskSpec]) -> None: ...
    def forward(self, node_id: bytes, specs: list[pb.TaskSpec]) -> None: ...
    def control(self, node_id: bytes, ctl: pb.Control) -> None: ...
    def locate_objects(self, object_ids: list[bytes]) -> None: ...
    def locate_actor(self, actor_id: bytes) -> None: ...
    def record_created(self, specs: list[pb.TaskSpec]) -> None: ...
    def actor_state(self, actor_id: bytes, state: str, cause: str = "", spec: pb.TaskSpec | None = None) -> None: ...


PG = "ab" * 16


def test_reservation_moves_resources_from_the_pool_to_the_bundle_and_back() -> None:
    agent = NodeAgent(A, {"CPU": 4}, Ports(), join_grace_s=0)  # type: ignore[arg-type]
    assert agent.prepare_bundles(PG, {0: {"CPU": 3}}, 0.0) == ""
    assert agent.available["CPU"] == 1 and "CPU_group_0_" + PG not in agent.total
    assert "has CPU=1 free" in agent.prepare_bundles("cd" * 16, {0: {"CPU": 2}}, 0.0)
    assert agent.commit_bundles(PG, {0: {"CPU": 3}}, 0.0) == ""
    assert agent.total[f"CPU_group_0_{PG}"] == 3 and agent.available[f"CPU_group_{PG}"] == 3
    assert agent.commit_bundles(PG, {0: {"CPU": 3}}, 0.0) == ""  # idempotent
    assert agent.available["CPU"] == 1
    agent.group_gone(PG, "removed")
    assert agent.available == {"CPU": 4} and agent.total == {"CPU": 4}


def test_uncommitted_bundles_expire_and_work_for_a_gone_group_fails() -> None:
    ports = Ports()
    agent = NodeAgent(A, {"CPU": 4}, ports, join_grace_s=0)  # type: ignore[arg-type]
    agent.prepare_bundles(PG, {0: {"CPU": 2}}, 0.0)
    agent.expire_prepared(5.0, 10.0)
    assert agent.available["CPU"] == 2
    agent.expire_prepared(11.0, 10.0)
    assert agent.available["CPU"] == 4
    spec = pb.TaskSpec(task_id=b"t" * 16, kind=pb.TASK_KIND_NORMAL, name="f", resources=bnd.renamed(PG, 0, {"CPU": 1}))
    agent.submit([spec], local=True)
    assert b"t" * 16 in agent.pg_waiting  # the group is pending: it waits
    agent.group_gone(PG, "its placement group was removed")
    assert not agent.pg_waiting
    assert ports.results and ports.results[0].error.kind == pb.ERROR_KIND_UNSCHEDULABLE
    assert "removed" in ports.results[0].error.message
