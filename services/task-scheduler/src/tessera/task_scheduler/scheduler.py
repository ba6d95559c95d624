"""The global scheduler: places work that node agents spill (replicas share it through a NATS queue group).

For each spilled task it picks the node with the smallest estimated wait —
queue length over CPUs plus the time to move the arguments that node lacks
(object locations and sizes from the control store) — forwards the task there,
and tells the spilling agent where it went (so the agent can place it again if
that node dies).

It also restarts actors whose node died (as Ray's GCS actor manager does): it
watches the nodes the control store marks DEAD, and submits again the creation
task of each actor recorded on one, while the actor has restarts left. Its only
state is the control store's (a restarted or second replica carries on; a
conditional update makes each restart happen once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
import grpc.aio

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common import bundles as bnd
from tessera.common.config import Settings
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import ServiceApp
from tessera.task_scheduler.placement import InfeasibleGroup, NodeView, choose_node, place_bundles, view_of
from tessera.task_scheduler.resources import acquire as res_acquire

log = logging.getLogger(__name__)

SPILL_SUBJECT = "tessera.sched.spill"
LOAD_SUBJECT = "tessera.sched.load"
GLOBAL_QUEUE = "task-scheduler-global"
#: Broadcast to every node agent: a placement group was removed or can never be placed.
PG_GONE_SUBJECT = "tessera.sched.pg.gone"
#: How often the global scheduler looks for placement groups to place or remove.
PG_POLL_S = 0.2
#: How often placement groups are checked against their jobs (a group goes when its job ends, unless detached).
PG_JOBS_S = 2.0
#: How often it looks for dead nodes whose actors are to be restarted (also woken by each node's death).
ACTOR_POLL_S = 1.0
NODE_DEAD_SUBJECT = "tessera.events.nodes.dead"


def node_subject(node_id: bytes, what: str) -> str:
    return f"tessera.sched.node.{node_id.hex()}.{what}"


class GlobalScheduler:
    def __init__(self, app: ServiceApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.nodes: dict[bytes, NodeView] = {}
        self.parked: list[tuple[pb.TaskSpec, bytes, float]] = []  # no node fits yet
        self.placed = 0
        self.cs: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._jobs_checked = 0.0

    async def start(self) -> None:
        bus = self.app.bus
        assert bus is not None
        self._channel, self.cs = control_store_aio_stub(self.settings)
        await bus.subscribe(LOAD_SUBJECT, self._on_load)
        await bus.subscribe(SPILL_SUBJECT, self._on_spill, queue=GLOBAL_QUEUE)
        self._tasks.append(asyncio.create_task(self._sweep()))
        self._tasks.append(asyncio.create_task(self._placement_groups()))
        self._node_died = asyncio.Event()
        await bus.subscribe(NODE_DEAD_SUBJECT, self._on_node_dead)
        self._tasks.append(asyncio.create_task(self._actor_restarts()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self._channel.close()

    async def _on_load(self, msg: Any) -> None:
        load = pb.NodeLoad.FromString(msg.data)
        if load.leaving:
            self.nodes.pop(load.node_id, None)
            return
        view = view_of(load.node_id, incarnation=load.incarnation, total=load.resources_total,
                       available=load.resources_available, queued=load.queued, running=load.running, leaving=False)
        if view is None:
            log.warning("dropped a load report that is not one (node id %s)", load.node_id.hex()[:32])
            return
        self.nodes[load.node_id] = view
        if self.parked:
            parked, self.parked = self.parked, []
            for spec, origin, _ in parked:
                await self._place([spec], origin)

    async def _on_spill(self, msg: Any) -> None:
        batch = pb.TaskBatch.FromString(msg.data)
        await self._place(list(batch.tasks), batch.from_node_id)

    async def _arg_locations(self, specs: list[pb.TaskSpec]) -> dict[bytes, dict[bytes, int]]:
        oids = sorted({a.object_id for s in specs for a in s.args if a.WhichOneof("kind") == "object_id"})
        if not oids:
            return {}
        try:
            objs = (await self.cs.GetObjects(cpb.GetObjectsRequest(object_ids=oids), timeout=5.0)).objects
        except Exception as e:
            log.warning("argument locations unavailable: %s", e)
            return {}
        return {o.object_id: {n: o.size for n in o.locations} for o in objs}

    async def _place(self, specs: list[pb.TaskSpec], origin: bytes) -> None:
        now = time.monotonic()
        live = [n for n in self.nodes.values() if now - n.seen < max(3.0, self.settings.node_timeout_s / 2)]
        locations = await self._arg_locations(specs)
        out: dict[bytes, list[pb.TaskSpec]] = {}
        for spec in specs:
            args = {a.object_id: locations.get(a.object_id, {}) for a in spec.args if a.WhichOneof("kind") == "object_id"}
            node = choose_node(dict(spec.resources), live, arg_bytes=args)
            if node is None:
                self.parked.append((spec, origin, now))
                continue
            node.queued += 1  # until its next report: do not send everything to the same node
            out.setdefault(node.node_id, []).append(spec)
        bus = self.app.bus
        assert bus is not None
        for node_id, batch in out.items():
            self.placed += len(batch)
            await bus.publish(node_subject(node_id, "tasks"), pb.TaskBatch(tasks=batch, from_node_id=origin).SerializeToString())
            if origin:
                await bus.publish(node_subject(origin, "assigned"),
                                  pb.TaskBatch(tasks=[pb.TaskSpec(task_id=s.task_id) for s in batch],
                                               from_node_id=node_id).SerializeToString())

    async def _sweep(self) -> None:
        """Forget silent nodes; give parked tasks back to their origin when it is time (it reports them)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for nid, n in list(self.nodes.items()):
                if now - n.seen > self.settings.node_timeout_s:
                    del self.nodes[nid]
            keep = []
            for spec, origin, since in self.parked:
                if now - since > self.settings.task_scheduler_unschedulable_s and origin:
                    # the origin agent fails it with the cluster's resources in the message
                    await self.app.bus.publish(node_subject(origin, "tasks"),  # type: ignore[union-attr]
                                               pb.TaskBatch(tasks=[spec], from_node_id=origin).SerializeToString())
                else:
                    keep.append((spec, origin, since))
            self.parked = keep

    # ------------------------------------------------------------------ actors of dead nodes

    async def _on_node_dead(self, msg: Any) -> None:
        self._node_died.set()

    async def _actor_restarts(self) -> None:
        """Restart (or declare dead) the actors of every node the control store marks DEAD. A dead node is
        done once its actors are all handled; after a restart of this process every dead node is looked at
        again (what was handled is skipped: its actors are no longer recorded there)."""
        done: set[bytes] = set()
        started_ms = int(time.time() * 1000)
        orphans_checked = False
        while True:
            try:
                await asyncio.wait_for(self._node_died.wait(), ACTOR_POLL_S)
            except TimeoutError:
                pass
            self._node_died.clear()
            try:
                dead = {n.node_id for n in (await self.cs.ListNodes(cpb.ListNodesRequest(state=cpb.NODE_STATE_DEAD),
                                                                    timeout=5.0)).nodes}
                for nid in dead:  # its last load report may still look fresh here: place nothing there
                    self.nodes.pop(nid, None)
                new = dead - done
                if not new and orphans_checked:
                    continue
                actors = (await self.cs.ListActors(cpb.ListActorsRequest(), timeout=10.0)).actors
                ok = True
                for a in actors:
                    if a.state in (cpb.ACTOR_STATE_ALIVE, cpb.ACTOR_STATE_RESTARTING) and a.node_id in new:
                        ok = await self._restart_actor(a) and ok
                    elif not orphans_checked and a.state == cpb.ACTOR_STATE_RESTARTING and not a.node_id \
                            and a.updated_ms < started_ms and a.creation_spec:
                        # claimed by a scheduler that stopped before it submitted the restart
                        await self._resubmit(a)
                orphans_checked = True
                if ok:
                    done |= new
            except Exception as e:
                log.warning("restarting the actors of dead nodes: %s", e)

    async def _restart_actor(self, a: cpb.ActorInfo) -> bool:
        """Claim the restart of an actor whose node died (or mark it DEAD), then submit its creation task
        again. False when it could not be handled now (the control store did not answer)."""
        node = a.node_id
        spec, cause = restart_plan(a)
        state = cpb.ACTOR_STATE_DEAD if spec is None else cpb.ACTOR_STATE_RESTARTING
        try:
            rec = (await self.cs.UpdateActor(cpb.UpdateActorRequest(
                actor_id=a.actor_id, state=state, death_cause=cause, if_node_id=node, clear_node=spec is not None),
                timeout=5.0)).actor
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return True  # handled by another replica, or it moved meanwhile
            log.warning("could not restart actor %s: %s", a.actor_id.hex(), e.details())
            return False
        if spec is None:
            log.warning("actor %s (%s) is dead: %s", a.actor_id.hex(), a.name or "unnamed", cause)
            return True
        spec.actor_restarts = rec.restarts
        log.warning("actor %s (%s): its node %s died; restarting it elsewhere (restart %d of %s)", a.actor_id.hex(),
                    a.name or spec.name, node.hex()[:8], rec.restarts,
                    "unlimited" if a.max_restarts < 0 else a.max_restarts)
        await self._place([spec], b"")
        return True

    async def _resubmit(self, a: cpb.ActorInfo) -> None:
        spec = pb.TaskSpec.FromString(a.creation_spec)
        strip_placement(spec)
        spec.actor_restarts = a.restarts
        log.warning("actor %s (%s): submitting its restart again", a.actor_id.hex(), a.name or spec.name)
        await self._place([spec], b"")

    # ------------------------------------------------------------------ placement groups

    async def _placement_groups(self) -> None:
        """Place pending placement groups and remove those asked to be, as the control store records them
        (so that a restarted scheduler carries on where the last one stopped)."""
        done: set[bytes] = set()  # created or infeasible: nothing left to do but a removal
        while True:
            await asyncio.sleep(PG_POLL_S)
            try:
                keys = (await self.cs.KvList(cpb.KvListRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE),
                                             timeout=5.0)).keys
                for k in keys:
                    if k.startswith(b"remove:"):
                        await self._remove_group(k[len(b"remove:"):])
                        done.discard(k[len(b"remove:"):])
                now = time.monotonic()
                if now - self._jobs_checked >= PG_JOBS_S:  # groups whose job ended go with it, unless detached
                    self._jobs_checked = now
                    for k in keys:
                        if b":" not in k and await self._orphaned(k):
                            await self._remove_group(k)
                            done.discard(k)
                for k in keys:
                    if b":" not in k and k not in done and await self._place_group(k):
                        done.add(k)
                done &= set(keys)
            except Exception as e:
                log.warning("placement groups: %s", e)

    async def _orphaned(self, key: bytes) -> bool:
        """Whether group ``key`` outlived the job that made it (it is not detached, and the job ended: its
        driver shut down, or died and its node agent said so)."""
        g = await self._get_group(key)
        if g is None or g.detached or not g.creator_job_id or g.state == cpb.PLACEMENT_GROUP_STATE_REMOVED:
            return False
        try:
            job = (await self.cs.GetJob(cpb.GetJobRequest(job_id=g.creator_job_id), timeout=5.0)).job
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.NOT_FOUND
        return job.state in (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_STOPPED)

    async def _get_group(self, key: bytes) -> cpb.PlacementGroup | None:
        try:
            raw = (await self.cs.KvGet(cpb.KvGetRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE, key=key),
                                       timeout=5.0)).value
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return cpb.PlacementGroup.FromString(raw)

    async def _put_group(self, g: cpb.PlacementGroup) -> None:
        await self.cs.KvPut(cpb.KvPutRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE,
                                             key=g.placement_group_id.hex().encode(), value=g.SerializeToString(),
                                             overwrite=True), timeout=5.0)

    async def _place_group(self, key: bytes) -> bool:
        """Try to place one group (two phases: every node PREPAREs its bundles, the placement is recorded,
        then every node COMMITs). True when nothing is left to do for it."""
        g = await self._get_group(key)
        if g is None or g.state != cpb.PLACEMENT_GROUP_STATE_PENDING:
            return g is not None
        now = time.monotonic()
        live = [n for n in self.nodes.values() if now - n.seen < max(3.0, self.settings.node_timeout_s / 2)]
        wanted = [dict(b.resources) for b in g.bundles]
        try:
            chosen = place_bundles(wanted, g.strategy, live)
        except InfeasibleGroup as e:
            registered = (await self.cs.ListNodes(cpb.ListNodesRequest(state=cpb.NODE_STATE_ALIVE), timeout=5.0)).nodes
            if len(registered) > len(live):
                return False  # a node is still joining: it may hold the group
            g.state, g.error = cpb.PLACEMENT_GROUP_STATE_INFEASIBLE, f"placement group {g.name or key.decode()}: {e}"
            await self._put_group(g)
            await self.app.bus.publish(PG_GONE_SUBJECT, g.SerializeToString())  # type: ignore[union-attr]
            log.warning("%s", g.error)
            return True
        if chosen is None:
            return False  # waits for resources to come free
        for b, node in zip(g.bundles, chosen, strict=True):
            b.node_id = node
        nodes = sorted(set(chosen))
        prepared: list[bytes] = []
        for node in nodes:
            if await self._reserve(node, "PREPARE", g):
                prepared.append(node)
            else:
                break
        if len(prepared) < len(nodes):
            for node in prepared:
                await self._reserve(node, "RETURN", g)
            return False
        g.state = cpb.PLACEMENT_GROUP_STATE_CREATED
        if await self._get_group(key) is None:  # removed meanwhile
            for node in prepared:
                await self._reserve(node, "RETURN", g)
            return True
        await self._put_group(g)
        for node in nodes:  # a commit lost here is done by the node itself (it reads the record)
            await self._reserve(node, "COMMIT", g)
        for node in nodes:
            view = self.nodes.get(node)
            if view is not None:  # until its next report
                for b in g.bundles:
                    if b.node_id == node:
                        res_acquire(dict(b.resources), view.available)
        log.info("placement group %s placed on %s", key.decode(), ", ".join(n.hex()[:8] for n in chosen))
        return True

    async def _reserve(self, node: bytes, op: str, g: cpb.PlacementGroup) -> bool:
        msg = cpb.PlacementGroupReservation(op=op, group=g)
        try:
            raw = await self.app.bus.request(node_subject(node, "bundles"), msg.SerializeToString(),  # type: ignore[union-attr]
                                             timeout=5.0)
        except Exception as e:
            log.warning("placement group %s: %s on node %s got no answer: %s", g.placement_group_id.hex(), op,
                        node.hex()[:8], e)
            return False
        reply = cpb.PlacementGroupReservationReply.FromString(raw.data)
        if not reply.ok:
            log.info("placement group %s: %s on node %s refused: %s", g.placement_group_id.hex(), op, node.hex()[:8],
                     reply.error)
        return reply.ok

    async def _remove_group(self, pg_hex: bytes) -> None:
        """Free a group's bundles everywhere (every node returns them, stopping what runs in them), then
        forget it."""
        g = await self._get_group(pg_hex)
        if g is not None:
            g.state, g.error = cpb.PLACEMENT_GROUP_STATE_REMOVED, (
                f"placement group {g.name or pg_hex.decode()} was removed")
            await self._put_group(g)
            await self.app.bus.publish(PG_GONE_SUBJECT, g.SerializeToString())  # type: ignore[union-attr]
            if g.name:
                await self.cs.KvDelete(cpb.KvDeleteRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE,
                                                           key=(bnd.NAME_PREFIX + g.name).encode()), timeout=5.0)
            await self.cs.KvDelete(cpb.KvDeleteRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE, key=pg_hex),
                                   timeout=5.0)
        await self.cs.KvDelete(cpb.KvDeleteRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE,
                                                   key=b"remove:" + pg_hex), timeout=5.0)


def strip_placement(spec: pb.TaskSpec) -> None:
    """A restart goes to any node that can run the actor: a soft node affinity (its node is gone) and SPREAD
    (the owner's agent applies it) are dropped."""
    spec.affinity_node_id, spec.affinity_soft, spec.scheduling_strategy = b"", False, ""


def restart_plan(a: cpb.ActorInfo) -> tuple[pb.TaskSpec | None, str]:
    """What becomes of an actor whose node died: its creation task to submit again (restarts left), or None
    and why it is dead. Ray's rules: max_restarts -1 restarts forever; a node affinity that is not soft pins
    it to the dead node."""
    where = f"its node {a.node_id.hex()} died"
    if a.max_restarts >= 0 and a.restarts >= a.max_restarts:
        return None, f"{where}, and it has no restarts left (max_restarts={a.max_restarts}, restarts={a.restarts})"
    if not a.creation_spec:
        return None, f"{where} before its creation task was recorded"
    spec = pb.TaskSpec.FromString(a.creation_spec)
    if spec.affinity_node_id == a.node_id and not spec.affinity_soft:
        return None, f"{where}, and NodeAffinitySchedulingStrategy(soft=False) pins it there"
    strip_placement(spec)
    return spec, ""
