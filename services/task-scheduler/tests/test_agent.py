"""The node agent's local scheduler and the placement rule, on their own (no processes, no network)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest

from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common.errors import InvalidArgumentError
from tessera.task_scheduler import resources as res
from tessera.task_scheduler.agent import NodeAgent
from tessera.task_scheduler.placement import NodeView, choose_node
from tessera.task_scheduler.server import validate

K, E = pb.TaskKind, pb.ErrorKind
HERE, THERE = b"\x01" * 16, b"\x02" * 16


class Recorder:
    """The agent's ports, recording what it asked for."""

    def __init__(self) -> None:
        self.executed: list[tuple[bytes, pb.TaskSpec]] = []
        self.started: list[bytes] = []
        self.stopped: list[bytes] = []
        self.delivered: list[tuple[bytes, pb.TaskResult]] = []
        self.spilled: list[pb.TaskSpec] = []
        self.forwarded: list[tuple[bytes, pb.TaskSpec]] = []
        self.located: list[bytes] = []
        self.actor_states: list[tuple[bytes, str]] = []
        self.created: list[pb.TaskSpec] = []
        self.gpu_workers: dict[bytes, tuple[str, ...]] = {}
        self.envs: dict[bytes, str] = {}  # the runtime_env each worker was started with
        self.interrupted: list[tuple[bytes, list[bytes], bool]] = []
        self.recorded_specs: list[pb.TaskSpec] = []

    def execute(self, worker_id: bytes, spec: pb.TaskSpec) -> None:
        self.executed.append((worker_id, spec))

    def interrupt(self, worker_id: bytes, task_ids: list[bytes], *, force: bool, recursive: bool) -> None:
        self.interrupted.append((worker_id, list(task_ids), force))
        if force:  # the wiring stops it (after a grace)
            self.stopped.append(worker_id)

    def start_worker(self, *, actor_id: bytes = b"", gpu_ids: Sequence[str] = (), runtime_env: str = "") -> bytes:
        wid = os.urandom(8)
        self.started.append(actor_id)
        self.gpu_workers[wid] = tuple(gpu_ids)
        self.envs[wid] = runtime_env
        return wid

    def stop_worker(self, worker_id: bytes) -> None:
        self.stopped.append(worker_id)

    def deliver(self, owner_node: bytes, results: list[pb.TaskResult]) -> None:
        self.delivered += [(owner_node, r) for r in results]

    def spill(self, specs: list[pb.TaskSpec]) -> None:
        self.spilled += specs

    def forward(self, node_id: bytes, specs: list[pb.TaskSpec]) -> None:
        self.forwarded += [(node_id, s) for s in specs]

    def control(self, node_id: bytes, ctl: pb.Control) -> None:
        pass

    def locate_objects(self, object_ids: list[bytes]) -> None:
        self.located += object_ids

    def locate_actor(self, actor_id: bytes) -> None:
        pass

    def record_created(self, specs: list[pb.TaskSpec]) -> None:
        self.created += specs

    def actor_state(self, actor_id: bytes, state: str, cause: str = "", spec: pb.TaskSpec | None = None) -> None:
        self.actor_states.append((actor_id, state))
        if spec is not None:
            self.recorded_specs.append(spec)


def task(cpus: float = 1, *, args: list[pb.Arg] | None = None, retries: int = 0, **res_: float) -> pb.TaskSpec:
    r = {"CPU": cpus, **res_} if cpus else dict(res_)
    return pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_NORMAL, function_id=b"f" * 32, name="t", num_returns=1,
                       resources=r, max_retries=retries, owner_node_id=HERE, owner="s1", args=args or [])


def done(spec: pb.TaskSpec, value: bytes = b"v") -> pb.TaskResult:
    return pb.TaskResult(task_id=spec.task_id, returns=[pb.ReturnValue(object_id=spec.task_id + b"\0\0\0\1", value=value)])


@pytest.fixture
def agent() -> tuple[NodeAgent, Recorder]:
    ports = Recorder()
    a = NodeAgent(HERE, {"CPU": 2.0}, ports, max_queue_per_cpu=2, unschedulable_after_s=5)
    for i in range(2):
        a.worker_ready(bytes([i]) * 8)
    return a, ports


def test_runs_tasks_on_idle_workers_within_resources(agent: Any) -> None:
    a, p = agent
    specs = [task() for _ in range(3)]
    a.submit(specs, local=True)
    assert [s.task_id for _, s in p.executed] == [s.task_id for s in specs[:2]]
    assert a.available["CPU"] == 0 and len(a.queue) == 1
    wid, first = p.executed[0]
    a.task_done(wid, done(first))
    assert p.delivered[0][1].task_id == first.task_id and p.delivered[0][0] == HERE
    assert p.executed[-1][1].task_id == specs[2].task_id  # the freed worker takes the queued task
    assert len(p.created) == 3  # lineage of every local task


def test_no_worker_is_started_for_queued_work_that_cannot_run_now(agent: Any) -> None:
    a, p = agent
    specs = [task() for _ in range(10)]
    a.submit(specs, local=True)
    assert len(p.executed) == 2 and len(a.queue) == 8
    assert p.started == []  # both CPUs are taken: a third worker would only sit idle
    wid, first = p.executed[0]
    a.task_done(wid, done(first))
    assert p.executed[-1][1].task_id == specs[2].task_id and p.started == []


def test_a_task_that_fits_behind_ones_that_do_not_gets_a_worker(agent: Any) -> None:
    a, p = agent
    a.submit([task(), task()], local=True)  # both workers busy, no CPU left
    big = [task(cpus=1) for _ in range(5)]
    small = task(cpus=0, custom=1)
    a.total["custom"] = a.available["custom"] = 1.0
    a.submit([*big, small], local=True)
    assert p.started == [b""]  # one worker, for the task that can run now (the CPU tasks cannot)
    a.worker_ready(b"w" * 8)
    assert p.executed[-1] == (b"w" * 8, small)
    assert [s.task_id for s, _ in a.queue] == [s.task_id for s in big]


def test_an_idle_worker_leaves_queued_work_that_does_not_fit_queued(agent: Any) -> None:
    a, p = agent
    a.worker_ready(b"w" * 8)  # a third worker, idle
    specs = [task() for _ in range(70)]
    a.submit(specs, local=True)
    assert len(p.executed) == 2 and len(a.queue) == 68 and len(a.idle) == 1  # no CPU for the third worker
    wid, first = p.executed[0]
    a.task_done(wid, done(first))
    # the task behind gets the worker idle for the shortest time (the one that just finished)
    assert p.executed[-1] == (wid, specs[2]) and len(a.queue) == 67


def test_task_waits_for_its_arguments_and_gets_them_inline(agent: Any) -> None:
    a, p = agent
    oid = os.urandom(20)
    t = task(args=[pb.Arg(object_id=oid)])
    a.submit([t], local=True)
    assert not p.executed and p.located == [oid] and t.task_id in a.waiting
    a.objects_available({oid: b"value-bytes"})
    (_, ran), = p.executed
    assert ran.args[0].value == b"value-bytes"


def test_spills_when_busy_and_a_peer_has_room(agent: Any) -> None:
    a, p = agent
    a.peer_load(NodeView(THERE, incarnation="x", total={"CPU": 4}, available={"CPU": 4}))
    a.submit([task() for _ in range(8)], local=True)
    # a batch fills the local queue (4 = 2 per CPU) and spills the rest; two of the queued run at once
    assert len(p.executed) == 2 and len(a.queue) == 2 and len(p.spilled) == 4
    # a task this node can never run goes to the global scheduler at once
    a.submit([task(cpus=4)], local=True)
    assert p.spilled[-1].resources["CPU"] == 4


def test_spilled_tasks_are_placed_again_when_their_node_restarts(agent: Any) -> None:
    a, p = agent
    a.peer_load(NodeView(THERE, incarnation="one", total={"CPU": 4}, available={"CPU": 4}))
    big = task(cpus=4)
    a.submit([big], local=True)
    a.assigned([big.task_id], THERE)
    a.peer_load(NodeView(THERE, incarnation="two", total={"CPU": 4}, available={"CPU": 4}))
    assert [s.task_id for s in p.spilled] == [big.task_id, big.task_id]


def test_tasks_placed_elsewhere_are_placed_again_after_a_bus_outage(agent: Any) -> None:
    a, p = agent
    a.peer_load(NodeView(THERE, incarnation="one", total={"CPU": 4}, available={"CPU": 4}))
    placed, unplaced = task(cpus=4), task(cpus=4)
    a.submit([placed, unplaced], local=True)
    a.assigned([placed.task_id], THERE)
    a.messages_lost()  # the task sent to THERE, or its result, may be gone: both go out again
    assert [s.task_id for s in p.spilled] == [placed.task_id, unplaced.task_id, placed.task_id, unplaced.task_id]
    assert a.spilled[placed.task_id][1] == b""  # waiting for the global scheduler to place it again
    a.remote_results([pb.TaskResult(task_id=placed.task_id)])  # the first result settles it
    assert placed.task_id not in a.spilled


def test_unschedulable_task_waits_then_fails(agent: Any) -> None:
    a, p = agent
    t = task(GPU=1)
    a.submit([t], local=True)
    assert not p.delivered and t.task_id in a.unschedulable
    a.tick(1e12, peer_timeout_s=3)
    (_, r), = p.delivered
    assert r.error.kind == E.ERROR_KIND_UNSCHEDULABLE and "GPU=1" in r.error.message


def test_unschedulable_task_moves_when_a_node_can_run_it(agent: Any) -> None:
    a, p = agent
    t = task(GPU=1)
    a.submit([t], local=True)
    a.peer_load(NodeView(THERE, incarnation="x", total={"CPU": 1, "GPU": 1}, available={"CPU": 1, "GPU": 1}))
    assert [s.task_id for s in p.spilled] == [t.task_id] and not a.unschedulable


def test_worker_death_retries_then_fails(agent: Any) -> None:
    a, p = agent
    t = task(retries=1)
    a.submit([t], local=True)
    wid, _ = p.executed[0]
    a.worker_died(wid, "killed by SIGKILL")
    retry = p.executed[-1][1]
    assert retry.task_id == t.task_id and retry.attempt == 1
    a.worker_died(p.executed[-1][0], "killed by SIGKILL")
    (_, r), = p.delivered
    assert r.error.kind == E.ERROR_KIND_WORKER_CRASHED and "no retries left" in r.error.message
    assert a.available["CPU"] == 2


def test_blocked_worker_lends_its_cpu(agent: Any) -> None:
    a, p = agent
    a.submit([task() for _ in range(3)], local=True)
    wid, _ = p.executed[0]
    a.worker_blocked(wid, +1)
    assert a.available["CPU"] == 1 and len(p.started) == 1  # a CPU is lent: a worker starts to use it
    a.worker_ready(b"n" * 8)
    assert a.available["CPU"] == 0 and len(p.executed) == 3  # the third ran on the lent CPU
    a.worker_blocked(wid, -1)
    assert a.available["CPU"] == -1  # briefly over: it gets the CPU back when one frees


def test_actor_calls_queue_in_order_and_fail_after_death(agent: Any) -> None:
    a, p = agent
    aid = os.urandom(16)
    create = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32, name="A",
                         num_returns=1, actor_id=aid, owner_node_id=HERE, owner="s1")
    calls = [pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, method="m", name="A.m", num_returns=1,
                         actor_id=aid, owner_node_id=HERE, owner="s1", seq=i) for i in range(3)]
    a.submit([create, *calls], local=True)
    assert p.started == [aid]
    awid = b"a" * 8
    a.worker_ready(awid, actor_id=aid)
    assert p.executed[-1][1].task_id == create.task_id
    a.task_done(awid, done(create))
    sent = [s for _, s in p.executed[-3:]]
    assert [s.seq for s in sent] == [0, 1, 2]  # all at once, in order: the worker orders them and limits how many run
    for spec in sent:
        a.task_done(awid, done(spec))
    assert [r.task_id for _, r in p.delivered[-3:]] == [c.task_id for c in calls]
    a.worker_died(awid, "exit code 1")  # max_restarts 0: dead
    late = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, method="m", actor_id=aid,
                       owner_node_id=HERE, owner="s1", num_returns=1)
    a.submit([late], local=True)
    assert p.delivered[-1][1].error.kind == E.ERROR_KIND_ACTOR_DIED
    assert (aid, "DEAD") in p.actor_states


def test_calls_waiting_for_an_actor_this_restarted_agent_no_longer_hosts_fail_at_once(agent: Any) -> None:
    a, p = agent
    aid = os.urandom(16)
    calls = [pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, method="m", name="A.m", num_returns=1,
                         actor_id=aid, owner_node_id=HERE, owner="s1", seq=i) for i in range(2)]
    a.submit(calls, local=True)  # resubmitted by their driver after this agent restarted
    assert not p.delivered
    a.actor_located(aid, a.node_id)  # its record still names this node
    assert [(r.task_id, r.error.kind) for _, r in p.delivered] == [(c.task_id, E.ERROR_KIND_ACTOR_DIED) for c in calls]
    assert "node agent restarted" in p.delivered[0][1].error.message


def test_the_cache_of_known_objects_is_bounded_by_count_too(agent: Any) -> None:
    from tessera.task_scheduler.agent import CACHE_BYTES, ENTRY_BYTES

    a, _ = agent
    for i in range(CACHE_BYTES // ENTRY_BYTES + 5000):  # results stored in the object store: no value kept
        a._remember(i.to_bytes(20, "big"), b"")
    assert len(a.objects) <= CACHE_BYTES // ENTRY_BYTES
    assert 0 < a.object_bytes <= CACHE_BYTES


def test_cancel_a_queued_task(agent: Any) -> None:
    a, p = agent
    specs = [task() for _ in range(3)]
    a.submit(specs, local=True)
    a.cancel([specs[2].task_id], force=False)
    assert p.delivered[-1][1].error.kind == E.ERROR_KIND_CANCELLED and not a.queue


def test_choose_node_prefers_short_queues_and_local_arguments() -> None:
    a = NodeView(b"a" * 16, total={"CPU": 2}, available={"CPU": 0}, queued=10)
    b = NodeView(b"b" * 16, total={"CPU": 2}, available={"CPU": 2}, queued=0)
    gpu = NodeView(b"g" * 16, total={"CPU": 1, "GPU": 1}, available={"CPU": 1, "GPU": 1})
    assert choose_node({"CPU": 1}, [a, b]) is b
    assert choose_node({"GPU": 1}, [a, b, gpu]) is gpu
    assert choose_node({"GPU": 2}, [a, b, gpu]) is None
    # a 1 GB argument held by a: moving it costs more than a's queue
    assert choose_node({"CPU": 1}, [a, b], arg_bytes={b"o" * 20: {a.node_id: 10**9}}) is a


def test_resource_requests_are_checked() -> None:
    assert res.check_request({"CPU": 1, "x": 0}) == {"CPU": 1.0}
    for bad in ({"CPU": -1}, {"GPU": 1.5}, {"": 1}, {"CPU": float("nan")}):
        with pytest.raises(InvalidArgumentError):
            res.check_request(bad)


def test_validate_refuses_malformed_specs() -> None:
    validate(task())
    with pytest.raises(InvalidArgumentError, match="task_id must be 16 bytes"):
        validate(pb.TaskSpec(task_id=b"x"))
    with pytest.raises(InvalidArgumentError, match="function_id"):
        validate(pb.TaskSpec(task_id=b"t" * 16, kind=K.TASK_KIND_NORMAL))
    with pytest.raises(InvalidArgumentError, match="neither a value nor an object id"):
        validate(task(args=[pb.Arg()]))
    with pytest.raises(InvalidArgumentError, match="names no method"):
        validate(pb.TaskSpec(task_id=b"t" * 16, kind=K.TASK_KIND_ACTOR_METHOD, actor_id=b"a" * 16))


def test_actors_die_with_their_owner_unless_detached(agent: Any) -> None:
    a, p = agent
    ids_ = []
    for detached in (False, True):
        aid = os.urandom(16)
        ids_.append(aid)
        a.submit([pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32, name="A",
                              num_returns=1, actor_id=aid, owner_node_id=HERE, owner="s1", detached=detached)], local=True)
    a.owner_gone("s2")
    assert all(a.actors[i].state != "DEAD" for i in ids_)
    a.owner_gone("s1")
    assert a.actors[ids_[0]].state == "DEAD" and a.actors[ids_[1]].state != "DEAD"
    assert (ids_[0], "DEAD") in p.actor_states


# ---------------------------------------------------------------------- GPUs and requests no node can meet


def test_gpu_slots_give_whole_gpus_and_pack_fractions_as_ray_does() -> None:
    g = res.GpuSlots(["0", "1", "2"])
    assert g.assign(0.5) == ("0",) and g.assign(0.5) == ("0",)  # two halves share one GPU
    assert g.assign(0.25) == ("1",) and g.assign(0.5) == ("1",)  # onto the GPU with the least room that fits
    assert g.assign(2) is None  # only GPU 2 is whole
    assert g.assign(1) == ("2",) and g.assign(0.5) is None
    g.release(("0",), 0.5)
    g.release(("0",), 0.5)
    assert g.assign(1) == ("0",)
    assert g.assign(0) == ()
    assert res.gpu_ids(2, "3,5,7") == ["3", "5"] and res.gpu_ids(2, None) == ["0", "1"] and res.gpu_ids(2, "4") == ["0", "1"]


def test_infeasible_message_names_the_resource_and_the_largest_node() -> None:
    msg = res.infeasible_message("f", {"CPU": 1, "TPU": 2}, [{"CPU": 4.0}, {"CPU": 8.0, "TPU": 1.0}])
    assert "TPU=2" in msg and "CPU=1, TPU=2" in msg and "CPU=8, TPU=1" in msg and "2 node(s)" in msg
    assert res.missing({"CPU": 6, "GPU": 1}, [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}]) == []  # each alone fits somewhere


def gpu_agent(gpus: int = 2, **kw: Any) -> tuple[NodeAgent, Recorder]:
    ports = Recorder()
    a = NodeAgent(HERE, {"CPU": 4.0, "GPU": float(gpus)}, ports, unschedulable_after_s=30, join_grace_s=0, **kw)
    a.worker_ready(b"\x09" * 8)
    return a, ports


def test_a_gpu_task_runs_in_a_worker_of_its_own_that_sees_its_gpus_and_then_exits() -> None:
    a, p = gpu_agent()
    halves = [task(1, GPU=0.5), task(1, GPU=0.5)]
    whole = task(1, GPU=1)
    a.submit([*halves, whole], local=True)
    started = list(p.gpu_workers.items())
    assert [ids for _, ids in started] == [("0",), ("0",), ("1",)] and not p.executed  # not on the pooled worker
    assert a.available["GPU"] == 0
    for wid, _ in started:
        a.worker_ready(wid)
    assert [s.task_id for _, s in p.executed] == [t.task_id for t in [*halves, whole]]
    wid, spec = p.executed[2]
    a.task_done(wid, done(spec))
    assert p.stopped == [wid] and a.available["GPU"] == 1 and wid not in a.idle
    a.worker_died(wid, "exit code 0")  # the exit that follows changes nothing
    again = task(1, GPU=1)
    a.submit([again], local=True)
    assert list(p.gpu_workers.values())[-1] == ("1",)


def test_a_gpu_actor_waits_for_gpu_ids_and_gives_them_back_when_it_dies() -> None:
    a, p = gpu_agent(gpus=1)
    first, second = (pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32,
                                 name="A", resources={"GPU": 1}, actor_id=os.urandom(16), owner_node_id=HERE,
                                 owner="s1") for _ in range(2))
    a.submit([first, second], local=True)
    assert list(p.gpu_workers.values()) == [("0",)] and p.started == [first.actor_id]  # the second waits
    a.kill_actor(first.actor_id)
    assert list(p.gpu_workers.values()) == [("0",), ("0",)] and p.started == [first.actor_id, second.actor_id]


def test_a_request_no_node_can_meet_fails_at_once_naming_it() -> None:
    a, p = gpu_agent()
    a.peer_load(NodeView(THERE, incarnation="x", total={"CPU": 8, "GPU": 1}, available={"CPU": 8, "GPU": 1}))
    t, custom = task(1000), task(1, TPU=1)
    a.submit([t, custom], local=True)
    (_, r1), (_, r2) = p.delivered
    assert r1.error.kind == r2.error.kind == E.ERROR_KIND_UNSCHEDULABLE and not a.unschedulable
    assert "CPU=1000" in r1.error.message and "CPU=8, GPU=1" in r1.error.message
    assert "TPU=1" in r2.error.message and "CPU=8, GPU=1" in r2.error.message  # none has TPU: the most CPUs


def test_a_request_waits_only_while_a_node_is_joining() -> None:
    a, p = gpu_agent()
    a.nodes_registered([HERE, THERE])  # THERE registered, not reporting yet
    t = task(1, TPU=1)
    a.submit([t], local=True)
    assert not p.delivered and t.task_id in a.unschedulable
    a.peer_load(NodeView(THERE, incarnation="x", total={"CPU": 2}, available={"CPU": 2}))  # it has none
    (_, r), = p.delivered
    assert r.error.kind == E.ERROR_KIND_UNSCHEDULABLE and "TPU=1" in r.error.message
    a.peer_load(NodeView(THERE, incarnation="x", total={"CPU": 2}, available={"CPU": 2}, leaving=True))
    a.nodes_registered([THERE])  # gone, though still listed: not joining
    a.submit([task(1, TPU=1)], local=True)
    assert len(p.delivered) == 2


def test_an_infeasible_actor_is_recorded_dead_and_its_calls_fail() -> None:
    a, p = gpu_agent()
    aid = os.urandom(16)
    create = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32, name="A",
                         resources={"GPU": 5}, actor_id=aid, owner_node_id=HERE, owner="s1")
    a.submit([create], local=True)
    call = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, name="A.f", method="f", actor_id=aid,
                       owner_node_id=HERE, owner="s1")
    a.submit([call], local=True)
    kinds = [r.error.kind for _, r in p.delivered]
    assert kinds == [E.ERROR_KIND_UNSCHEDULABLE, E.ERROR_KIND_ACTOR_DIED] and (aid, "DEAD") in p.actor_states
    assert "GPU=5" in p.delivered[1][1].error.message


def test_a_gpu_worker_whose_task_was_cancelled_before_it_started_serves_no_other_task() -> None:
    a, p = gpu_agent()
    t = task(1, GPU=1)
    a.submit([t], local=True)
    (wid, ids), = p.gpu_workers.items()
    a.cancel([t.task_id], force=True)
    assert p.delivered[-1][1].error.kind == E.ERROR_KIND_CANCELLED and a.available["GPU"] == 2
    a.worker_ready(wid)  # it said hello after all
    assert wid not in a.idle and p.stopped.count(wid) == 2
    a.worker_died(wid, "killed by SIGKILL")
    assert a.starting == 0 and wid not in a.workers


def _actor(a: Any, p: Any, *, max_restarts: int = 0) -> tuple[bytes, bytes]:
    aid = os.urandom(16)
    create = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32, name="A",
                         num_returns=1, actor_id=aid, owner_node_id=HERE, owner="s1", max_restarts=max_restarts)
    a.submit([create], local=True)
    awid = os.urandom(8)
    a.worker_ready(awid, actor_id=aid)
    a.task_done(awid, done(create))
    return aid, awid


def test_calls_in_flight_when_an_actor_restarts_are_retried_up_to_max_task_retries(agent: Any) -> None:
    a, p = agent
    aid, awid = _actor(a, p, max_restarts=1)
    retried = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, method="m", name="A.m", num_returns=1,
                          actor_id=aid, owner_node_id=HERE, owner="s1", seq=1, max_retries=1)
    lost = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, method="m", name="A.m", num_returns=1,
                       actor_id=aid, owner_node_id=HERE, owner="s1", seq=2)
    a.submit([retried, lost], local=True)
    assert [s.task_id for _, s in p.executed[-2:]] == [retried.task_id, lost.task_id]
    a.worker_died(awid, "killed by SIGKILL")
    assert [(r.task_id, r.error.kind) for _, r in p.delivered[-1:]] == [(lost.task_id, E.ERROR_KIND_ACTOR_DIED)]
    assert (aid, "RESTARTING") in p.actor_states
    again = os.urandom(8)
    a.worker_ready(again, actor_id=aid)
    a.task_done(again, done(a.actors[aid].spec))
    wid, spec = p.executed[-1]
    assert (wid, spec.task_id, spec.attempt) == (again, retried.task_id, 1)  # the restarted actor runs it again
    a.task_done(again, done(spec))
    assert p.delivered[-1][1].task_id == retried.task_id and not p.delivered[-1][1].HasField("error")


def test_cancel_drops_a_queued_actor_call_and_asks_the_worker_for_a_running_one(agent: Any) -> None:
    a, p = agent
    aid = os.urandom(16)
    call = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, method="m", name="A.m", num_returns=1,
                       actor_id=aid, owner_node_id=HERE, owner="s1")
    create = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32, name="A",
                         num_returns=1, actor_id=aid, owner_node_id=HERE, owner="s1")
    a.submit([create, call], local=True)  # queued: the actor is not up yet
    a.cancel([call.task_id], force=False)
    assert (p.delivered[-1][1].task_id, p.delivered[-1][1].error.kind) == (call.task_id, E.ERROR_KIND_CANCELLED)
    awid = os.urandom(8)
    a.worker_ready(awid, actor_id=aid)
    a.task_done(awid, done(create))
    running = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, method="m", name="A.m",
                          num_returns=1, actor_id=aid, owner_node_id=HERE, owner="s1")
    a.submit([running], local=True)
    a.cancel([running.task_id], force=False)
    assert p.interrupted[-1] == (awid, [running.task_id], False)


def test_cancel_of_a_running_task_interrupts_it_or_with_force_stops_its_worker(agent: Any) -> None:
    a, p = agent
    t1 = task()
    a.submit([t1], local=True)
    wid = a.running[t1.task_id]
    a.cancel([t1.task_id], force=False)
    assert p.interrupted[-1] == (wid, [t1.task_id], False) and not p.stopped
    a.task_done(wid, pb.TaskResult(task_id=t1.task_id, error=pb.TaskError(kind=E.ERROR_KIND_CANCELLED)))
    assert p.delivered[-1][1].error.kind == E.ERROR_KIND_CANCELLED
    t2 = task()
    a.submit([t2], local=True)
    wid = a.running[t2.task_id]
    a.cancel([t2.task_id], force=True)
    assert p.stopped == [wid] and p.interrupted[-1] == (wid, [t2.task_id], True)
    assert (p.delivered[-1][1].task_id, p.delivered[-1][1].error.kind) == (t2.task_id, E.ERROR_KIND_CANCELLED)
    a.worker_died(wid, "killed by SIGKILL")  # no retry: it was cancelled
    assert not a.queue and len(p.delivered) == 2
    a.cancel([t2.task_id], force=False)  # finished: nothing happens
    assert len(p.delivered) == 2


# ---------------------------------------------------------------------- runtime_env: a pool of workers per runtime_env

ENV_A, ENV_B = '{"env_vars":{"X":"a"}}', '{"env_vars":{"X":"b"}}'


def with_env(env: str) -> pb.TaskSpec:
    t = task()
    t.runtime_env = env
    return t


def test_a_runtime_env_runs_in_workers_of_its_own_and_they_are_reused(agent: Any) -> None:
    a, p = agent
    ta = with_env(ENV_A)
    a.submit([ta], local=True)
    assert not p.executed  # the default workers are idle, but they do not run a task of another runtime_env
    (wa,) = [w for w, e in p.envs.items() if e == ENV_A]
    a.submit([with_env(ENV_A)], local=True)
    assert len(p.envs) == 1  # one worker starts per runtime_env at a time
    a.worker_ready(wa)
    assert p.executed[0] == (wa, ta)
    a.task_done(wa, done(ta))
    assert p.executed[1][0] == wa  # the next task of the same runtime_env reuses it
    a.task_done(wa, done(p.executed[1][1]))
    plain = task()
    a.submit([plain], local=True)
    assert p.executed[2][0] != wa and p.executed[2][1].task_id == plain.task_id  # nor does it serve plain tasks
    tb = with_env(ENV_B)
    a.submit([tb], local=True)
    assert ENV_B in p.envs.values() and p.executed[-1][1].task_id != tb.task_id


def test_a_worker_of_a_runtime_env_that_dies_starting_is_started_again(agent: Any) -> None:
    a, p = agent
    a.submit([with_env(ENV_A)], local=True)
    (wa,) = p.envs
    a.worker_died(wa, "exit code 1")
    assert len([e for e in p.envs.values() if e == ENV_A]) == 2  # its task is still queued: another starts


def test_at_most_workers_an_idle_worker_of_another_runtime_env_makes_room() -> None:
    p = Recorder()
    a = NodeAgent(HERE, {"CPU": 2.0}, p, max_workers=1)
    a.worker_ready(b"\0" * 8)
    a.submit([with_env(ENV_A)], local=True)
    assert p.stopped == [b"\0" * 8] and list(p.envs.values()) == [ENV_A]
    a.worker_died(b"\0" * 8, "stopped")  # the retired worker's exit is expected: nothing was running in it
    assert not p.delivered


def test_an_actor_worker_is_started_with_its_runtime_env(agent: Any) -> None:
    a, p = agent
    spec = pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32, name="A",
                       num_returns=1, actor_id=os.urandom(16), owner_node_id=HERE, owner="s1", runtime_env=ENV_B)
    a.submit([spec], local=True)
    assert list(p.envs.values()) == [ENV_B]


@pytest.mark.parametrize(("text", "match"), [
    ("[1]", "not a JSON object"),
    ("{not json", "not a JSON object"),
    ('{"pip": ["x"]}', "unknown key\\(s\\) pip; supported: env_vars, py_modules, working_dir"),
    ('{"env_vars": {"A": 1}}', "env_vars must map names to strings"),
    ('{"working_dir": "/home/me/code"}', "working_dir must be pkg:<sha256 hex>"),
    ('{"py_modules": "pkg:x"}', "must be package uris"),
])
def test_a_spec_with_a_malformed_runtime_env_is_refused(text: str, match: str) -> None:
    t = task()
    t.runtime_env = text
    with pytest.raises(InvalidArgumentError, match=match):
        validate(t)


def test_a_resolved_runtime_env_is_accepted() -> None:
    t = with_env('{"env_vars":{"A":"1"},"py_modules":["pkg:' + "a" * 64 + '"],"working_dir":"pkg:' + "b" * 64 + '"}')
    validate(t)


def test_workers_of_a_runtime_env_idle_for_long_are_stopped() -> None:
    import time

    p = Recorder()
    a = NodeAgent(HERE, {"CPU": 2.0}, p, env_idle_s=60.0)
    a.worker_ready(b"\0" * 8)
    t = with_env(ENV_A)
    a.submit([t], local=True)
    (wa,) = p.envs
    a.worker_ready(wa)
    a.task_done(wa, done(t))
    now = time.monotonic()
    a.tick(now + 30, peer_timeout_s=10)
    assert not p.stopped
    a.tick(now + 61, peer_timeout_s=10)
    assert p.stopped == [wa] and not a.env_idle and b"\0" * 8 in a.idle  # the node's own worker stays
    a.worker_died(wa, "stopped")
    t2 = with_env(ENV_A)
    a.submit([t2], local=True)
    assert len([e for e in p.envs.values() if e == ENV_A]) == 2  # a later task of it starts a new one

# ---------------------------------------------------------------------- actors whose node dies


def actor_create(actor_id: bytes, *, restarts: int = 0, max_restarts: int = 1) -> pb.TaskSpec:
    return pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_CREATE, function_id=b"c" * 32, name="C.__init__",
                       num_returns=1, actor_id=actor_id, max_restarts=max_restarts, owner_node_id=THERE, owner="s9",
                       actor_restarts=restarts)


def actor_call(actor_id: bytes) -> pb.TaskSpec:
    return pb.TaskSpec(task_id=os.urandom(16), kind=K.TASK_KIND_ACTOR_METHOD, function_id=b"c" * 32, name="C.m",
                       num_returns=1, actor_id=actor_id, method="m", owner_node_id=HERE, owner="s1")


def test_calls_in_flight_to_a_lost_node_fail_and_later_calls_look_the_actor_up_again(agent: Any) -> None:
    a, p = agent
    a.peer_load(NodeView(THERE, incarnation="x", total={"CPU": 4}, available={"CPU": 4}))
    aid = os.urandom(16)
    a.actor_located(aid, THERE)
    call = actor_call(aid)
    a.submit([call], local=True)
    assert p.forwarded[-1] == (THERE, call)
    a.tick(a.peers[THERE].seen + 10, peer_timeout_s=3)  # THERE went silent
    (_, failed), = [(n, r) for n, r in p.delivered if r.task_id == call.task_id]
    assert failed.error.kind == E.ERROR_KIND_ACTOR_DIED and f"node {THERE.hex()} was lost" in failed.error.message
    located: list[bytes] = []
    p.locate_actor = located.append  # type: ignore[method-assign]
    a.submit([actor_call(aid)], local=True)
    assert located == [aid] and len(p.forwarded) == 1  # not sent to the lost node again


def test_an_actor_restarted_here_records_nothing_again_and_counts_its_restarts(agent: Any) -> None:
    a, p = agent
    first, again = os.urandom(16), os.urandom(16)
    for aid, restarts in ((first, 0), (again, 1)):
        spec = actor_create(aid, restarts=restarts)
        a.submit([spec], local=False)
        wid = os.urandom(8)
        a.worker_ready(wid, actor_id=aid)
        a.task_done(wid, done(spec))
    # the first start records the creation task (what is resubmitted if this node dies) and answers its owner;
    # a restart from elsewhere does neither
    assert [s.actor_id for s in p.recorded_specs] == [first]
    assert [r.task_id for _, r in p.delivered] == [a.actors[first].spec.task_id]
    assert a.actors[again].restarts == 1
    a.worker_died(a.actors[again].worker_id, "killed")  # max_restarts=1, used on the other node
    assert a.actors[again].state == "DEAD" and "no restarts left" in a.actors[again].cause
