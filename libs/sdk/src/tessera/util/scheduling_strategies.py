"""Where tasks and actors run, under Ray's names (``ray.util.scheduling_strategies``): pass one as
``.options(scheduling_strategy=...)``, or the strings ``"DEFAULT"`` and ``"SPREAD"``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tessera.common import bundles as bnd

if TYPE_CHECKING:
    from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
    from tessera.util.placement_group import PlacementGroup


class PlacementGroupSchedulingStrategy:
    """Run in a bundle of ``placement_group`` (``placement_group_bundle_index=-1``: any of its bundles),
    on the resources the bundle reserved rather than the node's free pool."""

    def __init__(self, placement_group: PlacementGroup, placement_group_bundle_index: int = -1,
                 placement_group_capture_child_tasks: bool | None = None) -> None:
        from tessera.util.placement_group import PlacementGroup

        if not isinstance(placement_group, PlacementGroup):
            raise TypeError(f"placement_group must be a PlacementGroup, got {type(placement_group).__name__}")
        i = placement_group_bundle_index
        if isinstance(i, bool) or not isinstance(i, int) or not -1 <= i < placement_group.bundle_count:
            raise ValueError(f"placement_group_bundle_index must be -1 (any bundle) or between 0 and "
                             f"{placement_group.bundle_count - 1} (the group has {placement_group.bundle_count} "
                             f"bundle(s)), got {i!r}")
        if placement_group_capture_child_tasks:
            raise ValueError("placement_group_capture_child_tasks=True is not supported: pass the strategy to the "
                             "child tasks explicitly")
        self.placement_group = placement_group
        self.placement_group_bundle_index = i
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks

    def __repr__(self) -> str:
        return (f"PlacementGroupSchedulingStrategy({self.placement_group!r}, "
                f"placement_group_bundle_index={self.placement_group_bundle_index})")


class NodeAffinitySchedulingStrategy:
    """Run on node ``node_id`` (hex, as ``tessera.nodes()`` and the runtime context give it). With
    ``soft=False`` the work fails (TaskUnschedulableError) when that node is gone or can never run it;
    with ``soft=True`` it then runs elsewhere."""

    def __init__(self, node_id: str, soft: bool) -> None:
        try:
            raw = bytes.fromhex(node_id) if isinstance(node_id, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 16:
            raise ValueError(f"node_id must be a node id in hex (32 characters), got {node_id!r}")
        if not isinstance(soft, bool):
            raise TypeError(f"soft must be a bool, got {soft!r}")
        self.node_id = node_id
        self.soft = soft

    def __repr__(self) -> str:
        return f"NodeAffinitySchedulingStrategy(node_id={self.node_id!r}, soft={self.soft})"


_NAMED = ("DEFAULT", "SPREAD")


def check(strategy: Any) -> None:
    """Refuse what is not a scheduling strategy (ValueError naming it)."""
    if strategy is None or isinstance(strategy, PlacementGroupSchedulingStrategy | NodeAffinitySchedulingStrategy):
        return
    if strategy not in _NAMED:
        raise ValueError(f"scheduling_strategy must be 'DEFAULT', 'SPREAD', a PlacementGroupSchedulingStrategy or "
                         f"a NodeAffinitySchedulingStrategy, got {strategy!r}")


def apply(strategy: Any, spec: pb.TaskSpec) -> None:
    """Write ``strategy`` into a task or actor-creation spec: a placement group's bundle by its resources'
    names (the bundle's), the others as fields the node agent reads."""
    if strategy is None or strategy == "DEFAULT":
        return
    if strategy == "SPREAD":
        spec.scheduling_strategy = "SPREAD"
    elif isinstance(strategy, NodeAffinitySchedulingStrategy):
        spec.affinity_node_id = bytes.fromhex(strategy.node_id)
        spec.affinity_soft = strategy.soft
    elif isinstance(strategy, PlacementGroupSchedulingStrategy):
        req = bnd.renamed(strategy.placement_group.id.hex(), strategy.placement_group_bundle_index,
                          dict(spec.resources))
        spec.ClearField("resources")
        spec.resources.update(req)
