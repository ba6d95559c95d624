"""What a node agent decodes from NATS, fuzzed: task batches, results, control messages and peers' load reports.

Anyone connected to NATS can publish on ``tessera.sched.*``, so each message is decoded and
checked before the agent acts on it. Whatever arrives, the agent raises nothing and its books
stay sound: resources never go negative or above the node's total, and once every task it
accepted has run, all of them are free again (a task asking for -1 CPU once made a node
richer with every run).
"""

from __future__ import annotations

import math
import os

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.task_scheduler.agent import NodeAgent
from tessera.task_scheduler.server import remote_tasks, view_of

from .test_agent import HERE, Recorder  # noqa: TID252 - the agent's recording ports

K = pb.TaskKind
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

ids = st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=24), st.just(HERE))
amounts = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 1e308]))
resources = st.dictionaries(st.sampled_from(["CPU", "GPU", "", "x" * 200, "custom"]), amounts, max_size=3)
args = st.one_of(st.builds(pb.Arg, value=st.binary(max_size=8)), st.builds(pb.Arg, object_id=st.binary(max_size=24)),
                 st.just(pb.Arg()))
specs = st.builds(
    pb.TaskSpec, task_id=ids, job_id=st.binary(max_size=6), kind=st.integers(-1, 5), function_id=st.binary(max_size=33),
    name=st.text(max_size=8), args=st.lists(args, max_size=2), num_returns=st.integers(0, 3), resources=resources,
    max_retries=st.integers(-2, 3), actor_id=st.binary(max_size=17), method=st.text(max_size=4),
    owner_node_id=ids, owner=st.text(max_size=4), attempt=st.integers(0, 3))


def as_bytes(messages: st.SearchStrategy[pb.TaskBatch] | st.SearchStrategy[pb.NodeLoad]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), messages.map(lambda m: m.SerializeToString()))


task_batches = as_bytes(st.builds(pb.TaskBatch, tasks=st.lists(specs, max_size=4), from_node_id=ids))
loads = as_bytes(st.builds(pb.NodeLoad, node_id=ids, incarnation=st.text(max_size=4), resources_total=resources,
                           resources_available=resources, queued=st.integers(0, 2**32 - 1), leaving=st.booleans()))


def decode(cls: type, data: bytes) -> object | None:
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


def sound(agent: NodeAgent) -> None:
    for k, v in agent.available.items():
        assert math.isfinite(v), (k, v)
        assert -1e-6 <= v <= agent.total.get(k, 0.0) + 1e-6, f"{k}: {v} available of {agent.total.get(k, 0.0)}"


def run_everything(agent: NodeAgent, rec: Recorder) -> None:
    """Workers come up for every start the agent asked for, and every task they get finishes."""
    for _ in range(50):
        started, rec.started = rec.started, []
        for actor in started:
            agent.worker_ready(os.urandom(8), actor_id=actor)
        executed, rec.executed = rec.executed, []
        for wid, spec in executed:
            agent.task_done(wid, pb.TaskResult(task_id=spec.task_id))
            sound(agent)
        if not started and not executed:
            return


@SETTINGS
@given(data=st.lists(task_batches, min_size=1, max_size=3))
@example(data=[pb.TaskBatch(tasks=[pb.TaskSpec(task_id=b"t" * 16, kind=K.TASK_KIND_NORMAL, function_id=b"f" * 32,
                                               resources={"CPU": -1.0})]).SerializeToString()])
@example(data=[pb.TaskBatch(tasks=[pb.TaskSpec(task_id=b"t" * 16, kind=K.TASK_KIND_NORMAL, function_id=b"f" * 32,
                                               resources={"CPU": float("nan")})]).SerializeToString()])
def test_tasks_from_nats_keep_the_books_sound(data: list[bytes]) -> None:
    rec = Recorder()
    agent = NodeAgent(HERE, {"CPU": 2.0, "GPU": 1.0}, rec)
    for d in data:
        batch = decode(pb.TaskBatch, d)
        if batch is None:
            continue
        agent.submit(remote_tasks(batch), local=False)  # type: ignore[arg-type]
        sound(agent)
        run_everything(agent, rec)
        sound(agent)
    run_everything(agent, rec)
    if not agent.queue and not agent.running:
        assert agent.available == agent.total


@SETTINGS
@given(data=st.lists(loads, min_size=1, max_size=3))
@example(data=[pb.NodeLoad(node_id=b"n" * 16, resources_total={"CPU": float("inf")},
                           resources_available={"CPU": -3.0}).SerializeToString()])
@example(data=[pb.NodeLoad(node_id=b"", resources_total={"CPU": 4.0}).SerializeToString()])
def test_load_reports_from_nats_are_checked(data: list[bytes]) -> None:
    agent = NodeAgent(HERE, {"CPU": 2.0}, Recorder())
    for d in data:
        load = decode(pb.NodeLoad, d)
        if load is None:
            continue
        view = view_of(load)  # type: ignore[arg-type]
        if view is not None:
            agent.peer_load(view)
    for nid, peer in agent.peers.items():
        assert len(nid) == 16
        for amount in [*peer.total.values(), *peer.available.values()]:
            assert math.isfinite(amount) and amount >= 0, peer


@SETTINGS
@given(data=st.binary(max_size=300), force=st.booleans())
def test_results_and_control_from_nats_raise_nothing(data: bytes, force: bool) -> None:
    agent = NodeAgent(HERE, {"CPU": 2.0}, Recorder())
    results = decode(pb.ResultBatch, data)
    if results is not None:
        agent.remote_results(results.results)  # type: ignore[attr-defined]
    ctl = decode(pb.Control, data)
    if ctl is not None:
        agent.cancel(ctl.cancel, force=ctl.force or force)  # type: ignore[attr-defined]
        for aid in ctl.kill_actor:  # type: ignore[attr-defined]
            agent.kill_actor(aid)
    assigned = decode(pb.TaskBatch, data)
    if assigned is not None:
        agent.assigned([t.task_id for t in assigned.tasks], assigned.from_node_id)  # type: ignore[attr-defined]
    sound(agent)
