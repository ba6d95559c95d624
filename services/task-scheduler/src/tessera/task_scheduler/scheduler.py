"""The global scheduler: places work that node agents spill (replicas share it through a NATS queue group).

For each spilled task it picks the node with the smallest estimated wait —
queue length over CPUs plus the time to move the arguments that node lacks
(object locations and sizes from the control store) — forwards the task there,
and tells the spilling agent where it went (so the agent can place it again if
that node dies).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common.config import Settings
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import ServiceApp
from tessera.task_scheduler.placement import NodeView, choose_node, view_of

log = logging.getLogger(__name__)

SPILL_SUBJECT = "tessera.sched.spill"
LOAD_SUBJECT = "tessera.sched.load"
GLOBAL_QUEUE = "task-scheduler-global"


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

    async def start(self) -> None:
        bus = self.app.bus
        assert bus is not None
        self._channel, self.cs = control_store_aio_stub(self.settings)
        await bus.subscribe(LOAD_SUBJECT, self._on_load)
        await bus.subscribe(SPILL_SUBJECT, self._on_spill, queue=GLOBAL_QUEUE)
        self._tasks.append(asyncio.create_task(self._sweep()))

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
