"""Policies on small hand-made clusters."""

from __future__ import annotations

import pytest

from tessera.gpu_scheduler.policy import (
    FifoPolicy,
    GandivaPolicy,
    JobView,
    LasPolicy,
    Node,
    make_policy,
    nodes_of,
    plan_actions,
)

ONE = [Node("a", 1)]
TWO_BY_FOUR = [Node("a", 4), Node("b", 4)]


def job(jid: str, gpus: int = 1, arrival: float = 0.0, **kw: object) -> JobView:
    return JobView(jid, gpus, arrival, **kw)  # type: ignore[arg-type]


def test_exclusive_when_capacity_allows() -> None:
    jobs = [job("j1", 2), job("j2", 2, 1.0), job("j3", 4, 2.0)]
    d = GandivaPolicy().schedule(0.0, TWO_BY_FOUR, jobs)
    assert set(d.placements) == {"j1", "j2", "j3"}
    used = [s for p in d.placements.values() for s in p]
    assert len(used) == len(set(used)) == 8  # no GPU shared
    assert all(len(nodes_of(p)) == 1 for p in d.placements.values())  # locality


def test_time_slicing_round_robin_on_one_slot() -> None:
    pol = GandivaPolicy(quantum=10.0, explore_packing=False)
    a, b = job("a", arrival=0.0), job("b", arrival=1.0)
    d = pol.schedule(1.0, ONE, [a, b])
    assert list(d.placements) == ["a"]
    a.slots, a.run_started = d.placements["a"], 1.0
    assert list(pol.schedule(5.0, ONE, [a, b]).placements) == ["a"]  # quantum not over
    d = pol.schedule(11.0, ONE, [a, b])
    assert list(d.placements) == ["b"]  # a had its slice: b's turn
    acts = plan_actions([a, b], d)
    assert [(x.kind, x.job_id) for x in acts] == [("suspend", "a"), ("start", "b")]
    a.slots, a.last_ran = (), 11.0
    b.slots, b.run_started = d.placements["b"], 11.0
    assert list(pol.schedule(21.0, ONE, [a, b]).placements) == ["a"]  # and back


def test_packing_follows_introspection() -> None:
    pol = GandivaPolicy(quantum=10.0)
    a, b = job("a", app="small"), job("b", arrival=1.0, app="small")
    a.slots, a.run_started = (("a", 0),), 0.0
    good = pol.schedule(1.0, ONE, [a, b], lambda x, y: 1.6)
    assert good.placements == {"a": (("a", 0),), "b": (("a", 0),)}
    bad = pol.schedule(1.0, ONE, [a, b], lambda x, y: 0.9)
    assert bad.placements == {"a": (("a", 0),)}  # measured slower together: unpacked, time-sliced instead
    unknown = pol.schedule(1.0, ONE, [a, b])
    assert set(unknown.placements) == {"a", "b"}  # unmeasured: packed to measure
    assert set(GandivaPolicy(explore_packing=False).schedule(1.0, ONE, [a, b]).placements) == {"a"}


def test_migration_defragments_for_locality() -> None:
    # a on a:0-1, b on b:0-1: a new 4-GPU job only fits spread; moving b next to a frees node b.
    a = job("a", 2, slots=(("a", 0), ("a", 1)))
    b = job("b", 2, 1.0, slots=(("b", 0), ("b", 1)))
    c = job("c", 4, 2.0)
    d = GandivaPolicy().schedule(3.0, TWO_BY_FOUR, [a, b, c])
    assert all(len(nodes_of(p)) == 1 for p in d.placements.values())
    kinds = {x.job_id: x.kind for x in plan_actions([a, b, c], d)}
    assert kinds["c"] == "start" and "migrate" in kinds.values()
    # FIFO and LAS never migrate: c is spread over both nodes
    f = FifoPolicy().schedule(3.0, TWO_BY_FOUR, [a, b, c])
    assert len(nodes_of(f.placements["c"])) == 2 and f.placements["a"] == a.slots


def test_admin_target_migrates() -> None:
    a = job("a", 1, slots=(("a", 0),), target="b")
    d = GandivaPolicy().schedule(1.0, TWO_BY_FOUR, [a])
    assert nodes_of(d.placements["a"]) == {"b"}
    assert plan_actions([a], d)[0].kind == "migrate"


def test_grow_when_idle_and_shrink_when_not() -> None:
    a = job("a", 2, elastic=True, slots=(("a", 0), ("a", 1)))
    d = GandivaPolicy().schedule(1.0, [Node("a", 4)], [a])
    assert len(d.placements["a"]) == 4
    a.slots = d.placements["a"]
    b = job("b", 2, 2.0)
    d = GandivaPolicy().schedule(2.0, [Node("a", 4)], [a, b])
    assert len(d.placements["a"]) == 2 and len(d.placements["b"]) == 2
    assert [x.kind for x in plan_actions([a, b], d)] == ["resize", "start"]


def test_early_feedback_deprioritizes_and_stops() -> None:
    pol = GandivaPolicy(quantum=10.0, explore_packing=False, stop_below=0.5)
    good = job("good", group="hp", accuracy=0.9, last_ran=0.0)
    poor = job("poor", group="hp", accuracy=0.7, last_ran=0.0)  # trails by > 10%
    awful = job("awful", group="hp", accuracy=0.3)
    other = job("x", arrival=5.0)
    d = pol.schedule(20.0, [Node("a", 2)], [good, poor, awful, other])
    assert "awful" in d.stop
    assert set(d.placements) == {"good", "x"}  # poor is behind an unrelated job that arrived later


def test_fifo_head_of_line_and_las_prefers_least_service() -> None:
    big, small = job("big", 4, 1.0), job("small", 1, 2.0)
    run = job("run", 1, 0.0, slots=(("a", 0),), run_started=0.0)
    d = FifoPolicy().schedule(3.0, [Node("a", 4)], [run, big, small])
    assert set(d.placements) == {"run"}  # small waits behind big
    old = job("old", 1, 0.0, slots=(("a", 0),), run_started=0.0, attained=100.0)
    new = job("new", 1, 50.0)
    assert set(LasPolicy(quantum=10.0).schedule(60.0, ONE, [old, new]).placements) == {"new"}
    assert set(LasPolicy(quantum=100.0).schedule(60.0, ONE, [old, new]).placements) == {"old"}


def test_jobs_larger_than_the_cluster_are_never_placed_and_bad_names_refused() -> None:
    assert GandivaPolicy().schedule(0.0, ONE, [job("huge", 2)]).placements == {}
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("srtf")
    with pytest.raises(ValueError, match="quantum"):
        make_policy("fifo", quantum=0)


def test_pair_gain_from_measured_minibatch_times() -> None:
    from tessera.gpu_scheduler.scheduler import pair_gain

    assert pair_gain(0.1, 0.125, 0.2, 0.25) == pytest.approx(1.6)  # each at 80% of its speed alone: a gain
    assert pair_gain(0.1, 0.25, 0.1, 0.25) == pytest.approx(0.8)  # each at 40%: slower together, unpack
    assert pair_gain(0.0, 0.1, 0.1, 0.1) is None  # never measured alone


def test_a_running_job_is_never_moved_just_to_be_packed() -> None:
    # a and b ran a slice each; c waits. The round robin lets c in and b out: b is never moved
    # onto a's GPU to be packed there (a migration just to pack).
    pol = GandivaPolicy(quantum=2.0)
    a = job("a", arrival=0.0, slots=(("x", 0),), run_started=10.0, last_ran=5.0)
    b = job("b", arrival=0.0, slots=(("y", 0),), run_started=0.0)
    c = job("c", arrival=1.0)
    nodes = [Node("x", 1), Node("y", 1)]
    d = pol.schedule(11.0, nodes, [a, b, c], lambda p, q: 0.0)  # no pair gains
    assert d.placements == {"a": (("x", 0),), "c": (("y", 0),)}
    assert [(x.kind, x.job_id) for x in plan_actions([a, b, c], d)] == [("suspend", "b"), ("start", "c")]
    d = pol.schedule(11.0, nodes, [a, b, c], lambda p, q: None)  # unmeasured pairs: explored where b already is
    assert d.placements["b"] == d.placements["c"] == (("y", 0),)
    assert [(x.kind, x.job_id) for x in plan_actions([a, b, c], d)] == [("start", "c")]


def test_a_suspended_job_waits_for_its_own_node() -> None:
    # s waits suspended on node x (its process is there); node y has a free GPU, x has none
    pol = GandivaPolicy(quantum=2.0, explore_packing=False)
    r = job("r", arrival=0.0, slots=(("x", 0),), run_started=10.0)
    s = job("s", arrival=0.0, last_ran=1.0, home="x")
    y = job("y", arrival=5.0, slots=(("y", 0),), run_started=0.0)
    d = pol.schedule(11.0, [Node("x", 1), Node("y", 1)], [r, s, y])
    assert "s" not in d.placements or nodes_of(d.placements["s"]) == {"x"}
    assert all(x.kind != "start" or nodes_of(x.slots) == {"x"} for x in plan_actions([r, s, y], d) if x.job_id == "s")


def test_grow_across_whole_free_nodes_keeps_locality() -> None:
    # an 8-GPU job on nodes a and b grows onto the free nodes c and d (4 x 4 GPUs), never onto a partial node
    nodes = [Node(n, 4) for n in "abcd"]
    big = job("big", 8, elastic=True, slots=tuple((n, g) for n in "ab" for g in range(4)))
    d = GandivaPolicy(grow_factor=2.0).schedule(1.0, nodes, [big])
    assert len(d.placements["big"]) == 16 and nodes_of(d.placements["big"]) == set("abcd")
    assert plan_actions([big], d)[0].kind == "migrate"  # over new nodes: a checkpoint-restart, not an in-place resize
    # with two GPUs of d taken, it grows to 14 GPUs: 15 would need a fifth node
    small = job("small", 2, slots=(("d", 0), ("d", 1)))
    d = GandivaPolicy(grow_factor=2.0).schedule(1.0, nodes, [big, small])
    assert len(d.placements["big"]) == 14 and nodes_of(d.placements["big"]) == set("abcd")
    assert d.placements["small"] == small.slots
    # a job on one node grows within it only, even when whole nodes are free
    one = job("one", 2, elastic=True, slots=(("a", 0), ("a", 1)))
    assert nodes_of(GandivaPolicy().schedule(1.0, nodes, [one]).placements["one"]) == {"a"}
    # a job that is not elastic never grows
    fixed = job("fixed", 2, slots=(("a", 0), ("a", 1)))
    assert GandivaPolicy().schedule(1.0, nodes, [fixed]).placements["fixed"] == fixed.slots
    with pytest.raises(ValueError, match="grow_factor"):
        GandivaPolicy(grow_factor=0.5)
