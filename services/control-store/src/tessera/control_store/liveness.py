"""Node and service liveness: the periodic sweep every control-store replica runs.

Nodes that missed heartbeats for ``node_timeout_s`` are marked DEAD (and
``tessera.events.nodes.dead`` announced); service registrations whose TTL passed
are dropped. Running the sweep in several replicas is safe: each transition is
made and announced once.
"""

from __future__ import annotations

import asyncio
import logging

from tessera.control_store.store import ControlStore

log = logging.getLogger(__name__)


class LivenessMonitor:
    def __init__(self, store: ControlStore, *, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> None:
        for node in await self.store.reap_dead_nodes():
            log.warning("node %s (%s) missed heartbeats: marked DEAD", node.node_id.hex(), node.address)
        for member in await self.store.reap_expired_instances():
            log.info("service instance %s expired", member.decode())

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as e:  # Redis may be restarting: try again next round
                log.warning("liveness sweep failed: %s", e)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="liveness")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
