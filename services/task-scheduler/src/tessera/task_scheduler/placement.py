"""Where a task should run: the smallest estimated wait (the paper's global scheduler).

The estimate for a node is the time its queue needs to drain to this task plus the
time to move the task's arguments that are not already there. Both the global
scheduler and an agent placing an actor use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tessera.task_scheduler import resources as res

#: Seconds a queued task is assumed to take when nothing better is known.
DEFAULT_TASK_S = 0.002
#: Bytes per second between nodes, for argument transfer estimates.
DEFAULT_BANDWIDTH = 0.7e9


@dataclass
class NodeView:
    """What the scheduler knows of one node agent (from its load reports)."""

    node_id: bytes
    incarnation: str = ""
    total: dict[str, float] = field(default_factory=dict)
    available: dict[str, float] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    seen: float = field(default_factory=time.monotonic)
    leaving: bool = False

    def can_ever(self, req: Mapping[str, float]) -> bool:
        return res.fits(req, self.total)

    def estimated_wait(self, req: Mapping[str, float], task_s: float = DEFAULT_TASK_S) -> float:
        if res.fits(req, self.available) and self.queued == 0:
            return 0.0
        slots = max(1.0, self.total.get(res.CPU, 1.0))
        return (self.queued + 1) * task_s / slots


def view_of(node_id: bytes, *, incarnation: str, total: Mapping[str, float], available: Mapping[str, float],
            queued: int, running: int, leaving: bool) -> NodeView | None:
    """A node's load report as a view; None for a report that cannot be one (an id that is not 16
    bytes, an amount that is negative or not finite): anyone on NATS can publish reports."""
    if len(node_id) != 16:
        return None
    try:
        have, free = res.check_request(total, what="total"), res.check_request(available, what="available")
    except ValueError:
        return None
    return NodeView(node_id, incarnation=incarnation, total=have, available=free, queued=queued, running=running,
                    leaving=leaving)


def choose_node(req: Mapping[str, float], nodes: Iterable[NodeView], *, arg_bytes: Mapping[bytes, Mapping[bytes, int]] | None = None,
                task_s: float = DEFAULT_TASK_S, bandwidth: float = DEFAULT_BANDWIDTH) -> NodeView | None:
    """The node with the smallest estimated wait that can ever run ``req``; None if none can.

    ``arg_bytes`` maps each argument object to ``{node_id: size}`` for the nodes
    holding a copy; an argument not on a node costs its size over ``bandwidth``.
    """
    best: tuple[float, float, bytes] | None = None
    chosen: NodeView | None = None
    for n in nodes:
        if n.leaving or not n.can_ever(req):
            continue
        transfer = 0.0
        for holders in (arg_bytes or {}).values():
            if n.node_id not in holders:
                transfer += (max(holders.values()) if holders else 0) / bandwidth
        wait = n.estimated_wait(req, task_s)
        key = (wait + transfer, -sum(n.available.values()), n.node_id)
        if best is None or key < best:
            best, chosen = key, n
    return chosen
