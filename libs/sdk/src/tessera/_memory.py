"""``tessera memory`` (as ``ray memory``): the objects every process holds, by owner, and each node's store.

Every driver and worker publishes its reference table in the control store's key-value
table (namespace ``refs``, one key per process, refreshed when it changes and at least
every 10 s); this reads them all, adds each object's size and copies from the control
store, and each node's usage from its object store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}MiB"


def collect(address: str | None) -> dict[str, Any]:
    import grpc

    from tessera.api.control_store.v1 import control_store_pb2 as cpb
    from tessera.api.object_store.v1 import object_store_pb2 as opb
    from tessera.api.object_store.v1 import object_store_pb2_grpc as opb_grpc
    from tessera.client._discovery import find_cluster
    from tessera.common import rpc
    from tessera.common.names import REFS_NAMESPACE, REFS_STALE_S
    from tessera.common.registry import control_store_stub

    cluster = find_cluster(address)
    ch, cs = control_store_stub(cluster.control_store_address)
    with ch:
        keys = cs.KvList(cpb.KvListRequest(namespace=REFS_NAMESPACE), timeout=10.0).keys
        now = time.time()
        owners: list[dict[str, Any]] = []
        for k in keys:
            try:
                doc = json.loads(cs.KvGet(cpb.KvGetRequest(namespace=REFS_NAMESPACE, key=k), timeout=10.0).value)
            except grpc.RpcError:
                continue  # gone meanwhile
            if now - float(doc.get("time", 0)) <= float(doc.get("stale_s", REFS_STALE_S)):  # its own staleness
                owners.append(doc)
        oids = list(dict.fromkeys(bytes.fromhex(r["object_id"]) for o in owners for r in o["rows"]))
        infos: dict[bytes, Any] = {}
        for i in range(0, len(oids), 5000):
            for info in cs.GetObjects(cpb.GetObjectsRequest(object_ids=oids[i:i + 5000]), timeout=10.0).objects:
                infos[info.object_id] = info
        nodes = [n for n in cs.ListNodes(cpb.ListNodesRequest(), timeout=10.0).nodes if n.state != cpb.NODE_STATE_DEAD]
    rows: list[dict[str, Any]] = []
    for o in owners:
        for r in o["rows"]:
            info = infos.get(bytes.fromhex(r["object_id"]))
            rows.append({**r, "process": o["process"], "job_id": o["job_id"], "worker": o["worker"],
                         "size": int(info.size) if info is not None else None,
                         "nodes": [n.hex() for n in info.locations] if info is not None else []})
    stores: list[dict[str, Any]] = []
    spilled: set[tuple[str, str]] = set()  # (object id, node id): that copy is on the node's disk only
    for n in nodes:
        row: dict[str, Any] = {"node_id": n.node_id.hex(), "address": n.object_store_address}
        try:
            with rpc.stream_channel(n.object_store_address) as sch:
                stub = opb_grpc.ObjectStoreServiceStub(sch)
                s = stub.GetStats(opb.GetStatsRequest(), timeout=5.0)
                here = [o for o, info in infos.items() if n.node_id in info.locations]
                for i in range(0, len(here), 5000):
                    got = stub.ContainsObjects(opb.ContainsObjectsRequest(object_ids=here[i:i + 5000]), timeout=10.0)
                    spilled.update((o.hex(), n.node_id.hex()) for o, sp in zip(here[i:i + 5000], got.spilled,
                                                                              strict=False) if sp)
            row.update(capacity=s.capacity, used=s.used, pinned=s.pinned, objects=s.objects,
                       spilled_objects=s.spilled_objects, spilled_bytes=s.spilled_bytes)
        except grpc.RpcError as e:
            row["error"] = f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
        stores.append(row)
    for r in rows:
        r["spilled"] = [n for n in r["nodes"] if (r["object_id"], n) in spilled]
    return {"objects": rows, "owners": [{k: o[k] for k in ("process", "job_id", "worker", "more")} for o in owners],
            "nodes": stores}


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    rows = report["objects"]
    total = sum(r["size"] or 0 for r in rows if r["owned"])
    lines.append(f"== objects: {len(rows)} references, {_mib(total)} owned")
    by_owner: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_owner.setdefault(f"{'worker' if r['worker'] else 'driver'} {r['process']} (job {r['job_id'][:12]})",
                            []).append(r)
    for owner, rs in sorted(by_owner.items()):
        lines.append(f"-- {owner}")
        lines.append(f"   {'object id':40}  {'size':>11}  {'reference':18}  {'refs':>4}  copies on (*: spilled)")
        for r in sorted(rs, key=lambda r: -(r["size"] or 0)):
            size = _mib(r["size"]) if r["size"] is not None else ("in process" if not r["stored"] else "-")
            where = ",".join(n[:8] + ("*" if n in r["spilled"] else "") for n in r["nodes"]) or "-"
            kind = r["reference"] + ("" if r["owned"] else " (not owner)")
            lines.append(f"   {r['object_id']:40}  {size:>11}  {kind:18}  {r['refs']:>4}  {where}")
    for o in report["owners"]:
        if o["more"]:
            lines.append(f"   ({o['process']}: {o['more']} more not listed)")
    lines.append("== object stores")
    for n in report["nodes"]:
        if "error" in n:
            lines.append(f"   node {n['node_id'][:8]} at {n['address']}: {n['error']}")
            continue
        lines.append(f"   node {n['node_id'][:8]}  {_mib(n['used'])}/{_mib(n['capacity'])} used, "
                     f"{_mib(n['pinned'])} pinned, {n['objects']} objects, {n['spilled_objects']} spilled "
                     f"({_mib(n['spilled_bytes'])})")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("memory", help="objects held by every driver and worker, by owner, and each node's store")
    p.add_argument("--address", default=None, help="the control store's host:port (default: this machine's cluster)")
    p.add_argument("--json", action="store_true")


def cmd_memory(args: argparse.Namespace) -> int:
    from tessera.client._discovery import ClusterNotFoundError

    try:
        report = collect(args.address)
    except ClusterNotFoundError as e:
        print(f"tessera memory: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # the control store is unreachable, a wrong address: one line, not a traceback
        code = getattr(e, "code", None)
        what = f"{code().name}: {e.details()}" if callable(code) else str(e)  # type: ignore[attr-defined]
        print(f"tessera memory: cannot read the cluster at {args.address or 'this machine'}: {what}",
              file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
