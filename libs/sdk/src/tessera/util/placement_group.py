"""Placement groups, under Ray's names (``ray.util.placement_group``): sets of resource bundles reserved
together on the cluster's nodes (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD), for tasks and actors to run
in through :class:`~tessera.util.scheduling_strategies.PlacementGroupSchedulingStrategy`.

A group is recorded in the control store; the global scheduler reserves its bundles on the node agents
(prepare on every node, record the placement, commit) and frees them when it is removed.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import grpc

from tessera import _api
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.common import bundles as bnd
from tessera.exceptions import TaskUnschedulableError

_NS = bnd.PLACEMENT_GROUPS_NAMESPACE
_STATES = {cpb.PLACEMENT_GROUP_STATE_PENDING: "PENDING", cpb.PLACEMENT_GROUP_STATE_CREATED: "CREATED",
           cpb.PLACEMENT_GROUP_STATE_REMOVED: "REMOVED", cpb.PLACEMENT_GROUP_STATE_INFEASIBLE: "INFEASIBLE",
           cpb.PLACEMENT_GROUP_STATE_RESCHEDULING: "RESCHEDULING"}


class PlacementGroup:
    """A handle on a placement group (picklable: tasks and actors may be given one)."""

    def __init__(self, id: bytes, bundle_specs: list[dict[str, float]]) -> None:
        self.id = id
        self.bundle_specs = bundle_specs

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.id.hex()}, {self.bundle_count} bundle(s))"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def ready(self) -> Any:
        """An ObjectRef that resolves (to this group) once every bundle is reserved; ``get`` raises
        TaskUnschedulableError if the group can never be placed or is removed first."""
        from tessera.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return _bundle_check.options(  # type: ignore[attr-defined]
            scheduling_strategy=PlacementGroupSchedulingStrategy(self, placement_group_bundle_index=0)).remote(self)

    def wait(self, timeout_seconds: float = 30) -> bool:
        """Whether every bundle is reserved within ``timeout_seconds``; TaskUnschedulableError if the group
        can never be placed, ValueError if it was removed."""
        if not isinstance(timeout_seconds, int | float) or math.isnan(timeout_seconds) or timeout_seconds < 0:
            raise ValueError(f"timeout_seconds must be a number >= 0, got {timeout_seconds!r}")
        deadline = time.monotonic() + timeout_seconds
        while True:
            g = _record(self.id.hex())
            if g is None or g.state == cpb.PLACEMENT_GROUP_STATE_REMOVED:
                raise ValueError(f"placement group {self.id.hex()} was removed")
            if g.state == cpb.PLACEMENT_GROUP_STATE_CREATED:
                return True
            if g.state == cpb.PLACEMENT_GROUP_STATE_INFEASIBLE:
                raise TaskUnschedulableError(g.error)
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _check_bundles(bundles: Any) -> list[dict[str, float]]:
    if not isinstance(bundles, list | tuple) or not bundles:
        raise ValueError(f"bundles must be a non-empty list of resource dicts, got {bundles!r}")
    out = []
    for i, b in enumerate(bundles):
        if not isinstance(b, dict) or not b:
            raise ValueError(f"bundle {i} must be a non-empty dict of resource amounts, got {b!r}")
        for k, v in b.items():
            if not isinstance(k, str) or not k or isinstance(v, bool) or not isinstance(v, int | float) \
                    or not math.isfinite(v) or v < 0:
                raise ValueError(f"bundle {i}: resource {k!r} must be named and have a finite amount >= 0, got {v!r}")
        if not any(v > 0 for v in b.values()):
            raise ValueError(f"bundle {i} asks for no resources (every amount is 0): {b!r}")
        if "GPU" in b and b["GPU"] > 1 and b["GPU"] != int(b["GPU"]):
            raise ValueError(f"bundle {i}: more than one GPU must be a whole number, got {b['GPU']}")
        out.append({str(k): float(v) for k, v in b.items() if v > 0})
    return out


def placement_group(bundles: list[dict[str, float]], strategy: str = "PACK", name: str = "",
                    lifetime: str | None = None) -> PlacementGroup:
    """Reserve ``bundles`` (each a dict of resources, e.g. ``{"CPU": 1}``) on the cluster under
    ``strategy``; returns at once (use ``ready()`` or ``wait()``), as Ray does."""
    specs = _check_bundles(bundles)
    if strategy not in bnd.STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(bnd.STRATEGIES)}, got {strategy!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {name!r}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    st = _api.state()
    cs = st.control_store()
    pg_id = os.urandom(16)
    if name:
        try:
            cs.KvPut(cpb.KvPutRequest(namespace=_NS, key=(bnd.NAME_PREFIX + name).encode(), value=pg_id.hex().encode(),
                                      overwrite=False), timeout=10.0)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                raise ValueError(f"a placement group named {name!r} already exists") from None
            raise
    g = cpb.PlacementGroup(placement_group_id=pg_id, name=name, strategy=strategy,
                           bundles=[cpb.Bundle(resources=b) for b in specs], state=cpb.PLACEMENT_GROUP_STATE_PENDING,
                           detached=lifetime == "detached", creator_job_id=st.core.job_id,
                           created_ms=int(time.time() * 1000))
    cs.KvPut(cpb.KvPutRequest(namespace=_NS, key=pg_id.hex().encode(), value=g.SerializeToString(), overwrite=False),
             timeout=10.0)
    return PlacementGroup(pg_id, specs)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Free the group's bundles: actors in it are killed, tasks in it fail, waiting work fails."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"remove_placement_group takes a PlacementGroup, got {type(placement_group).__name__}")
    _api.control_store().KvPut(cpb.KvPutRequest(namespace=_NS, key=b"remove:" + placement_group.id.hex().encode(),
                                                 value=b"", overwrite=True), timeout=10.0)


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The group named ``placement_group_name``; ValueError if there is none."""
    cs = _api.control_store()
    try:
        pg_hex = cs.KvGet(cpb.KvGetRequest(namespace=_NS, key=(bnd.NAME_PREFIX + placement_group_name).encode()),
                          timeout=10.0).value.decode()
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise ValueError(f"Failed to look up placement group with name: {placement_group_name}") from None
        raise
    g = _record(pg_hex)
    if g is None:
        raise ValueError(f"Failed to look up placement group with name: {placement_group_name}")
    return PlacementGroup(g.placement_group_id, [dict(b.resources) for b in g.bundles])


def _record(pg_hex: str) -> cpb.PlacementGroup | None:
    try:
        raw = _api.control_store().KvGet(cpb.KvGetRequest(namespace=_NS, key=pg_hex.encode()), timeout=10.0).value
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            return None
        raise
    return cpb.PlacementGroup.FromString(raw)


def _row(g: cpb.PlacementGroup) -> dict[str, Any]:
    return {"placement_group_id": g.placement_group_id.hex(), "name": g.name, "strategy": g.strategy,
            "state": _STATES.get(g.state, "PENDING"),
            "bundles": {i: dict(b.resources) for i, b in enumerate(g.bundles)},
            "bundles_to_node_id": {i: b.node_id.hex() for i, b in enumerate(g.bundles) if b.node_id},
            "is_detached": g.detached, "error": g.error}


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict[str, Any]:
    """Ray's table of placement groups: by id in hex (or the one row of ``placement_group``)."""
    if placement_group is not None:
        g = _record(placement_group.id.hex())
        return _row(g) if g is not None else {}
    cs = _api.control_store()
    out: dict[str, Any] = {}
    for k in cs.KvList(cpb.KvListRequest(namespace=_NS), timeout=10.0).keys:
        if b":" not in k:
            g = _record(k.decode())
            if g is not None:
                out[k.decode()] = _row(g)
    return out


def _check_ready(pg: PlacementGroup) -> PlacementGroup:
    return pg


def _make_check() -> Any:
    from tessera._remote import remote

    return remote(num_cpus=0, max_retries=0)(_check_ready)


_bundle_check = _make_check()
