"""The live scheduler's reconciliation: an agent it judged dead that comes back with its job still running;
migrations (the target started ahead, then handed the checkpoint); GPUs held by a job process until it exits."""

from __future__ import annotations

import json
from typing import Any

from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as pb
from tessera.gpu_scheduler.policy import make_policy
from tessera.gpu_scheduler.scheduler import GpuScheduler

S = pb.JobState


class DictKV:
    def __init__(self) -> None:
        self.d: dict[str, bytes] = {}

    async def put(self, key: str, value: bytes) -> None:
        self.d[key] = value

    async def get(self, key: str) -> bytes | None:
        return self.d.get(key)

    async def keys(self) -> list[str]:
        return list(self.d)

    async def delete(self, key: str) -> None:
        self.d.pop(key, None)


class Cluster:
    """A scheduler, with agents that are plain reports in their KV and commands recorded as sent."""

    def __init__(self, policy: str = "fifo") -> None:
        self.now = 1000.0
        self.jobs, self.agents = DictKV(), DictKV()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.reports: dict[str, dict[str, Any]] = {}
        self.sched = GpuScheduler(self.jobs, self.agents, self.send, self.emit, make_policy(policy),
                                  agent_timeout_s=3.0, clock=lambda: self.now)

    async def send(self, node: str, cmd: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((node, cmd))
        if cmd["op"] == "start":
            old = self.reports[node]["jobs"].get(cmd["job_id"])
            if old is not None and old["state"] != "exited":  # as the real agent refuses
                raise RuntimeError(f"job {cmd['job_id']} already runs on node {node}")
            self.reports[node]["jobs"][cmd["job_id"]] = {
                "state": "waiting" if cmd.get("await_checkpoint") else "running", "rc": None, "step": 0, "minibatch_s": 0.0, "metrics": {}, "ckpt_oid": "",
                "ckpt_step": 0, "slots": cmd["slots"], "suspend_s": 0.0, "resume_s": 0.0, "message": ""}
        if cmd["op"] == "restore":
            rep = self.reports[node]["jobs"].get(cmd["job_id"])
            if rep is None or rep["state"] != "waiting":  # as the real agent refuses
                raise RuntimeError(f"job {cmd['job_id']} is not waiting for a checkpoint on node {node}")
            rep["state"] = "running"
        return {"ok": True, "incarnation": "inc-" + node}

    async def emit(self, _state: str, _job: pb.JobInfo) -> None:
        return None

    async def beat(self, node: str) -> None:
        r = self.reports.setdefault(node, {"node_id": node, "gpus": 1, "incarnation": "inc-" + node, "seq": 0,
                                           "jobs": {}})
        r["seq"] += 1
        await self.agents.put(node, json.dumps(r).encode())


async def test_a_requeued_job_still_running_on_a_slow_agent_is_adopted_not_started_twice() -> None:
    c = Cluster()
    await c.beat("a")
    await c.beat("b")
    await c.sched.tick()
    j = await c.sched.submit(pb.JobSpec(entry_point="m:f", gpus=1))
    await c.sched.tick()
    node = c.sched.get(j.job_id).node_id
    other = "b" if node == "a" else "a"
    assert c.sched.get(j.job_id).state == S.JOB_STATE_RUNNING
    c.reports[node]["jobs"][j.job_id]["step"] = 40
    await c.beat(node)
    await c.sched.tick()
    # the agent is silent longer than the timeout (a loaded host), while the other beats: the job is requeued
    # and, with the other node's GPU free, placed there at once
    c.now += 5.0
    await c.beat(other)
    starts_before = sum(1 for _, cmd in c.sent if cmd["op"] == "start")
    await c.sched.tick()
    info = c.sched.get(j.job_id)
    assert info.requeues == 1
    if sum(1 for _, cmd in c.sent if cmd["op"] == "start") > starts_before:
        # placed on the other node: the copy still running on the slow one is stopped when it reports again
        assert info.node_id == other
        c.reports[node]["jobs"][j.job_id]["step"] = 55
        await c.beat(node)
        await c.sched.tick()
        assert (node, {"op": "kill", "job_id": j.job_id}) in c.sent
        assert c.sched.get(j.job_id).node_id == other


async def test_a_requeued_job_is_adopted_where_it_still_runs_when_no_other_gpu_is_free() -> None:
    c = Cluster()
    await c.beat("a")
    await c.sched.tick()
    j = await c.sched.submit(pb.JobSpec(entry_point="m:f", gpus=1))
    await c.sched.tick()
    assert c.sched.get(j.job_id).node_id == "a"
    c.reports["a"]["jobs"][j.job_id].update(step=30, ckpt_step=20, ckpt_oid="ab" * 20)
    await c.beat("a")
    await c.sched.tick()
    c.now += 5.0  # silent too long: requeued from step 20; its only node is not alive, so it waits
    await c.sched.tick()
    assert c.sched.get(j.job_id).state == S.JOB_STATE_QUEUED
    c.reports["a"]["jobs"][j.job_id]["step"] = 60
    await c.beat("a")  # back, still running the job
    await c.sched.tick()
    info = c.sched.get(j.job_id)
    assert info.state == S.JOB_STATE_RUNNING and info.node_id == "a" and info.step == 60
    assert [cmd for _, cmd in c.sent if cmd["op"] == "start"] == [c.sent[0][1]]  # started once, never again
    assert not [cmd for _, cmd in c.sent if cmd["op"] == "kill"]


async def test_a_bad_time_limit_is_refused_and_changes_nothing() -> None:
    import pytest

    from tessera.common.errors import InvalidArgumentError

    c = Cluster()
    await c.beat("a")
    await c.sched.tick()
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InvalidArgumentError, match="time_limit_s"):
            await c.sched.submit(pb.JobSpec(entry_point="m:f", gpus=1, time_limit_s=bad))
    assert not c.jobs.d and not c.sched.jobs


async def test_an_oversized_name_or_spec_is_refused_and_changes_nothing() -> None:
    import pytest

    from tessera.common.errors import InvalidArgumentError
    from tessera.gpu_scheduler.scheduler import MAX_NAME, MAX_SPEC_BYTES

    c = Cluster()
    await c.beat("a")
    await c.sched.tick()
    with pytest.raises(InvalidArgumentError, match=f"at most {MAX_NAME} characters, got {MAX_NAME + 1}"):
        await c.sched.submit(pb.JobSpec(name="n" * (MAX_NAME + 1), entry_point="m:f", gpus=1))
    with pytest.raises(InvalidArgumentError, match=f"more than {MAX_SPEC_BYTES}: pass data through"):
        await c.sched.submit(pb.JobSpec(entry_point="m:f", gpus=1, args=["x" * MAX_SPEC_BYTES]))
    assert not c.jobs.d and not c.sched.jobs
    j = await c.sched.submit(pb.JobSpec(name="n" * MAX_NAME, entry_point="m:f", gpus=1))
    assert c.sched.get(j.job_id).spec.name == "n" * MAX_NAME


CKPT = "cd" * 20


def _report(c: Cluster, node: str, jid: str) -> dict[str, Any]:
    return dict(c.reports[node]["jobs"][jid])


async def _running_on_a(c: Cluster) -> str:
    """A job running on node a (step 30) of two one-GPU nodes, under Gandiva (which migrates on request)."""
    await c.beat("a")
    await c.beat("b")
    await c.sched.tick()
    j = await c.sched.submit(pb.JobSpec(entry_point="m:f", gpus=1))
    c.reports["b"]["gpus"] = 0  # placed on a first
    await c.beat("b")
    await c.sched.tick()
    c.reports["b"]["gpus"] = 1
    await c.beat("b")
    assert c.sched.get(j.job_id).node_id == "a"
    c.reports["a"]["jobs"][j.job_id].update(step=30)
    await c.beat("a")
    await c.sched.tick()
    return j.job_id


async def test_a_migration_starts_the_target_ahead_and_hands_it_the_checkpoint() -> None:
    c = Cluster("gandiva")
    jid = await _running_on_a(c)
    c.sent.clear()
    await c.sched.migrate(jid, "b")
    await c.sched.tick()
    # the target is started first, to wait for a checkpoint; then the source is told to stop
    (n1, start), (n2, stop) = c.sent
    assert (n1, start["op"], start["await_checkpoint"], start["checkpoint_oid"]) == ("b", "start", True, "")
    assert (n2, stop) == ("a", {"op": "stop", "job_id": jid})
    info = c.sched.get(jid)
    assert (info.phase, info.node_id, info.migrations) == ("migrating", "a", 1)
    assert c.reports["b"]["jobs"][jid]["state"] == "waiting"
    await c.beat("b")
    await c.sched.tick()  # the waiting target is its migration's, not a stray: nothing is killed
    assert not [cmd for _, cmd in c.sent if cmd["op"] == "kill"]
    # the source stops at a boundary: checkpoint of step 31 uploaded, exit 75
    c.reports["a"]["jobs"][jid].update(state="exited", rc=75, step=31, ckpt_oid=CKPT, ckpt_step=31)
    await c.beat("a")
    c.sent.clear()
    await c.sched.tick()
    assert ("b", {"op": "restore", "job_id": jid, "checkpoint_oid": CKPT}) in c.sent
    assert not [cmd for _, cmd in c.sent if cmd["op"] == "start"]  # no second start: the waiting process goes on
    info = c.sched.get(jid)
    assert (info.state, info.node_id, list(info.gpu_slots), info.step, info.phase) == (
        S.JOB_STATE_RUNNING, "b", [0], 31, "starting")
    assert info.incarnation == "inc-b" and not info.target_node_id
    assert [(h.node_id, list(h.gpu_slots), h.ended_by, bool(h.end)) for h in info.history] == [
        ("a", [0], "migrated", True), ("b", [0], "", False)]


async def test_a_target_that_cannot_take_the_checkpoint_is_stopped_and_the_job_started_again() -> None:
    c = Cluster("gandiva")
    jid = await _running_on_a(c)
    await c.sched.migrate(jid, "b")
    await c.sched.tick()
    assert c.sched.get(jid).phase == "migrating"
    c.reports["b"]["jobs"][jid].update(state="exited", rc=1)  # the target process died while waiting
    await c.beat("b")
    c.reports["a"]["jobs"][jid].update(state="exited", rc=75, step=31, ckpt_oid=CKPT, ckpt_step=31)
    await c.beat("a")
    await c.sched.tick()
    info = c.sched.get(jid)
    assert info.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING) and info.checkpoint_step == 31
    assert not [cmd for _, cmd in c.sent if cmd["op"] == "restore"]


async def test_a_migration_onto_busy_gpus_stops_first_and_starts_later() -> None:
    c = Cluster("gandiva")
    jid = await _running_on_a(c)
    c.reports["b"]["jobs"]["other"] = {**_report(c, "a", jid), "state": "running"}  # a process the records do not know
    await c.beat("b")
    c.sent.clear()
    await c.sched.migrate(jid, "b")
    await c.sched.tick()
    assert [(n, cmd["op"]) for n, cmd in c.sent if cmd["job_id"] == jid] == [("a", "stop")]
    assert c.sched.get(jid).phase == "stopping"


async def test_a_killed_jobs_gpus_stay_taken_until_its_process_exits() -> None:
    c = Cluster()
    await c.beat("a")
    await c.sched.tick()
    first = await c.sched.submit(pb.JobSpec(entry_point="m:f", gpus=1))
    await c.sched.tick()
    await c.beat("a")
    await c.sched.kill(first.job_id)
    assert ("a", {"op": "kill", "job_id": first.job_id}) in c.sent
    second = await c.sched.submit(pb.JobSpec(entry_point="m:f", gpus=1))
    await c.sched.tick()
    await c.sched.tick()
    # the killed process still runs on the GPU (SIGTERM takes a while): the next job waits for it
    assert not [cmd for _, cmd in c.sent if cmd["op"] == "start" and cmd["job_id"] == second.job_id]
    c.reports["a"]["jobs"][first.job_id].update(state="exited", rc=-15)
    await c.beat("a")
    await c.sched.tick()
    assert [cmd["slots"] for _, cmd in c.sent if cmd["op"] == "start" and cmd["job_id"] == second.job_id] == [[0]]
