"""Utilities over tasks and actors, under Ray's names (``ray.util``): :class:`ActorPool`,
:mod:`tessera.util.queue` (a queue shared by tasks and actors), placement groups,
:mod:`tessera.util.scheduling_strategies` and :mod:`tessera.util.state` (list and summarise the cluster's
state)."""

from __future__ import annotations

from tessera.util import scheduling_strategies
from tessera.util.actor_pool import ActorPool
from tessera.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = ["ActorPool", "PlacementGroup", "get_placement_group", "placement_group", "placement_group_table",
           "remove_placement_group", "scheduling_strategies"]
