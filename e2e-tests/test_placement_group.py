"""Placement groups and scheduling strategies on a two-node cluster (`tessera up --nodes 2`), in the manner
of Ray's test_placement_group."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import cloudpickle
import pytest
import stacks

import tessera
from tessera.exceptions import ActorDiedError, TaskUnschedulableError
from tessera.util import placement_group, placement_group_table, remove_placement_group
from tessera.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "pg", "--nodes", "2", TESSERA_NUM_CPUS="2") as c:
        with c.driving("e2e-placement"):
            yield c


@tessera.remote(num_cpus=1)
def where() -> str:
    return os.environ["TESSERA_NODE_ID"]


@tessera.remote(num_cpus=1)
class Where:
    def node(self) -> str:
        return os.environ["TESSERA_NODE_ID"]


def in_bundle(pg: tessera.util.PlacementGroup, i: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)


def free_cpus() -> float:
    return stacks.poll_until(lambda: tessera.available_resources().get("CPU", 0.0) or -1.0, timeout=5, what="cpus")


def test_pack_on_one_node_and_tasks_land_in_its_bundles(cluster: stacks.Cluster) -> None:
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert tessera.get(pg.ready(), timeout=30) == pg
    row = placement_group_table(pg)
    assert row["state"] == "CREATED" and len(set(row["bundles_to_node_id"].values())) == 1
    node = row["bundles_to_node_id"][0]
    out = cluster.cli("list", "placement-groups", "--json", "--filter", f"placement_group_id={pg.id.hex()}")
    assert out.returncode == 0, out.stderr
    (listed,) = json.loads(out.stdout)
    assert (listed["state"], listed["strategy"], listed["bundles"]) == ("CREATED", "PACK", [{"CPU": 1.0}] * 2)
    assert listed["bundles_to_node_id"] == {"0": node, "1": node}
    got = tessera.get([where.options(scheduling_strategy=in_bundle(pg, i)).remote() for i in (0, 1, -1)], timeout=60)
    assert got == [node] * 3
    remove_placement_group(pg)
    stacks.poll_until(lambda: not placement_group_table().get(pg.id.hex()), timeout=10, what="removal")


def test_strict_spread_across_two_nodes_actor_and_removal(cluster: stacks.Cluster) -> None:
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD", name="spread")
    assert pg.wait(30)
    nodes = placement_group_table(pg)["bundles_to_node_id"]
    assert set(nodes.values()) == set(cluster.node_ids())
    assert tessera.util.get_placement_group("spread") == pg
    a = Where.options(scheduling_strategy=in_bundle(pg, 1)).remote()
    assert tessera.get(a.node.remote(), timeout=60) == nodes[1]
    t = tessera.get(where.options(scheduling_strategy=in_bundle(pg, 0)).remote(), timeout=60)
    assert t == nodes[0]
    stacks.poll_until(lambda: tessera.available_resources().get("CPU", 0) == 2.0, timeout=10, what="2 cpus reserved")
    remove_placement_group(pg)
    stacks.poll_until(lambda: tessera.available_resources().get("CPU", 0) == 4.0, timeout=15, what="cpus freed")
    with pytest.raises(ActorDiedError):
        tessera.get(a.node.remote(), timeout=30)
    with pytest.raises(ValueError, match="Failed to look up placement group with name: spread"):
        tessera.util.get_placement_group("spread")


def test_infeasible_groups_fail_at_once(cluster: stacks.Cluster) -> None:
    big = placement_group([{"CPU": 1}, {"CPU": 100}])
    with pytest.raises(TaskUnschedulableError, match=r"bundle 1 .*CPU=100.*largest of its 2 node\(s\) has CPU=2"):
        big.wait(10)
    with pytest.raises(TaskUnschedulableError, match="CPU=100"):
        tessera.get(big.ready(), timeout=10)
    three = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    with pytest.raises(TaskUnschedulableError, match="STRICT_SPREAD needs 3 distinct nodes"):
        three.wait(10)


def test_bad_input(cluster: stacks.Cluster) -> None:
    with pytest.raises(ValueError, match="bundles must be a non-empty list"):
        placement_group([])
    with pytest.raises(ValueError, match="bundle 0 must be a non-empty dict"):
        placement_group([{}])
    with pytest.raises(ValueError, match="strategy must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD, got 'TIGHT'"):
        placement_group([{"CPU": 1}], strategy="TIGHT")
    pg = placement_group([{"CPU": 1}])
    with pytest.raises(ValueError, match="placement_group_bundle_index must be -1 .* got 1"):
        PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1)
    with pytest.raises(ValueError, match="scheduling_strategy must be"):
        where.options(scheduling_strategy="NEAR")
    remove_placement_group(pg)


def test_spread_and_node_affinity(cluster: stacks.Cluster) -> None:
    ids = cluster.node_ids()
    got = tessera.get([where.options(scheduling_strategy="SPREAD").remote() for _ in range(4)], timeout=60)
    assert set(got) == set(ids)
    for nid in ids:
        s = NodeAffinitySchedulingStrategy(nid, soft=False)
        assert tessera.get(where.options(scheduling_strategy=s).remote(), timeout=60) == nid
    gone = NodeAffinitySchedulingStrategy("ab" * 16, soft=False)
    with pytest.raises(TaskUnschedulableError, match="is not alive"):
        tessera.get(where.options(scheduling_strategy=gone).remote(), timeout=30)
    soft = NodeAffinitySchedulingStrategy("ab" * 16, soft=True)
    assert tessera.get(where.options(scheduling_strategy=soft).remote(), timeout=60) in ids


def test_group_survives_a_task_scheduler_restart(cluster: stacks.Cluster) -> None:
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    assert pg.wait(30)
    nodes = placement_group_table(pg)["bundles_to_node_id"]
    for name in ("task-scheduler", "task-scheduler-1"):
        pid = cluster.kill(name)
        cluster.wait_restarted(name, pid)
    assert placement_group_table(pg)["state"] == "CREATED"
    got = tessera.get([where.options(scheduling_strategy=in_bundle(pg, i)).remote() for i in (0, 1)], timeout=90)
    assert got == [nodes[0], nodes[1]]
    stacks.poll_until(lambda: tessera.available_resources().get("CPU", 0) == 2.0, timeout=15, what="re-reserved")
    remove_placement_group(pg)
    stacks.poll_until(lambda: tessera.available_resources().get("CPU", 0) == 4.0, timeout=15, what="cpus freed")


def test_a_group_goes_with_its_job_unless_detached(cluster: stacks.Cluster) -> None:
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import tessera
        from tessera.util import placement_group
        tessera.init(address="auto")
        for name, lifetime in (("pg-of-the-job", None), ("pg-detached", "detached")):
            assert placement_group([{"CPU": 1}], name=name, lifetime=lifetime).wait(30)
        tessera.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    def by_name() -> dict[str, str]:
        return {r["name"]: r["state"] for r in placement_group_table().values() if r["name"].startswith("pg-")}

    stacks.poll_until(lambda: by_name() == {"pg-detached": "CREATED"} or None, timeout=20,
                      what="the job's group removed when its driver shut down, the detached one kept")
    remove_placement_group(tessera.util.get_placement_group("pg-detached"))
    stacks.poll_until(lambda: by_name() == {} or None, timeout=20, what="the detached group removed")


def test_a_group_goes_when_its_driver_dies(cluster: stacks.Cluster) -> None:
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import os
        import tessera
        from tessera.util import placement_group
        tessera.init(address="auto")
        assert placement_group([{"CPU": 1}], name="pg-of-a-dead-driver").wait(30)
        os._exit(1)  # no shutdown: its node agent notices the session end and the process gone
    """)
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    stacks.poll_until(lambda: all(r["name"] != "pg-of-a-dead-driver" for r in placement_group_table().values()) or None,
                      timeout=30, what="the dead driver's group removed (its job FAILED)")
