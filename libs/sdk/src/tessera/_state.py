"""Cluster state, as Ray's state API (``ray.util.state``, public as :mod:`tessera.util.state`): list and
summarise what the control store holds.

Every ``list_*`` returns plain dicts (JSON-ready, one per record, with the same keys for every record of a
kind: :data:`COLUMNS`), newest first where records have a time. ``filters`` is a list of
``(key, predicate, value)`` with predicate ``"="`` or ``"!="``, compared as text (case-insensitively for
states); an unknown key is a ValueError naming the valid ones. ``tessera list`` and ``tessera summary``
print the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000

#: The keys of each kind's records (and so the keys a filter may name).
COLUMNS: dict[str, tuple[str, ...]] = {
    "nodes": ("node_id", "state", "address", "object_store_address", "resources_total", "resources_available",
              "labels", "registered_ms", "last_heartbeat_ms"),
    "tasks": ("task_id", "name", "state", "type", "job_id", "actor_id", "node_id", "attempt_number",
              "parent_task_id", "error", "created_ms", "updated_ms", "worker_id", "trace_id"),
    "actors": ("actor_id", "class_name", "state", "name", "namespace", "job_id", "node_id", "address",
               "restarts", "max_restarts", "death_cause", "created_ms"),
    "objects": ("object_id", "object_size", "reference_type", "owned", "refs", "process", "job_id", "worker",
                "nodes", "spilled"),
    "jobs": ("job_id", "state", "entrypoint", "driver_address", "start_ms", "end_ms", "message"),
    "pipelines": ("name", "latency_budget_ms", "operators", "registered_ms"),
    "placement-groups": ("placement_group_id", "name", "strategy", "state", "bundles", "bundles_to_node_id",
                         "is_detached", "error"),
}
RESOURCES = tuple(COLUMNS)
_PREDICATES = ("=", "!=")
_STATE_KEYS = {"state"}
Filter = tuple[str, str, Any]


def _enum(value: int, enum: Any, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def check_query(resource: str, filters: Sequence[Filter] | None, limit: int) -> list[Filter]:
    """Validate a query before anything is read: ValueError naming the unknown resource, key or predicate."""
    if resource not in COLUMNS:
        raise ValueError(f"unknown resource {resource!r}; choose one of: {', '.join(RESOURCES)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    out: list[Filter] = []
    for f in filters or ():
        if not isinstance(f, (tuple, list)) or len(f) != 3:
            raise ValueError(f"a filter is (key, predicate, value), got {f!r}")
        key, pred, value = f
        if key not in COLUMNS[resource]:
            raise ValueError(f"unknown filter key {key!r} for {resource}; valid keys: {', '.join(COLUMNS[resource])}")
        if pred not in _PREDICATES:
            raise ValueError(f"unknown predicate {pred!r} in the filter on {key!r}; use = or !=")
        out.append((key, pred, value))
    return out


def _matches(row: dict[str, Any], filters: Iterable[Filter]) -> bool:
    for key, pred, value in filters:
        have, want = str(row.get(key, "")), str(value)
        if key in _STATE_KEYS:
            have, want = have.upper(), want.upper()
        if (have == want) != (pred == "="):
            return False
    return True


def _connect(address: str | None) -> tuple[Any, Any]:
    from tessera.client._discovery import find_cluster
    from tessera.common.registry import control_store_stub

    return control_store_stub(find_cluster(address).control_store_address)


def _server_side(filters: Sequence[Filter], key: str) -> str | None:
    """The value of an ``=`` filter on ``key`` the control store can apply itself, if there is one."""
    return next((str(v) for k, p, v in filters if k == key and p == "="), None)


def _tasks(cs: Any, filters: Sequence[Filter], limit: int, timeout: float) -> tuple[list[dict[str, Any]], bool]:
    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    job = _server_side(filters, "job_id")
    state = _server_side(filters, "state")
    req = cpb.ListTasksRequest(limit=MAX_LIMIT if len(filters) > (job is not None) + (state is not None) else limit)
    if job is not None:
        try:
            req.job_id = bytes.fromhex(job)
        except ValueError as e:
            raise ValueError(f"job_id must be hex, got {job!r}") from e
    if state is not None:
        try:
            req.state = cpb.TaskState.Value("TASK_STATE_" + state.upper())
        except ValueError as e:
            states = [n.removeprefix("TASK_STATE_") for n in cpb.TaskState.keys()[1:]]
            raise ValueError(f"unknown task state {state!r}; states: {', '.join(states)}") from e
    resp = cs.ListTasks(req, timeout=timeout)
    rows = []
    for r in resp.tasks:
        s = r.spec
        kind = "ACTOR_TASK" if s.actor_id and s.method_name else ("ACTOR_CREATION_TASK" if s.actor_id else "NORMAL_TASK")
        rows.append({"task_id": s.task_id.hex(), "name": s.function_name,
                     "state": _enum(r.state, cpb.TaskState, "TASK_STATE_"), "type": kind, "job_id": s.job_id.hex(),
                     "actor_id": s.actor_id.hex(), "node_id": r.node_id.hex(), "attempt_number": r.attempt,
                     "parent_task_id": s.parent_task_id.hex(), "error": r.error, "created_ms": r.created_ms,
                     "updated_ms": r.updated_ms, "worker_id": s.worker_id.hex(), "trace_id": _trace_of(s.args)})
    return rows, bool(resp.truncated)


def _trace_of(spec: bytes) -> str:
    """The trace a task ran in (32 hex digits), from the submitted spec its record keeps; "" when untraced."""
    if not spec:
        return ""
    from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as tpb

    try:
        parts = tpb.TaskSpec.FromString(spec).traceparent.split("-")
    except Exception:  # a record written by something else: no trace to tell
        return ""
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32 else ""


def _actors(cs: Any, timeout: float) -> list[dict[str, Any]]:
    import grpc

    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    names: dict[bytes, str] = {}
    rows = []
    for a in cs.ListActors(cpb.ListActorsRequest(), timeout=timeout).actors:
        if a.class_function_id not in names:
            try:
                names[a.class_function_id] = cs.GetFunction(
                    cpb.GetFunctionRequest(function_id=a.class_function_id), timeout=timeout).function.name
            except grpc.RpcError:
                names[a.class_function_id] = ""
        rows.append({"actor_id": a.actor_id.hex(), "class_name": names[a.class_function_id],
                     "state": _enum(a.state, cpb.ActorState, "ACTOR_STATE_"), "name": a.name,
                     "namespace": a.namespace, "job_id": a.job_id.hex(), "node_id": a.node_id.hex(),
                     "address": a.address, "restarts": a.restarts, "max_restarts": a.max_restarts,
                     "death_cause": a.death_cause, "created_ms": a.created_ms})
    rows.sort(key=lambda r: -r["created_ms"])
    return rows


def _nodes(cs: Any, timeout: float) -> list[dict[str, Any]]:
    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    rows = [{"node_id": n.node_id.hex(), "state": _enum(n.state, cpb.NodeState, "NODE_STATE_"), "address": n.address,
             "object_store_address": n.object_store_address, "resources_total": dict(n.resources_total),
             "resources_available": dict(n.resources_available), "labels": dict(n.labels),
             "registered_ms": n.registered_ms, "last_heartbeat_ms": n.last_heartbeat_ms}
            for n in cs.ListNodes(cpb.ListNodesRequest(), timeout=timeout).nodes]
    rows.sort(key=lambda r: -r["registered_ms"])
    return rows


def _jobs(cs: Any, timeout: float) -> list[dict[str, Any]]:
    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    rows = [{"job_id": j.job_id.hex(), "state": _enum(j.state, cpb.JobState, "JOB_STATE_"), "entrypoint": j.entrypoint,
             "driver_address": j.driver_address, "start_ms": j.start_ms, "end_ms": j.end_ms, "message": j.message}
            for j in cs.ListJobs(cpb.ListJobsRequest(), timeout=timeout).jobs]
    rows.sort(key=lambda r: -r["start_ms"])
    return rows


#: The control store's key-value namespace where serving keeps its pipelines (one PipelineSpec per name).
PIPELINES_NAMESPACE = "serving-pipelines"


def _pipelines(cs: Any, timeout: float) -> list[dict[str, Any]]:
    import grpc

    from tessera.api.control_store.v1 import control_store_pb2 as cpb
    from tessera.api.serving.v1 import serving_pb2 as spb

    rows = []
    for key in cs.KvList(cpb.KvListRequest(namespace=PIPELINES_NAMESPACE), timeout=timeout).keys:
        try:
            raw = cs.KvGet(cpb.KvGetRequest(namespace=PIPELINES_NAMESPACE, key=key), timeout=timeout).value
        except grpc.RpcError:
            continue  # removed meanwhile
        spec = spb.PipelineSpec.FromString(raw)
        try:
            ops = len(json.loads(spec.graph_json).get("nodes", []))
        except (ValueError, AttributeError):
            ops = 0
        rows.append({"name": spec.name, "latency_budget_ms": spec.latency_budget_ms, "operators": ops,
                     "registered_ms": spec.registered_ms})
    rows.sort(key=lambda r: str(r["name"]))
    return rows


def _placement_groups(cs: Any, timeout: float) -> list[dict[str, Any]]:
    import grpc

    from tessera.api.control_store.v1 import control_store_pb2 as cpb
    from tessera.common.bundles import PLACEMENT_GROUPS_NAMESPACE as ns
    from tessera.util.placement_group import _row

    rows = []
    for key in cs.KvList(cpb.KvListRequest(namespace=ns), timeout=timeout).keys:
        if b":" in key:  # a name or a removal, not a group's record
            continue
        try:
            raw = cs.KvGet(cpb.KvGetRequest(namespace=ns, key=key), timeout=timeout).value
        except grpc.RpcError:
            continue  # removed meanwhile
        row = _row(cpb.PlacementGroup.FromString(raw))
        row["bundles"] = list(row["bundles"].values())
        row["bundles_to_node_id"] = {str(i): n for i, n in row["bundles_to_node_id"].items()}
        rows.append(row)
    return rows


def _objects(address: str | None) -> list[dict[str, Any]]:
    from tessera._memory import collect

    rows = [{"object_id": r["object_id"], "object_size": r["size"], "reference_type": r["reference"],
             "owned": r["owned"], "refs": r["refs"], "process": r["process"], "job_id": r["job_id"],
             "worker": r["worker"], "nodes": r["nodes"], "spilled": r["spilled"]}
            for r in collect(address)["objects"]]
    rows.sort(key=lambda r: -(r["object_size"] or 0))
    return rows


def list_state(resource: str, *, address: str | None = None, filters: Sequence[Filter] | None = None,
               limit: int = DEFAULT_LIMIT, timeout: float = 30.0) -> tuple[list[dict[str, Any]], bool]:
    """Records of ``resource`` (one of :data:`RESOURCES`) matching ``filters``, at most ``limit``, and whether
    more matched. Raises ValueError on a bad query, before reading anything."""
    checked = check_query(resource, filters, limit)
    if resource == "objects":
        rows = _objects(address)
    else:
        ch, cs = _connect(address)
        with ch:
            if resource == "tasks":
                rows, truncated = _tasks(cs, checked, limit, timeout)
                rows = [r for r in rows if _matches(r, checked)]
                return rows[:limit], truncated or len(rows) > limit
            fetch: dict[str, Callable[[Any, float], list[dict[str, Any]]]] = {
                "nodes": _nodes, "actors": _actors, "jobs": _jobs, "pipelines": _pipelines,
                "placement-groups": _placement_groups}
            rows = fetch[resource](cs, timeout)
    rows = [r for r in rows if _matches(r, checked)]
    return rows[:limit], len(rows) > limit


#: One task as the timeline shows it: (name, task id, node id, worker id, start µs, end µs, failed).
TaskEvent = tuple[str, bytes, bytes, bytes, int, int, bool]


def recorded_task_events(cs: Any, *, job_id: bytes = b"", limit: int = MAX_LIMIT,
                         timeout: float = 30.0) -> list[TaskEvent]:
    """The finished tasks the control store records with their run times (of ``job_id``, or of every job)."""
    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    resp = cs.ListTasks(cpb.ListTasksRequest(job_id=job_id, limit=limit), timeout=timeout)
    return [(r.spec.function_name, r.spec.task_id,
             r.node_id, r.spec.worker_id, r.spec.start_us, r.spec.end_us, r.state == cpb.TASK_STATE_FAILED)
            for r in resp.tasks if r.spec.end_us]


def chrome_trace(events: Iterable[TaskEvent]) -> list[dict[str, Any]]:
    """Chrome trace ("X") events, one per task: a process per node, a thread per worker (chrome://tracing,
    Perfetto)."""
    return [{"name": name, "cat": "task", "ph": "X", "pid": f"node {node_id.hex()}", "tid": f"worker {worker_id.hex()}",
             "ts": start_us, "dur": end_us - start_us, "args": {"task_id": task_id.hex(), "failed": failed}}
            for name, task_id, node_id, worker_id, start_us, end_us, failed in sorted(events, key=lambda e: e[4])]


def timeline(address: str | None = None, *, job_id: str = "", limit: int = MAX_LIMIT,
             timeout: float = 30.0) -> list[dict[str, Any]]:
    """The cluster's recorded tasks (of ``job_id`` in hex, or every job) as Chrome trace events: what
    ``tessera timeline`` writes. A task's record is kept while its results are alive, and a few seconds more."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    try:
        job = bytes.fromhex(job_id)
    except ValueError as e:
        raise ValueError(f"job_id must be hex, got {job_id!r}") from e
    ch, cs = _connect(address)
    with ch:
        return chrome_trace(recorded_task_events(cs, job_id=job, limit=limit, timeout=timeout))


def _lister(resource: str) -> Callable[..., list[dict[str, Any]]]:
    def list_fn(address: str | None = None, filters: Sequence[Filter] | None = None, limit: int = DEFAULT_LIMIT,
                timeout: float = 30.0) -> list[dict[str, Any]]:
        return list_state(resource, address=address, filters=filters, limit=limit, timeout=timeout)[0]

    list_fn.__name__ = list_fn.__qualname__ = f"list_{resource.replace('-', '_')}"
    list_fn.__doc__ = f"The cluster's {resource} (newest first), as dicts with keys {', '.join(COLUMNS[resource])}."
    return list_fn


list_nodes = _lister("nodes")
list_tasks = _lister("tasks")
list_actors = _lister("actors")
list_objects = _lister("objects")
list_jobs = _lister("jobs")
list_pipelines = _lister("pipelines")
list_placement_groups = _lister("placement-groups")


def _count_by(rows: Iterable[dict[str, Any]], group: str, count: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = out.setdefault(str(r[group]) or "(unnamed)", {"total": 0, "state_counts": {}})
        g["total"] += 1
        g["state_counts"][r[count]] = g["state_counts"].get(r[count], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total"]))


def summarize_tasks(address: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Tasks held now, per function (or actor method): how many, by state (as ``ray summary tasks``)."""
    rows, truncated = list_state("tasks", address=address, limit=MAX_LIMIT, timeout=timeout)
    return {"total": len(rows), "truncated": truncated, "summary": _count_by(rows, "name", "state")}


def summarize_actors(address: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Actors per class: how many, by state."""
    rows, truncated = list_state("actors", address=address, limit=MAX_LIMIT, timeout=timeout)
    return {"total": len(rows), "truncated": truncated, "summary": _count_by(rows, "class_name", "state")}


def summarize_objects(address: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Objects referenced now, per reference type: how many and their total size (each object counted once)."""
    rows, truncated = list_state("objects", address=address, limit=MAX_LIMIT, timeout=timeout)
    out: dict[str, dict[str, Any]] = {}
    seen: set[tuple[str, str]] = set()
    for r in rows:
        g = out.setdefault(r["reference_type"], {"references": 0, "objects": 0, "total_size": 0})
        g["references"] += 1
        if (r["reference_type"], r["object_id"]) not in seen:
            seen.add((r["reference_type"], r["object_id"]))
            g["objects"] += 1
            g["total_size"] += r["object_size"] or 0
    total = sum(r["object_size"] or 0 for r in {r["object_id"]: r for r in rows}.values())
    return {"total": len({r["object_id"] for r in rows}), "total_size": total, "truncated": truncated,
            "summary": dict(sorted(out.items()))}


# ---------------------------------------------------------------------- logs

#: The most of a worker's log ``get_log`` reads for one task (its section is picked out of it).
LOG_READ_MAX = 4 * 2**20


def _hex_id(name: str, value: str, length: int) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{name} must be hex, got {value!r}") from None
    if len(raw) != length:
        raise ValueError(f"{name} must be {length * 2} hex digits, got {len(value)}")
    return raw


def _log_source(cs: Any, task_id: str | None, actor_id: str | None, worker_id: str | None, node_id: str | None,
                timeout: float) -> tuple[str, dict[str, bytes]]:
    """The node agent's address and what to ask it for."""
    import grpc

    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    if sum(x is not None for x in (task_id, actor_id, worker_id)) != 1:
        raise ValueError("give one of task_id, actor_id and worker_id")
    node = _hex_id("node_id", node_id, 16) if node_id else b""
    try:
        if task_id is not None:
            tid = _hex_id("task_id", task_id, 16)
            rec = cs.GetTasks(cpb.GetTasksRequest(task_ids=[tid]), timeout=timeout).tasks[0]
            if not rec.spec.worker_id:
                raise LookupError(f"task {task_id} has not run on a worker yet (state "
                                  f"{cpb.TaskState.Name(rec.state).removeprefix('TASK_STATE_')})")
            node, ask = rec.node_id, {"worker_id": rec.spec.worker_id}
        elif actor_id is not None:
            aid = _hex_id("actor_id", actor_id, 16)
            actor = cs.GetActor(cpb.GetActorRequest(actor_id=aid), timeout=timeout).actor
            node, ask = node or actor.node_id, {"actor_id": aid}
        else:
            if not node:
                raise ValueError("a worker_id needs its node_id")
            ask = {"worker_id": _hex_id("worker_id", worker_id or "", 8)}
        cs.GetNode(cpb.GetNodeRequest(node_id=node), timeout=timeout)  # (NOT_FOUND: no such node)
        address = _agent_of(cs, node, timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            what = "task" if task_id else "actor" if actor_id else "node"
            raise LookupError(f"no such {what}: {e.details()}") from None  # type: ignore[attr-defined]
        raise
    return address, ask


def _agent_of(cs: Any, node: bytes, timeout: float) -> str:
    """The address of the node agent (task-scheduler) of ``node``: the registered one whose status names it."""
    import grpc

    from tessera.api.control_store.v1 import control_store_pb2 as cpb
    from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
    from tessera.api.task_scheduler.v1 import task_scheduler_pb2_grpc as pb_grpc
    from tessera.common import rpc

    insts = cs.ListInstances(cpb.ListInstancesRequest(service="task-scheduler"), timeout=timeout).instances
    for inst in insts:
        with rpc.channel(inst.address, default_timeout=min(timeout, 5.0)) as ch:
            try:
                if pb_grpc.TaskSchedulerServiceStub(ch).GetStatus(pb.GetStatusRequest()).node_id == node:
                    return str(inst.address)
            except grpc.RpcError:
                continue  # gone, or a global scheduler (it has no node)
    raise LookupError(f"no node agent of node {node.hex()} is registered")


def get_log(*, task_id: str | None = None, actor_id: str | None = None, worker_id: str | None = None,
            node_id: str | None = None, suffix: str = "out", tail: int = 1000, follow: bool = False,
            address: str | None = None, timeout: float = 30.0) -> Iterable[str]:
    """A worker's stdout (``suffix="out"``) or stderr (``"err"``), as Ray's ``ray.util.state.get_log``: of the
    worker that ran task ``task_id`` (its output only), of actor ``actor_id``, or of ``worker_id`` on
    ``node_id``. The last ``tail`` lines (-1: all that is kept); with ``follow``, then what is written next,
    until the worker ends. Yields lines without their newline. Raises LookupError for an unknown task, actor
    or worker, ValueError for a malformed id."""
    import time

    import grpc

    from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
    from tessera.api.task_scheduler.v1 import task_scheduler_pb2_grpc as pb_grpc
    from tessera.common import logfiles, rpc

    if suffix not in ("out", "err"):
        raise ValueError(f"suffix must be out or err, got {suffix!r}")
    ch, cs = _connect(address)
    with ch:
        agent, ask = _log_source(cs, task_id, actor_id, worker_id, node_id, timeout)
    with rpc.channel(agent, default_timeout=timeout) as ach:
        stub = pb_grpc.TaskSchedulerServiceStub(ach)

        def read(offset: int) -> pb.GetWorkerLogResponse:
            try:
                return stub.GetWorkerLog(pb.GetWorkerLogRequest(suffix=suffix, offset=offset, max_bytes=LOG_READ_MAX,
                                                                **ask), timeout=timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    raise LookupError(e.details()) from None  # type: ignore[attr-defined]
                raise

        def pick(data: bytes) -> bytes:
            return logfiles.task_section(data, task_id.lower()) if task_id else logfiles.without_markers(data)

        r = read(-LOG_READ_MAX)
        lines = pick(r.data).decode(errors="replace").splitlines()
        yield from (lines if tail < 0 else lines[-tail:] if tail else [])
        if not follow:
            return
        offset, pending = r.offset + len(r.data), b""
        while True:
            r = read(offset)
            if r.offset < offset:  # rotated meanwhile: it starts again
                pending = b""
            offset = r.offset + len(r.data)
            pending += r.data
            done, _, pending = pending.rpartition(b"\n")
            if done:
                yield from pick(done + b"\n").decode(errors="replace").splitlines()
            if not r.alive and not r.data:
                return
            if not r.data:
                time.sleep(0.25)


__all__ = ["COLUMNS", "RESOURCES", "get_log", "list_actors", "list_jobs", "list_nodes", "list_objects",
           "list_pipelines", "list_placement_groups", "list_state", "list_tasks", "summarize_actors",
           "summarize_objects", "summarize_tasks"]
