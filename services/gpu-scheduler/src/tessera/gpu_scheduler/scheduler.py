"""The live scheduler: job records, node agents' reports, and the policy, reconciled every tick.

Domain code (no grpc, no nats). Every job record lives in the control store (``store``,
namespace ``gpu-jobs``); node agents publish what they run to ``gpu-agents``. Each tick
reads the agents' reports, folds them into the records (progress, metrics, checkpoints,
exits; a job whose agent died or restarted is requeued from its last checkpoint), asks
the :mod:`policy` where jobs should run, and sends the agents the instructions that
move the cluster there (start, suspend, resume, stop). The scheduler keeps no state
that is not in the store: a restarted one reads the records and goes on.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as pb
from tessera.common import packages
from tessera.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from tessera.gpu_scheduler.policy import JobView, Node, Policy, plan_actions

log = logging.getLogger(__name__)
#: The longest job name, and the largest job spec (it travels in every state-change event of the job).
MAX_NAME, MAX_SPEC_BYTES = 256, 256 * 1024

EXIT_STOPPED = 75
S = pb.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_KILLED)
LEAVING = ("suspending", "stopping", "migrating")  # phases of a job letting go of its GPUs
HOLDING = ("starting", "waiting", "running")  # states of a job process (agents' reports) that hold its GPUs
ENTRY_HELP = "MODULE:FUNCTION or path/to/file.py:FUNCTION"


PACK_MEASURE_S = 3.0  # how long two packed jobs run before their gain is measured


def pair_gain(solo_a: float, packed_a: float, solo_b: float, packed_b: float) -> float | None:
    """Combined normalized throughput of two packed jobs from mini-batch times alone and packed
    (1.0: as fast as one of them alone; above: packing gains). None without all four."""
    if min(solo_a, packed_a, solo_b, packed_b) <= 0:
        return None
    return solo_a / packed_a + solo_b / packed_b


class KV(Protocol):
    async def put(self, key: str, value: bytes) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def keys(self) -> list[str]: ...
    async def delete(self, key: str) -> None: ...


Send = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
Emit = Callable[[str, pb.JobInfo], Awaitable[None]]


@dataclass
class AgentState:
    report: dict[str, Any]
    seen_seq: int
    seen_at: float  # our clock, when seq last changed

    @property
    def node_id(self) -> str:
        return str(self.report["node_id"])


def state_name(s: int) -> str:
    return pb.JobState.Name(s).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


class GpuScheduler:
    def __init__(self, jobs: KV, agents: KV, send: Send, emit: Emit, policy: Policy, *,
                 agent_timeout_s: float = 5.0, migrate_ahead: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.jobs_kv = jobs
        self.agents_kv = agents
        self.send = send
        self.emit = emit
        self.policy = policy
        self.agent_timeout_s = agent_timeout_s
        self.migrate_ahead = migrate_ahead
        self.clock = clock
        self.jobs: dict[str, pb.JobInfo] = {}
        self.pair_gains: dict[frozenset[str], float] = {}  # introspection: measured packing gains
        self.agents: dict[str, AgentState] = {}
        # migrations' targets started ahead, until their agents report them: job -> (node, GPUs)
        self._prestarted: dict[str, tuple[str, list[int]]] = {}
        self.loaded = False

    # ------------------------------------------------------------------ records
    async def load(self) -> None:
        for k in await self.jobs_kv.keys():
            raw = await self.jobs_kv.get(k)
            if raw is not None:
                self.jobs[k] = pb.JobInfo.FromString(raw)
        self.loaded = True

    async def _save(self, j: pb.JobInfo, *, event: bool = False) -> None:
        record_placement(j, self.clock())
        await self.jobs_kv.put(j.job_id, j.SerializeToString())
        if event:
            await self.emit(state_name(j.state), j)

    def _job(self, job_id: str) -> pb.JobInfo:
        j = self.jobs.get(job_id)
        if j is None:
            raise NotFoundError(f"no GPU job {job_id!r}")
        return j

    def capacity(self) -> tuple[int, int]:
        """(GPUs of the largest node, GPUs in all) among live agents."""
        alive = [a for a in self.agents.values() if self._alive(a)]
        return max((int(a.report["gpus"]) for a in alive), default=0), sum(int(a.report["gpus"]) for a in alive)

    # ------------------------------------------------------------------ API
    async def submit(self, spec: pb.JobSpec) -> pb.JobInfo:
        if len(spec.name) > MAX_NAME:
            raise InvalidArgumentError(f"a job name has at most {MAX_NAME} characters, got {len(spec.name)}")
        size = spec.ByteSize()
        if size > MAX_SPEC_BYTES:  # every state change carries the spec in an event: it must stay a small message
            raise InvalidArgumentError(f"the job spec is {size} bytes, more than {MAX_SPEC_BYTES}: pass data through "
                                       "the object store or a working_dir, not in the spec")
        if spec.gpus < 1:
            raise InvalidArgumentError(f"a job needs at least one GPU (gpus={spec.gpus})")
        if not spec.entry_point and not spec.image:
            raise InvalidArgumentError(f"missing entry point: give entry_point ({ENTRY_HELP}) or a container image")
        if spec.entry_point and spec.image:
            raise InvalidArgumentError("give either an entry point or a container image, not both")
        if spec.entry_point:
            mod, sep, fn = spec.entry_point.rpartition(":")
            if not sep or not mod or not fn.isidentifier():
                raise InvalidArgumentError(f"entry point {spec.entry_point!r} must be {ENTRY_HELP}")
        if spec.working_dir:
            if not spec.entry_point:
                raise InvalidArgumentError("working_dir goes with an entry point, not a container image")
            packages.key_of(spec.working_dir)  # InvalidArgumentError when malformed
        if not math.isfinite(spec.time_limit_s) or spec.time_limit_s < 0:  # NaN passes a "< 0" check
            raise InvalidArgumentError(f"time_limit_s must be a finite number >= 0 (0: none), got {spec.time_limit_s}")
        _, total = self.capacity()
        if spec.gpus > total:
            raise InvalidArgumentError(f"job asks for {spec.gpus} GPUs; the cluster has {total}")
        j = pb.JobInfo(job_id=uuid.uuid4().hex[:16], spec=spec, state=S.JOB_STATE_QUEUED, submitted_at=self.clock())
        if not j.spec.name:
            j.spec.name = (spec.entry_point or spec.image).rsplit(":", 1)[-1] or "job"
        self.jobs[j.job_id] = j
        await self._save(j, event=True)
        return j

    def get(self, job_id: str) -> pb.JobInfo:
        return self._job(job_id)

    def list_jobs(self, group: str = "") -> list[pb.JobInfo]:
        return sorted((j for j in self.jobs.values() if not group or j.spec.group_id == group),
                      key=lambda j: (j.submitted_at, j.job_id))

    async def kill(self, job_id: str) -> pb.JobInfo:
        j = self._job(job_id)
        if j.state in TERMINAL:
            raise FailedPreconditionError(f"job {job_id} already ended ({state_name(j.state)})")
        await self._finish(j, S.JOB_STATE_KILLED, "killed on request")
        return j

    async def suspend(self, job_id: str) -> pb.JobInfo:
        j = self._job(job_id)
        if j.state in TERMINAL:
            raise FailedPreconditionError(f"job {job_id} already ended ({state_name(j.state)})")
        j.held = True
        await self._save(j)
        return j

    async def resume(self, job_id: str) -> pb.JobInfo:
        j = self._job(job_id)
        if not j.held:
            raise FailedPreconditionError(f"job {job_id} is not suspended by an administrator")
        j.held = False
        await self._save(j)
        return j

    async def migrate(self, job_id: str, node_id: str) -> pb.JobInfo:
        j = self._job(job_id)
        if j.state != S.JOB_STATE_RUNNING:
            raise FailedPreconditionError(f"job {job_id} is {state_name(j.state)}; only a running job migrates")
        others = [a.node_id for a in self.agents.values() if self._alive(a) and a.node_id != j.node_id
                  and int(a.report["gpus"]) >= j.spec.gpus]
        if node_id:
            if node_id not in self.agents or not self._alive(self.agents[node_id]):
                raise NotFoundError(f"no live node {node_id!r}")
            if node_id == j.node_id:
                raise FailedPreconditionError(f"job {job_id} already runs on node {node_id}")
            if node_id not in others:
                raise FailedPreconditionError(f"node {node_id} has fewer than {j.spec.gpus} GPUs")
        elif not others:
            raise FailedPreconditionError("no other live node can hold this job")
        j.target_node_id = node_id or sorted(others)[0]
        await self._save(j)
        return j

    # ------------------------------------------------------------------ the loop
    def _alive(self, a: AgentState) -> bool:
        return self.clock() - a.seen_at <= self.agent_timeout_s

    async def _read_agents(self) -> None:
        import json

        now = self.clock()
        for k in await self.agents_kv.keys():
            raw = await self.agents_kv.get(k)
            if raw is None:
                continue
            rep = json.loads(raw)
            old = self.agents.get(k)
            if old is None:
                # a report we have not seen change yet: trust it only if it changes (a live agent beats)
                self.agents[k] = AgentState(rep, int(rep["seq"]), now if not self.loaded else now - self.agent_timeout_s / 2)
            elif int(rep["seq"]) != old.seen_seq or rep["incarnation"] != old.report["incarnation"]:
                self.agents[k] = AgentState(rep, int(rep["seq"]), now)

    async def _finish(self, j: pb.JobInfo, state: int, message: str, rc: int | None = None) -> None:
        if j.node_id and j.state in (S.JOB_STATE_RUNNING, S.JOB_STATE_SUSPENDED):
            await self._send(j.node_id, {"op": "kill", "job_id": j.job_id})
        j.state = state  # type: ignore[assignment]
        j.message = message
        j.finished_at = self.clock()
        if rc is not None:
            j.exit_code = rc
        j.phase = ""
        await self._unpack(j)
        del j.gpu_slots[:]
        await self._save(j, event=True)

    async def _send(self, node: str, cmd: dict[str, Any]) -> bool:
        try:
            await self.send(node, cmd)
            return True
        except Exception as e:
            log.warning("node %s: %s %s failed: %s", node[:8], cmd.get("op"), cmd.get("job_id"), e)
            return False

    async def _unpack(self, j: pb.JobInfo) -> None:
        """``j`` leaves its GPUs: its packing partner (if any) is alone again."""
        o = self.jobs.get(j.packed_with)
        j.packed_with = ""
        if o is not None and o.packed_with == j.job_id:
            o.packed_with = ""
            await self._save(o)

    async def _requeue(self, j: pb.JobInfo, why: str) -> None:
        log.warning("job %s requeued from checkpoint step %d: %s", j.job_id, j.checkpoint_step, why)
        j.state = S.JOB_STATE_QUEUED
        await self._unpack(j)
        j.node_id, j.phase, j.incarnation = "", "", ""
        del j.gpu_slots[:]
        j.requeues += 1
        j.step = j.checkpoint_step
        j.message = why
        j.last_ran_at = self.clock()
        await self._save(j, event=True)

    async def _adopt_or_stop_strays(self) -> None:
        """Jobs an agent runs where their records do not place them: an agent judged silent too soon (a
        loaded host) comes back with its jobs still running, after they were requeued. A requeued job not
        placed again is adopted where it runs (no work lost, no second copy); any other stray is stopped."""
        for node, a in self.agents.items():
            if not self._alive(a):
                continue
            for jid, rep in a.report["jobs"].items():
                j = self.jobs.get(jid)
                if rep["state"] == "exited" or (j is not None and j.node_id == node):
                    continue
                if j is not None and j.phase == "migrating" and j.target_node_id == node:
                    continue  # the target of its migration, started ahead, waiting for the checkpoint
                slots = [int(s) for s in rep.get("slots", [])]
                taken = any(o.node_id == node and set(o.gpu_slots) & set(slots) for o in self.jobs.values()
                            if o.job_id != jid and o.state in (S.JOB_STATE_RUNNING, S.JOB_STATE_SUSPENDED))
                if j is not None and j.state == S.JOB_STATE_QUEUED and not j.node_id and rep["state"] == "running" \
                        and slots and not taken and int(rep["step"]) >= j.checkpoint_step:
                    log.warning("job %s still runs on node %s (step %d): adopted there", jid, node[:8], rep["step"])
                    j.state, j.node_id, j.phase = S.JOB_STATE_RUNNING, node, ""
                    j.incarnation = str(a.report["incarnation"])
                    j.step = int(rep["step"])
                    del j.gpu_slots[:]
                    j.gpu_slots.extend(slots)
                    j.run_started_at = self.clock()
                    await self._save(j, event=True)
                else:
                    log.warning("job %s runs on node %s, which its record does not name: stopping that copy",
                                jid, node[:8])
                    await self._send(node, {"op": "kill", "job_id": jid})

    async def _reconcile(self, j: pb.JobInfo) -> None:
        """Fold the agent's report of ``j`` into its record."""
        if not j.node_id or j.state not in (S.JOB_STATE_RUNNING, S.JOB_STATE_SUSPENDED):
            return
        a = self.agents.get(j.node_id)
        if a is None or not self._alive(a):
            await self._requeue(j, f"node {j.node_id[:8]} stopped reporting")
            return
        if j.incarnation and a.report["incarnation"] != j.incarnation:
            await self._requeue(j, f"the agent of node {j.node_id[:8]} restarted")
            return
        rep = a.report["jobs"].get(j.job_id)
        if rep is None:
            if j.phase == "starting" and self.clock() - j.run_started_at > self.agent_timeout_s:
                await self._requeue(j, f"node {j.node_id[:8]} never started it")
            return
        changed = False
        for attr, key in (("step", "step"), ("minibatch_s", "minibatch_s")):
            if rep[key] and getattr(j, attr) != rep[key]:
                setattr(j, attr, rep[key])
                changed = True
        if rep["metrics"] and dict(j.metrics) != rep["metrics"]:
            j.metrics.clear()
            j.metrics.update(rep["metrics"])
            changed = True
        if rep["ckpt_oid"] and rep["ckpt_oid"] != j.checkpoint_object_id.hex():
            j.checkpoint_object_id, j.checkpoint_step = bytes.fromhex(rep["ckpt_oid"]), rep["ckpt_step"]
            changed = True
        if not j.packed_with and rep["minibatch_s"]:
            j.solo_minibatch_s = rep["minibatch_s"]
        state = rep["state"]
        if state == "exited":
            rc = rep["rc"]
            await self._send(j.node_id, {"op": "forget", "job_id": j.job_id})
            if rc == 0:
                await self._finish(j, S.JOB_STATE_SUCCEEDED, "finished", rc)
            elif rc == EXIT_STOPPED and j.phase == "migrating" and await self._hand_over(j):
                return
            elif rc == EXIT_STOPPED and j.phase in ("stopping", "suspending", "migrating"):
                await self._unpack(j)
                j.state, j.phase, j.node_id, j.incarnation = S.JOB_STATE_QUEUED, "", "", ""
                del j.gpu_slots[:]
                j.step = j.checkpoint_step
                await self._save(j, event=True)
            else:
                await self._finish(j, S.JOB_STATE_FAILED, rep.get("message") or f"exited with code {rc}", rc)
            return
        if j.phase == "starting" and state == "running" and rep["step"] > j.checkpoint_step:
            j.phase = ""  # it reached its first mini-batch boundary: its time slice starts now
            j.run_started_at = self.clock()
            changed = True
        if j.phase == "suspending" and state == "suspended":
            j.phase, j.state = "", S.JOB_STATE_SUSPENDED
            del j.gpu_slots[:]
            await self._unpack(j)
            j.last_ran_at = self.clock()
            j.suspensions += 1
            await self._save(j, event=True)
            return
        if j.phase == "resizing" and [int(s) for s in rep.get("slots", [])] != list(j.gpu_slots):
            j.phase = ""  # the job took its new GPUs at a mini-batch boundary
            del j.gpu_slots[:]
            j.gpu_slots.extend(int(s) for s in rep["slots"])
            j.resizes += 1
            await self._save(j, event=True)
            return
        if j.phase == "resuming" and state == "running":
            j.phase = ""
            j.run_started_at = self.clock()
            changed = True
        now = self.clock()
        if j.spec.time_limit_s and j.state == S.JOB_STATE_RUNNING and j.started_at and \
                now - j.started_at > j.spec.time_limit_s:
            await self._finish(j, S.JOB_STATE_KILLED, f"time limit of {j.spec.time_limit_s:g}s reached")
            return
        if changed:
            await self._save(j)

    def _views(self) -> tuple[list[Node], list[JobView]]:
        nodes = [Node(a.node_id, int(a.report["gpus"])) for a in sorted(self.agents.values(), key=lambda a: a.node_id)
                 if self._alive(a)]
        views = []
        for j in self.list_jobs():
            if j.state in TERMINAL:
                continue
            # a job letting go of its GPUs is off them for the policy (its slots stay busy until it has let go);
            # one still starting or resuming is at the very beginning of its time slice
            leaving = j.phase in LEAVING
            running = j.state == S.JOB_STATE_RUNNING and not leaving
            run_started = self.clock() if j.phase in ("starting", "resuming") else j.run_started_at
            last_ran = self.clock() if leaving else (j.last_ran_at or None)
            acc = j.metrics.get("accuracy")
            views.append(JobView(
                j.job_id, j.spec.gpus, j.submitted_at, priority=j.spec.priority, group=j.spec.group_id,
                app=j.spec.entry_point or j.spec.image, elastic=j.spec.elastic,
                slots=tuple((j.node_id, int(s)) for s in j.gpu_slots) if running else (),
                run_started=run_started, last_ran=last_ran, attained=j.attained_gpu_s,
                accuracy=acc, held=j.held, target=j.target_node_id,
                home=j.node_id if j.state == S.JOB_STATE_SUSPENDED or leaving else ""))
        return nodes, views

    async def tick(self) -> None:
        """One reconciliation: read agents, fold reports, ask the policy, instruct agents."""
        if not self.loaded:
            await self.load()
        prev = getattr(self, "_last_tick", None)
        now = self.clock()
        self._last_tick = now
        await self._read_agents()
        await self._adopt_or_stop_strays()
        for j in list(self.jobs.values()):
            if j.state == S.JOB_STATE_RUNNING and prev is not None:
                j.attained_gpu_s += j.spec.gpus * (now - prev)
            await self._reconcile(j)
        nodes, views = self._views()
        busy = {jid for jid, j in self.jobs.items() if j.phase}  # in a transition: leave them be
        decision = self.policy.schedule(now, nodes, views, self._pair_speed)
        for jid, why in decision.stop.items():
            await self._finish(self.jobs[jid], S.JOB_STATE_KILLED, why)
        self._measure_pairs()
        occupied: dict[tuple[str, int], str] = {}
        for j in self.jobs.values():
            if j.state == S.JOB_STATE_RUNNING or j.phase in LEAVING:
                for s in j.gpu_slots:
                    occupied[(j.node_id, int(s))] = j.job_id
        # GPUs stay taken until the process that held them has exited: a killed or stray job's, and those a
        # migration's target holds while it waits for its checkpoint
        for node, a in self.agents.items():
            if self._alive(a):
                for jid, rep in a.report["jobs"].items():
                    if rep["state"] in HOLDING:
                        for s in rep.get("slots", []):
                            occupied.setdefault((node, int(s)), jid)
        for jid in [k for k, o in self.jobs.items() if k in self._prestarted and o.phase != "migrating"]:
            del self._prestarted[jid]
        for jid, (node, gpu_ids) in self._prestarted.items():
            for g in gpu_ids:
                occupied.setdefault((node, g), jid)
        for act in plan_actions(views, decision):
            j = self.jobs[act.job_id]
            if act.job_id in busy or act.job_id in decision.stop:
                continue
            if act.kind == "suspend":
                if await self._send(j.node_id, {"op": "suspend", "job_id": j.job_id}):
                    j.phase = "suspending"
                    await self._save(j)
            elif act.kind == "migrate":
                await self._migrate(j, act.slots, occupied)
            elif act.kind == "start":
                await self._start(j, act.slots, occupied, decision.placements)
            elif act.kind == "resize":
                await self._resize(j, act.slots, occupied)

    async def _migrate(self, j: pb.JobInfo, slots: tuple[tuple[str, int], ...],
                       occupied: dict[tuple[str, int], str]) -> None:
        """A migration: a stop on the source (checkpoint at the next boundary, upload, exit) and a restart on the
        target from that checkpoint. Where the target's GPUs are free, the target process starts now, beside the
        stop: it starts up (process, imports, model) while the source checkpoints, and waits for the checkpoint
        (:meth:`_hand_over`). Otherwise it starts once the source has exited."""
        decided = time.time()
        target = slots[0][0]
        if not j.target_node_id:
            j.target_node_id = target
        ahead = False
        a = self.agents.get(target)
        gpu_ids = [g for _, g in slots]
        if self.migrate_ahead and j.target_node_id == target and all(n == target for n, _ in slots) and a is not None and self._alive(a) \
                and all(occupied.get(s, j.job_id) == j.job_id for s in slots) and not j.spec.image:
            ahead = await self._send(target, {**self._start_cmd(j, gpu_ids, ""), "await_checkpoint": True})
        if not await self._send(j.node_id, {"op": "stop", "job_id": j.job_id}):
            if ahead:
                await self._send(target, {"op": "kill", "job_id": j.job_id})
            return
        j.phase = "migrating" if ahead else "stopping"
        j.migrations += 1
        if ahead:
            self._prestarted[j.job_id] = (target, gpu_ids)
            for s in slots:
                occupied[s] = j.job_id
        log.info("job %s: migration to node %s decided%s", j.job_id, target[:8], " (target started ahead)" if ahead else "")
        log.info("job %s timeline decided %.6f", j.job_id, decided)
        await self._save(j)

    async def _hand_over(self, j: pb.JobInfo) -> bool:
        """The source of a migration has stopped: hand its checkpoint to the target process waiting for it.
        False (nothing changed) when the target cannot take it; the job is then started afresh."""
        node = j.target_node_id
        self._prestarted.pop(j.job_id, None)
        a = self.agents.get(node)
        rep = a.report["jobs"].get(j.job_id) if a is not None and self._alive(a) else None
        if rep is None or rep["state"] != "waiting" or not await self._send(
                node, {"op": "restore", "job_id": j.job_id, "checkpoint_oid": j.checkpoint_object_id.hex()}):
            log.warning("job %s: the target of its migration cannot take the checkpoint; started again", j.job_id)
            if rep is not None and rep["state"] != "exited":
                await self._send(node, {"op": "kill", "job_id": j.job_id})
            return False
        assert a is not None
        await self._unpack(j)
        j.node_id, j.target_node_id, j.phase = node, "", "starting"
        j.incarnation = str(a.report["incarnation"])
        del j.gpu_slots[:]
        j.gpu_slots.extend(int(s) for s in rep["slots"])
        j.step = j.checkpoint_step
        j.run_started_at = self.clock()
        await self._save(j, event=True)
        return True

    def _start_cmd(self, j: pb.JobInfo, gpu_ids: list[int], checkpoint_oid: str) -> dict[str, Any]:
        return {"op": "start", "job_id": j.job_id, "slots": gpu_ids, "checkpoint_oid": checkpoint_oid,
                "spec": {"entry_point": j.spec.entry_point, "working_dir": j.spec.working_dir,
                         "image": j.spec.image, "args": list(j.spec.args),
                         "env": dict(j.spec.env), "elastic": j.spec.elastic}}

    async def _resize(self, j: pb.JobInfo, slots: tuple[tuple[str, int], ...], occupied: dict[tuple[str, int], str]) -> None:
        """Grow or shrink ``j`` on its node (grow-shrink); its slots change when the job has taken the new ones."""
        if any(occupied.get(s, j.job_id) != j.job_id for s in slots):
            return  # a GPU it grows onto is still being let go: next tick
        gpu_ids = [g for _, g in slots]
        if await self._send(j.node_id, {"op": "resize", "job_id": j.job_id, "slots": gpu_ids}):
            j.phase = "resizing"
            for s in slots:
                occupied[s] = j.job_id  # until the job reports, its old and new slots are both held
            await self._save(j)

    # ------------------------------------------------------------------ packing introspection
    def _pair_speed(self, a: JobView, b: JobView) -> float | None:
        """Measured combined throughput of ``a`` and ``b`` packed together (1.0 = one job alone), if measured.

        A job never measured alone cannot be packed yet (0.0): without its speed alone, the pair's
        gain could not be told; time-slicing gives it that measurement first.
        """
        ja, jb = self.jobs.get(a.job_id), self.jobs.get(b.job_id)
        if ja is None or jb is None or ja.solo_minibatch_s <= 0 or jb.solo_minibatch_s <= 0:
            return 0.0
        return self.pair_gains.get(frozenset((a.job_id, b.job_id)))

    def _measure_pairs(self) -> None:
        """Two jobs packed for a while, each with a mini-batch time measured alone and one now: their gain."""
        now = self.clock()
        for j in self.jobs.values():
            o = self.jobs.get(j.packed_with)
            if o is None or j.job_id > o.job_id or j.state != S.JOB_STATE_RUNNING or o.state != S.JOB_STATE_RUNNING:
                continue
            if now - max(j.run_started_at, o.run_started_at) < PACK_MEASURE_S:
                continue
            gain = pair_gain(j.solo_minibatch_s, j.minibatch_s, o.solo_minibatch_s, o.minibatch_s)
            if gain is not None:
                self.pair_gains[frozenset((j.job_id, o.job_id))] = gain

    async def _start(self, j: pb.JobInfo, slots: tuple[tuple[str, int], ...], occupied: dict[tuple[str, int], str],
                     placements: dict[str, tuple[tuple[str, int], ...]] | None = None) -> None:
        node = slots[0][0]
        partners = {occupied[s] for s in slots if occupied.get(s, j.job_id) != j.job_id}
        packing = bool(partners) and placements is not None and all(
            p in self.jobs and tuple(placements.get(p, ())) == tuple(slots) and self.jobs[p].state == S.JOB_STATE_RUNNING
            and not self.jobs[p].phase for p in partners)
        if partners and not packing:
            return  # the previous holder has not let go yet: next tick
        gpu_ids = [g for _, g in slots]
        if j.state == S.JOB_STATE_SUSPENDED and j.node_id == node and not j.target_node_id:
            if not await self._send(node, {"op": "resume", "job_id": j.job_id}):
                return
            j.phase = "resuming"
        elif j.state == S.JOB_STATE_SUSPENDED:
            # it waits, suspended, on another node: stop it there (its checkpoint is in the object store) and start here
            if not j.checkpoint_object_id or j.checkpoint_step < j.step:
                return  # the upload of the checkpoint it was suspended with has not landed yet
            if await self._send(j.node_id, {"op": "stop", "job_id": j.job_id}):
                j.phase = "stopping"
                j.migrations += 1
                await self._save(j)
            return
        else:
            if not await self._send(node, self._start_cmd(j, gpu_ids, j.checkpoint_object_id.hex())):
                return
            a = self.agents.get(node)
            j.incarnation = str(a.report["incarnation"]) if a else ""
            j.phase = "starting"
            if not j.started_at:
                j.started_at = self.clock()
        if j.target_node_id == node:
            j.target_node_id = ""
        j.state = S.JOB_STATE_RUNNING
        j.node_id = node
        del j.gpu_slots[:]
        j.gpu_slots.extend(gpu_ids)
        j.run_started_at = self.clock()
        for s in slots:
            occupied[s] = j.job_id
        if packing:
            (partner,) = partners
            j.packed_with, self.jobs[partner].packed_with = partner, j.job_id
            self.jobs[partner].run_started_at = self.clock()  # its packed measurement starts now too
            await self._save(self.jobs[partner])
        await self._save(j, event=True)

    def cluster(self) -> list[dict[str, Any]]:
        out = []
        for a in sorted(self.agents.values(), key=lambda a: a.node_id):
            out.append({"node_id": a.node_id, "gpus": int(a.report["gpus"]), "kind": a.report.get("kind", ""),
                        "names": list(a.report.get("names", [])), "alive": self._alive(a),
                        "job_ids": sorted(j.job_id for j in self.jobs.values()
                                          if j.node_id == a.node_id and j.state == S.JOB_STATE_RUNNING)})
        return out


#: Placements a job's record keeps (its history of time slices on GPUs).
HISTORY = 64


def record_placement(j: pb.JobInfo, now: float) -> None:
    """Keep ``j.history`` in step with where it runs now: the open placement ends when it leaves its GPUs or
    its partner changes, and a new one starts where it runs."""
    running = j.state == S.JOB_STATE_RUNNING and bool(j.node_id) and bool(j.gpu_slots)
    last = j.history[-1] if j.history else None
    if last is not None and not last.end:
        same = running and last.node_id == j.node_id and list(last.gpu_slots) == list(j.gpu_slots)
        if same and last.packed_with == j.packed_with:
            return
        last.end = now
        if j.state != S.JOB_STATE_RUNNING:
            last.ended_by = state_name(j.state).lower()
        elif not j.node_id or last.node_id != j.node_id:
            last.ended_by = "migrated"
        elif list(last.gpu_slots) != list(j.gpu_slots):
            last.ended_by = "resized"
        else:
            last.ended_by = "repacked"
    if running:
        j.history.add(node_id=j.node_id, gpu_slots=list(j.gpu_slots), start=now, packed_with=j.packed_with)
        if len(j.history) > HISTORY:
            del j.history[: len(j.history) - HISTORY]
