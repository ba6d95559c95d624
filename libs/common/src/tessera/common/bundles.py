"""How placement-group bundles show up as resources (shared by the SDK and the node agents).

A reserved bundle takes its resources out of its node's free pool and offers them again under names of
its own, as Ray does: ``CPU`` in bundle 1 of group ``g`` becomes ``CPU_group_1_g`` (this bundle) and
``CPU_group_g`` (any bundle of the group), plus ``bundle_group_1_g`` / ``bundle_group_g`` (1000 each) so
that work asking for no resources still lands in a bundle. A task in a bundle asks for the renamed
resources, so the ordinary scheduling (fits, spill, placement) puts it there and only there.
"""

from __future__ import annotations

from collections.abc import Mapping

#: The control store's kv namespace of placement groups (key: group id in hex).
PLACEMENT_GROUPS_NAMESPACE = "placement_groups"
#: Its keys for names: ``name:<name>`` -> the group id in hex.
NAME_PREFIX = "name:"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: Units of ``bundle_group_*`` a bundle offers; work asking for no resources takes BUNDLE_SHARE of them.
BUNDLE_UNITS = 1000.0
BUNDLE_SHARE = 0.001
_MARK = "_group_"


def renamed(pg_hex: str, index: int, req: Mapping[str, float]) -> dict[str, float]:
    """What work in bundle ``index`` of group ``pg_hex`` (-1: any of its bundles) asks for instead of ``req``."""
    tag = pg_hex if index < 0 else f"{index}_{pg_hex}"
    out = {f"{k}{_MARK}{tag}": float(v) for k, v in req.items() if v > 0}
    out[f"bundle{_MARK}{tag}"] = BUNDLE_SHARE
    return out


def offered(pg_hex: str, index: int, req: Mapping[str, float]) -> dict[str, float]:
    """What a reserved bundle adds to its node's resources (its own names and the group's wildcard ones)."""
    out: dict[str, float] = {}
    for tag in (f"{index}_{pg_hex}", pg_hex):
        for k, v in req.items():
            out[f"{k}{_MARK}{tag}"] = float(v)
        out[f"bundle{_MARK}{tag}"] = BUNDLE_UNITS
    return out


def group_of(resource: str) -> str:
    """The group id (hex) a renamed resource belongs to; "" for an ordinary resource."""
    _, mark, tail = resource.rpartition(_MARK)
    if not mark:
        return ""
    return tail.rpartition("_")[2]


def groups_in(req: Mapping[str, float]) -> set[str]:
    return {g for g in map(group_of, req) if g}
