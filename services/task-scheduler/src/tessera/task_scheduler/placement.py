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


class InfeasibleGroup(Exception):
    """No set of the cluster's nodes can ever hold a placement group (the message says why)."""


def place_bundles(bundles: list[Mapping[str, float]], strategy: str, nodes: Iterable[NodeView]) -> list[bytes] | None:
    """The node of each bundle (in order) under ``strategy``, using what the nodes have free now; None when
    they cannot hold the group now but could once busy resources come free; InfeasibleGroup when no
    amount of waiting helps (a bundle larger than every node, more STRICT_SPREAD bundles than nodes, a
    STRICT_PACK group larger than every node).

    PACK puts bundles on as few nodes as it can (best effort); STRICT_PACK on one node; SPREAD on as many
    nodes as it can (best effort); STRICT_SPREAD on distinct nodes, as in Ray."""
    live = sorted((n for n in nodes if not n.leaving), key=lambda n: n.node_id)
    totals = [n.total for n in live]
    for i, b in enumerate(bundles):
        if not any(n.can_ever(b) for n in live):
            raise InfeasibleGroup(res.infeasible_message(f"bundle {i} of the placement group", b, totals))
    if strategy == "STRICT_SPREAD" and len(bundles) > len(live):
        raise InfeasibleGroup(f"STRICT_SPREAD needs {len(bundles)} distinct nodes, and the cluster has "
                              f"{len(live)} node(s)")
    if strategy == "STRICT_SPREAD":
        feasible = [[n for n in live if n.can_ever(b)] for b in bundles]
        if not _distinct(bundles, feasible, {n.node_id: dict(n.total) for n in live}):
            raise InfeasibleGroup(f"STRICT_SPREAD: no {len(bundles)} distinct nodes of the cluster can each hold "
                                  f"one of its bundles")
    if strategy == "STRICT_PACK":
        whole: dict[str, float] = {}
        for b in bundles:
            res.release(b, whole)
        if not any(n.can_ever(whole) for n in live):
            raise InfeasibleGroup(res.infeasible_message("the STRICT_PACK placement group (all bundles on one node)",
                                                         whole, totals))
        for n in sorted(live, key=lambda n: -sum(n.available.values())):
            if res.fits(whole, n.available):
                return [n.node_id] * len(bundles)
        return None
    free = {n.node_id: dict(n.available) for n in live}
    if strategy == "STRICT_SPREAD":
        now = [[n for n in live if res.fits(b, n.available)] for b in bundles]
        return _distinct(bundles, now, free)
    chosen: list[bytes] = []
    for b in bundles:
        fit = [n for n in live if res.fits(b, free[n.node_id])]
        if not fit:
            return None
        used = set(chosen)
        if strategy == "PACK":  # nodes already used first, then the one with the most free
            pick = min(fit, key=lambda n: (n.node_id not in used, -sum(free[n.node_id].values()), n.node_id))
        else:  # SPREAD: nodes not used yet first
            pick = min(fit, key=lambda n: (chosen.count(n.node_id), -sum(free[n.node_id].values()), n.node_id))
        res.acquire(b, free[pick.node_id])
        chosen.append(pick.node_id)
    return chosen


def _distinct(bundles: list[Mapping[str, float]], candidates: list[list[NodeView]],
              free: dict[bytes, dict[str, float]]) -> list[bytes] | None:
    """One distinct node per bundle among its candidates (backtracking: groups are small)."""
    out: list[bytes] = []

    def go(i: int) -> bool:
        if i == len(bundles):
            return True
        for n in candidates[i]:
            if n.node_id not in out and res.fits(bundles[i], free[n.node_id]):
                out.append(n.node_id)
                if go(i + 1):
                    return True
                out.pop()
        return False

    return out if go(0) else None
