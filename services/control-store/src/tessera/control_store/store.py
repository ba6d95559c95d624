"""The Global Control Store: every table of cluster state, over sharded Redis.

This module is the domain: it validates requests, enforces state machines and
announces changes through :class:`~tessera.control_store.events.Events`. It knows
nothing of gRPC or NATS. Records are the protobuf messages of the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import re
import time
from collections.abc import Callable, Mapping, Sequence

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids as idc
from tessera.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tessera.control_store import transitions
from tessera.control_store.events import Events, Publish
from tessera.control_store.shards import ShardedRedis, guard
from tessera.control_store.tables import Table
from tessera.control_store.wire import fields

#: Largest batch accepted by the batched calls.
MAX_BATCH = 10_000
DEFAULT_LIST, MAX_LIST = 100, 10_000  # records one List call returns
MAX_KV_KEY = 1024
MAX_KV_VALUE = 4 * 1024 * 1024  # bulk bytes belong in the object store
MAX_CODE = 16 * 1024 * 1024
#: How long a freed object's id is remembered (so a late get fails at once instead of waiting for it).
FREED_TTL_S = 3600
MAX_REASON = 512

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: "$" would accept a trailing newline
_INSTANCE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")

_CREATED, _UPDATED, _DELETED, _DEAD = (pb.CHANGE_OP_CREATED, pb.CHANGE_OP_UPDATED, pb.CHANGE_OP_DELETED,
                                       pb.CHANGE_OP_DEAD)

_SPEC = b"\x0a"  # TaskRecord.spec: field 1, length-delimited

# compare-and-delete: release an actor name only if it still names this actor
_DEL_IF = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _now_ms() -> int:
    return int(time.time() * 1000)


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise InvalidArgumentError(f"{what} {value!r} must be 1-64 characters of letters, digits, '-' or '_'")
    return value


def _batch(items: Sequence[object], what: str) -> None:
    if not items:
        raise InvalidArgumentError(f"{what}: the batch is empty")
    if len(items) > MAX_BATCH:
        raise ResourceExhaustedError(f"{what}: batch of {len(items)} exceeds the limit of {MAX_BATCH}")


def _resources(res: Mapping[str, float], what: str) -> None:
    for k, v in res.items():
        if not k:
            raise InvalidArgumentError(f"{what}: a resource name is empty")
        if not v >= 0:
            raise InvalidArgumentError(f"{what}: resource {k!r} must be >= 0, got {v}")


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return None
    b[-1] += 1
    return bytes(b)


class ControlStore:
    """All tables. ``publish`` receives (subject, ChangeEvent bytes) after every write."""

    def __init__(self, db: ShardedRedis, *, publish: Publish | None = None, node_timeout_s: float = 10.0,
                 clock: Callable[[], int] = _now_ms) -> None:
        self.db = db
        self.events = Events(publish)
        self.node_timeout_ms = int(node_timeout_s * 1000)
        self.clock = clock
        self.nodes = Table(db, "nodes", "node", pb.NodeInfo, indexed=True)
        self.jobs = Table(db, "jobs", "job", pb.JobInfo, indexed=True)
        self.tasks = Table(db, "tasks", "task", pb.TaskRecord)
        self.actors = Table(db, "actors", "actor", pb.ActorInfo, indexed=True)
        self._del_if = [c.register_script(_DEL_IF) for c in db.clients]

    # ================================================================== nodes

    async def register_node(self, node: pb.NodeInfo) -> pb.NodeInfo:
        idc.check_id("node_id", node.node_id)
        if not node.address:
            raise InvalidArgumentError("node.address is required")
        _resources(node.resources_total, "node.resources_total")
        _resources(node.resources_available, "node.resources_available")
        now = self.clock()
        rec = pb.NodeInfo()
        rec.CopyFrom(node)
        rec.state = pb.NODE_STATE_ALIVE
        rec.last_heartbeat_ms = now
        if not rec.resources_available:
            rec.resources_available.update(rec.resources_total)
        old = (await self.nodes.get_many([node.node_id]))[0][0]
        if old is None:
            rec.registered_ms = now
            try:
                await self.nodes.create_many([node.node_id], [rec.SerializeToString()])
                op = _CREATED
            except AlreadyExistsError:  # a concurrent registration of the same node: update instead
                old = await self.nodes.get(node.node_id, what="node")
        if old is not None:
            def mutate(_: int, cur: pb.NodeInfo) -> pb.NodeInfo:
                if cur.state == pb.NODE_STATE_DEAD:
                    raise FailedPreconditionError(
                        f"node {node.node_id.hex()} was declared dead; register again under a new node id")
                rec.registered_ms = cur.registered_ms
                return rec

            rec = (await self.nodes.update_many([node.node_id], mutate, what="node"))[0]
            op = _UPDATED
        await guard(self.db.shard(node.node_id).zadd(b"node:heartbeats", {node.node_id.hex(): now}))
        await self.events.emit("nodes", op, [(node.node_id, rec.SerializeToString())])
        return rec

    async def node_heartbeat(self, node_id: bytes, resources_available: dict[str, float]) -> int:
        idc.check_id("node_id", node_id)
        _resources(resources_available, "resources_available")
        now = self.clock()

        def mutate(_: int, cur: pb.NodeInfo) -> pb.NodeInfo | None:
            if cur.state == pb.NODE_STATE_DEAD:
                return None
            cur.last_heartbeat_ms = now
            if resources_available:
                cur.resources_available.clear()
                cur.resources_available.update(resources_available)
            return cur

        rec = (await self.nodes.update_many([node_id], mutate, what="node"))[0]
        if rec.state != pb.NODE_STATE_DEAD:
            await guard(self.db.shard(node_id).zadd(b"node:heartbeats", {node_id.hex(): now}))
        return int(rec.state)

    async def get_node(self, node_id: bytes) -> pb.NodeInfo:
        return await self.nodes.get(idc.check_id("node_id", node_id), what="node")

    async def list_nodes(self, state: int = 0) -> list[pb.NodeInfo]:
        return [n for n in await self.nodes.all() if not state or n.state == state]

    async def reap_dead_nodes(self) -> list[pb.NodeInfo]:
        """Mark nodes silent for longer than the timeout DEAD; return those this call marked.

        Safe to run in every replica at once: the version check lets exactly one
        of them make (and announce) each transition.
        """
        cutoff = self.clock() - self.node_timeout_ms
        stale = await self.db.each(lambda c: c.zrangebyscore(b"node:heartbeats", "-inf", cutoff))
        ids = [bytes.fromhex(m.decode()) for ms in stale for m in ms]
        if not ids:
            return []
        marked: list[bytes] = []

        def mutate(_: int, cur: pb.NodeInfo) -> pb.NodeInfo | None:
            if cur.state != pb.NODE_STATE_ALIVE or cur.last_heartbeat_ms > cutoff:
                return None
            cur.state = pb.NODE_STATE_DEAD
            marked.append(cur.node_id)
            return cur

        present = [i for i, (r, _) in zip(ids, await self.nodes.get_many(ids), strict=True) if r is not None]
        recs = await self.nodes.update_many(present, mutate, what="node") if present else []
        # a node that beat after the index was read stays in it: drop only the gone and the dead
        alive = {r.node_id for r in recs if r.state == pb.NODE_STATE_ALIVE}
        for i in ids:
            if i not in alive:
                await guard(self.db.shard(i).zrem(b"node:heartbeats", i.hex()))
        dead = [r for r in recs if r.node_id in set(marked) and r.state == pb.NODE_STATE_DEAD]
        await self.events.emit("nodes", _DEAD, [(r.node_id, r.SerializeToString()) for r in dead])
        return dead

    # =================================================================== jobs

    async def create_job(self, job: pb.JobInfo) -> pb.JobInfo:
        idc.check_id("job_id", job.job_id, field="job.job_id")
        rec = pb.JobInfo()
        rec.CopyFrom(job)
        if rec.state not in (pb.JOB_STATE_UNSPECIFIED, pb.JOB_STATE_RUNNING):
            name = pb.JobState.Name(rec.state) if rec.state in pb.JobState.values() else rec.state
            raise InvalidArgumentError(f"a new job must be RUNNING, got {name}")
        rec.state = pb.JOB_STATE_RUNNING
        rec.start_ms = rec.start_ms or self.clock()
        await self.jobs.create_many([rec.job_id], [rec.SerializeToString()])
        await self.events.emit("jobs", _CREATED, [(rec.job_id, rec.SerializeToString())])
        return rec

    async def get_job(self, job_id: bytes) -> pb.JobInfo:
        return await self.jobs.get(idc.check_id("job_id", job_id), what="job")

    async def list_jobs(self) -> list[pb.JobInfo]:
        return await self.jobs.all()

    async def update_job_state(self, job_id: bytes, state: int, message: str = "") -> pb.JobInfo:
        idc.check_id("job_id", job_id)

        def mutate(_: int, cur: pb.JobInfo) -> pb.JobInfo:
            transitions.check(transitions.JOB, pb.JobState, "job", job_id.hex(), cur.state, state)
            cur.state = state  # type: ignore[assignment]
            cur.message = message or cur.message
            if state != pb.JOB_STATE_RUNNING:
                cur.end_ms = cur.end_ms or self.clock()
            return cur

        rec = (await self.jobs.update_many([job_id], mutate, what="job"))[0]
        await self.events.emit("jobs", _UPDATED, [(job_id, rec.SerializeToString())])
        return rec

    # ============================================================== functions

    async def export_function(self, job_id: bytes, name: str, code: bytes, expected: bytes = b"") -> tuple[bytes, bool]:
        if job_id:
            idc.check_id("job_id", job_id)
        if not code:
            raise InvalidArgumentError("code is empty")
        if len(code) > MAX_CODE:
            raise ResourceExhaustedError(f"code of {len(code)} bytes exceeds the limit of {MAX_CODE}")
        fid = hashlib.sha256(code).digest()
        if expected and expected != fid:
            raise InvalidArgumentError(f"expected_function_id {expected.hex()} does not match sha256(code) {fid.hex()}")
        rec = pb.FunctionInfo(function_id=fid, job_id=job_id, name=name, code=code, created_ms=self.clock())
        data = rec.SerializeToString()
        created = bool(await guard(self.db.shard(fid).set(b"function:" + fid.hex().encode(), data, nx=True)))
        if created:
            await self.events.emit("functions", _CREATED, [(fid, data)])
        return fid, created

    async def get_function(self, function_id: bytes) -> pb.FunctionInfo:
        idc.check_id("function_id", function_id)
        raw = await guard(self.db.shard(function_id).get(b"function:" + function_id.hex().encode()))
        if raw is None:
            raise NotFoundError(f"function {function_id.hex()} not found")
        return pb.FunctionInfo.FromString(raw)

    # ================================================================== tasks

    def _check_spec(self, s: pb.TaskSpec) -> None:
        # Runs once per task of every batch: compare lengths first and build an error
        # message (with the hex id) only for a spec that fails.
        tid = s.task_id
        if len(tid) != idc.TASK_ID_LEN:
            idc.check_id("task_id", tid, field="spec.task_id")
        if len(s.job_id) != idc.JOB_ID_LEN:
            idc.check_id("job_id", s.job_id, field=f"task {tid.hex()}: job_id")
        if s.actor_id:
            idc.check_id("actor_id", s.actor_id, field=f"task {tid.hex()}: actor_id")
            if not s.method_name and not s.function_id:
                raise InvalidArgumentError(f"task {tid.hex()}: an actor task needs method_name")
        elif len(s.function_id) != idc.FUNCTION_ID_LEN:
            idc.check_id("function_id", s.function_id, field=f"task {tid.hex()}: function_id")
        for a in s.arg_object_ids:
            if len(a) != idc.OBJECT_ID_LEN:
                idc.check_id("object_id", a, field=f"task {tid.hex()}: arg_object_ids")
        if s.parent_task_id:
            idc.check_id("task_id", s.parent_task_id, field=f"task {tid.hex()}: parent_task_id")
        res = s.resources
        if res:
            for k in res:
                if not k or not res[k] >= 0:
                    _resources(res, f"task {tid.hex()}")

    def _check_specs(self, specs: Sequence[pb.TaskSpec]) -> None:
        """Validate every spec; the error raised is the one the first invalid spec (in order) gives.

        The fields every task has are checked across the whole batch at once; only specs
        with something more (actor, arguments, parent) or something wrong go through
        :meth:`_check_spec` one by one.
        """
        odd: Sequence[pb.TaskSpec] = [
            s for s in specs
            if len(s.task_id) != idc.TASK_ID_LEN or len(s.job_id) != idc.JOB_ID_LEN
            or len(s.function_id) != idc.FUNCTION_ID_LEN or s.actor_id or s.arg_object_ids or s.parent_task_id
        ]
        maps = [m for m in [s.resources for s in specs] if m]
        if not all([k and m[k] >= 0 for m in maps for k in m]):
            odd = specs  # some spec has a bad resource: find the first error in order
        check = self._check_spec
        for s in odd:
            check(s)

    async def create_tasks(self, specs: Sequence[pb.TaskSpec], *, state: int = 0, replace: bool = False,
                           node_id: bytes = b"") -> int:
        _batch(specs, "CreateTasks")
        self._check_specs(specs)
        state = state or pb.TASK_STATE_PENDING
        if state not in transitions.TASK:
            raise InvalidArgumentError(f"state must be a task state, got {state}")
        if node_id:
            idc.check_id("node_id", node_id)
        now = self.clock()
        ids = [s.task_id for s in specs]
        # TaskRecord(spec=s, state=..., created_ms=now, updated_ms=now), written as the
        # spec's own bytes in field 1 followed by the other fields: the same bytes protobuf
        # would produce, without copying every spec into a new message.
        tail = pb.TaskRecord(state=state, node_id=node_id, created_ms=now, updated_ms=now).SerializeToString()  # type: ignore[arg-type]
        payloads = fields(_SPEC, [s.SerializeToString() for s in specs], tail)
        if replace:
            if len(set(ids)) != len(ids):
                raise InvalidArgumentError("a task id appears twice in the request")
            await self.tasks.put_many(ids, payloads)
        else:
            await self.tasks.create_many(ids, payloads)
        await self.events.emit("tasks", _CREATED, list(zip(ids, payloads, strict=True)))
        return len(specs)

    async def list_tasks(self, *, job_id: bytes = b"", state: int = 0,
                         limit: int = 0) -> tuple[list[pb.TaskRecord], bool]:
        """The newest ``limit`` task records held now (of ``job_id`` and in ``state`` where given), and whether
        more matched. Reads every record: for people and tools looking at a cluster, not for a hot path."""
        if job_id:
            idc.check_id("job_id", job_id)
        if state and state not in pb.TaskState.values():
            raise InvalidArgumentError(f"state must be a task state, got {state}")
        if limit > MAX_LIST:
            raise InvalidArgumentError(f"limit must be at most {MAX_LIST}, got {limit}")
        limit = limit or DEFAULT_LIST
        best: list[tuple[int, bytes, pb.TaskRecord]] = []  # a min-heap of the newest, by created_ms
        matched = 0
        async for ids in self.tasks.scan_ids():
            for rec, _ in await self.tasks.get_many(ids):
                if rec is None or (job_id and rec.spec.job_id != job_id) or (state and rec.state != state):
                    continue
                matched += 1
                item = (rec.created_ms, rec.spec.task_id, rec)
                if len(best) < limit:
                    heapq.heappush(best, item)
                elif item[:2] > best[0][:2]:
                    heapq.heapreplace(best, item)
        return [r for _, _, r in sorted(best, key=lambda t: t[:2], reverse=True)], matched > limit

    async def get_tasks(self, task_ids: Sequence[bytes]) -> list[pb.TaskRecord]:
        parse = pb.TaskRecord.FromString
        return [parse(raw) for raw in await self.get_tasks_raw(task_ids)]

    async def get_tasks_raw(self, task_ids: Sequence[bytes]) -> list[bytes]:
        """:meth:`get_tasks` as the serialized records, for callers that only pass them on."""
        _batch(task_ids, "GetTasks")
        for t in task_ids:
            if len(t) != idc.TASK_ID_LEN:
                idc.check_id("task_id", t)
        got = await self.tasks.get_raw_many(task_ids)
        missing = [i.hex() for i, (r, _) in zip(task_ids, got, strict=True) if r is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NotFoundError(f"task {missing[0]} not found{more}")
        return [r for r, _ in got]  # type: ignore[misc]

    async def update_task_states(self, updates: Sequence[pb.TaskStateUpdate]) -> list[pb.TaskRecord]:
        return [rec for rec, _ in await self.update_task_states_raw(updates)]

    async def update_task_states_raw(self, updates: Sequence[pb.TaskStateUpdate]) -> list[tuple[pb.TaskRecord, bytes]]:
        """:meth:`update_task_states`, giving each record with its serialized bytes."""
        _batch(updates, "UpdateTaskStates")
        legal = transitions.TASK
        ids = [u.task_id for u in updates]
        # the whole batch at once; on any doubt, one by one for the error of the first bad update
        if (set(map(len, ids)) != {idc.TASK_ID_LEN} or len(set(ids)) != len(ids)
                or not {u.state for u in updates} <= legal.keys()
                or not {len(n) for n in [u.node_id for u in updates] if n} <= {idc.NODE_ID_LEN}):
            seen: set[bytes] = set()
            for u in updates:
                idc.check_id("task_id", u.task_id)
                if u.node_id:
                    idc.check_id("node_id", u.node_id)
                if u.task_id in seen:
                    raise InvalidArgumentError(f"task {u.task_id.hex()} is updated twice in one request")
                seen.add(u.task_id)
                transitions.check(legal, pb.TaskState, "task", u.task_id.hex(), u.state, u.state)
        now = self.clock()
        pending, failed = pb.TASK_STATE_PENDING, pb.TASK_STATE_FAILED

        def mutate(i: int, cur: pb.TaskRecord) -> pb.TaskRecord:
            u = updates[i]
            state, old = u.state, cur.state
            if state != old and state not in legal.get(old, ()):
                transitions.check(legal, pb.TaskState, "task", u.task_id.hex(), old, state)
            if state == pending and old != pending:
                cur.attempt += 1  # a retry, or a re-run for lineage reconstruction
            cur.state = state
            if u.node_id:
                cur.node_id = u.node_id
            if u.error or state == failed:
                cur.error = u.error
            cur.updated_ms = now
            return cur

        got = await self.tasks.update_raw_many(ids, mutate, what="task")
        await self.events.emit("tasks", _UPDATED, [(i, raw) for i, (_, raw) in zip(ids, got, strict=True)])
        return got

    async def get_lineage(self, object_id: bytes, max_depth: int = 0) -> list[pb.TaskRecord]:
        """The tasks to re-run, producers first, to rebuild ``object_id`` and every lost input it needs."""
        idc.check_id("object_id", object_id)
        max_depth = max_depth or 100
        order: list[pb.TaskRecord] = []
        seen: set[bytes] = set()
        frontier = [object_id]
        for _ in range(max_depth):
            if not frontier:
                break
            made: dict[bytes, bytes] = {}  # producer -> the first object of the frontier it made
            for o in frontier:
                made.setdefault(idc.producer_task_id(o), o)
            producers = [p for p in made if p not in seen]
            got = await self.tasks.get_many(producers)
            level: list[pb.TaskRecord] = []
            for pid, (rec, _) in zip(producers, got, strict=True):
                if rec is None:
                    raise FailedPreconditionError(
                        f"object {made[pid].hex()} was not produced by a task (it was put) and cannot be rebuilt")
                seen.add(pid)
                level.append(rec)
            order.extend(level)
            args = list(dict.fromkeys(a for r in level for a in r.spec.arg_object_ids))
            if not args:
                break
            infos = {o.object_id: o for o in await self.get_objects(args)}
            frontier = [a for a in args if not (a in infos and infos[a].locations)]
        else:
            if frontier:
                raise FailedPreconditionError(f"lineage of {object_id.hex()} is deeper than max_depth={max_depth}")
        # Producers first: each task after every task of this lineage whose output it reads. (The levels
        # reversed are not enough: a task found at one level may also feed a task found deeper.)
        recs = {r.spec.task_id: r for r in order}
        out: list[pb.TaskRecord] = []
        placed: set[bytes] = set()
        visiting: set[bytes] = set()
        for root in reversed(order):
            stack = [(root.spec.task_id, False)]
            while stack:
                tid, inputs_placed = stack.pop()
                if tid in placed or (not inputs_placed and tid in visiting):
                    continue
                if inputs_placed:
                    placed.add(tid)
                    out.append(recs[tid])
                    continue
                visiting.add(tid)
                stack.append((tid, True))
                for a in recs[tid].spec.arg_object_ids:
                    producer = idc.producer_task_id(a)
                    if producer in recs and producer not in placed:
                        stack.append((producer, False))
        return out

    # ================================================================ objects

    @staticmethod
    def _okeys(oid: bytes) -> tuple[bytes, bytes]:
        h = oid.hex().encode()
        return b"object:" + h, b"object-locations:" + h

    async def add_object_locations(self, locs: Sequence[pb.ObjectLocation]) -> None:
        _batch(locs, "AddObjectLocations")
        for loc in locs:
            idc.check_id("object_id", loc.object_id)
            idc.check_id("node_id", loc.node_id)
        now = self.clock()
        groups = self.db.group([loc.object_id for loc in locs])

        async def run(shard: int, pos: list[int]) -> None:
            pipe = self.db.clients[shard].pipeline(transaction=False)
            for p in pos:
                loc = locs[p]
                info, where = self._okeys(loc.object_id)
                rec = pb.ObjectInfo(object_id=loc.object_id, size=loc.size, owner=loc.owner,
                                    producer_task_id=idc.producer_task_id(loc.object_id), created_ms=now)
                pipe.hsetnx(info, "r", rec.SerializeToString())
                pipe.sadd(where, loc.node_id)
            await pipe.execute()

        await guard(asyncio.gather(*(run(s, p) for s, p in groups.items())))
        changed = await self.get_objects(list(dict.fromkeys(loc.object_id for loc in locs)))
        await self.events.emit("objects", _UPDATED, [(o.object_id, o.SerializeToString()) for o in changed])

    async def remove_object_locations(self, locs: Sequence[pb.ObjectLocation]) -> list[bytes]:
        """Remove copies; returns the objects now left with no copy anywhere (lost)."""
        _batch(locs, "RemoveObjectLocations")
        for loc in locs:
            idc.check_id("object_id", loc.object_id)
            idc.check_id("node_id", loc.node_id)
        for loc in locs:
            await guard(self.db.shard(loc.object_id).srem(self._okeys(loc.object_id)[1], loc.node_id))
        oids = list(dict.fromkeys(loc.object_id for loc in locs))
        changed = await self.get_objects(oids)
        await self.events.emit("objects", _UPDATED, [(o.object_id, o.SerializeToString()) for o in changed])
        return [o.object_id for o in changed if not o.locations]

    @staticmethod
    def _freed_key(oid: bytes) -> bytes:
        return b"object-freed:" + oid.hex().encode()

    async def get_objects(self, object_ids: Sequence[bytes]) -> list[pb.ObjectInfo]:
        """Known objects among ``object_ids``, in request order; unknown ones are omitted. An object freed
        within the last ``FREED_TTL_S`` comes back with no locations and ``freed_reason`` set."""
        _batch(object_ids, "GetObjects")
        for o in object_ids:
            idc.check_id("object_id", o)
        out: list[pb.ObjectInfo | None] = [None] * len(object_ids)

        async def run(shard: int, pos: list[int]) -> None:
            pipe = self.db.clients[shard].pipeline(transaction=False)
            for p in pos:
                info, where = self._okeys(object_ids[p])
                pipe.hget(info, "r")
                pipe.smembers(where)
                pipe.get(self._freed_key(object_ids[p]))
            res = await pipe.execute()
            for j, p in enumerate(pos):
                raw, where, freed = res[3 * j], res[3 * j + 1], res[3 * j + 2]
                if raw is not None:
                    rec = pb.ObjectInfo.FromString(raw)
                    rec.locations.extend(sorted(where))
                    out[p] = rec
                elif freed is not None:
                    oid = object_ids[p]
                    out[p] = pb.ObjectInfo(object_id=oid, producer_task_id=idc.producer_task_id(oid),
                                           freed_reason=freed.decode(errors="replace") or "freed")

        await guard(asyncio.gather(*(run(s, p) for s, p in self.db.group(object_ids).items())))
        return [o for o in out if o is not None]

    async def free_objects(self, object_ids: Sequence[bytes], task_ids: Sequence[bytes] = (),
                           reason: str = "", *, remember: bool = False) -> int:
        """Reference counting: drop the records of objects nothing references (and of the lineage only they
        needed), announce them on ``tessera.events.objects.deleted`` so every node drops its copies, and with
        ``remember`` keep their ids as freed for ``FREED_TTL_S`` (refs to them may live elsewhere: a get then
        fails at once). Owners remember only what left their process, so Redis stays flat under churn.
        Freeing twice changes nothing."""
        if not object_ids and not task_ids:
            raise InvalidArgumentError("FreeObjects: give object_ids or task_ids")
        if object_ids:
            _batch(object_ids, "FreeObjects")
        if task_ids:
            _batch(task_ids, "FreeObjects")
        for o in object_ids:
            idc.check_id("object_id", o)
        for t in task_ids:
            idc.check_id("task_id", t)
        if len(reason) > MAX_REASON:
            raise InvalidArgumentError(f"reason is {len(reason)} characters; at most {MAX_REASON}")
        why = (reason or "freed").encode()
        n = 0

        async def run(shard: int, pos: list[int]) -> int:
            pipe = self.db.clients[shard].pipeline(transaction=False)
            for p in pos:
                pipe.delete(*self._okeys(object_ids[p]))
                if remember:
                    pipe.set(self._freed_key(object_ids[p]), why, ex=FREED_TTL_S)
            res = await pipe.execute()
            return sum(1 for r in res[0::2 if remember else 1] if r)

        if object_ids:
            n = sum(await guard(asyncio.gather(*(run(s, p) for s, p in self.db.group(object_ids).items()))))
            await self.events.emit("objects", _DELETED, [(o, why) for o in object_ids])  # the value: why
        if task_ids:
            await self.tasks.delete_many(list(task_ids))
        return n

    async def delete_objects(self, object_ids: Sequence[bytes]) -> int:
        _batch(object_ids, "DeleteObjects")
        for o in object_ids:
            idc.check_id("object_id", o)
        n = 0
        for o in object_ids:
            n += int(bool(await guard(self.db.shard(o).delete(*self._okeys(o)))))
        await self.events.emit("objects", _DELETED, [(o, b"") for o in object_ids])
        return n

    # ================================================================= actors

    @staticmethod
    def _name_key(namespace: str, name: str) -> bytes:
        return f"actor-name:{namespace}:{name}".encode()

    async def create_actor(self, actor: pb.ActorInfo) -> pb.ActorInfo:
        idc.check_id("actor_id", actor.actor_id, field="actor.actor_id")
        idc.check_id("job_id", actor.job_id, field="actor.job_id")
        idc.check_id("function_id", actor.class_function_id, field="actor.class_function_id")
        if actor.max_restarts < -1:
            raise InvalidArgumentError(f"actor.max_restarts must be >= -1, got {actor.max_restarts}")
        rec = pb.ActorInfo()
        rec.CopyFrom(actor)
        rec.namespace = check_name(rec.namespace or "default", "actor.namespace")
        rec.state = pb.ACTOR_STATE_PENDING
        rec.restarts = 0
        rec.created_ms = rec.updated_ms = self.clock()
        name_key = b""
        if rec.name:
            check_name(rec.name, "actor.name")
            name_key = self._name_key(rec.namespace, rec.name)
            ok = await guard(self.db.shard(name_key).set(name_key, rec.actor_id.hex(), nx=True))
            if not ok:
                raise AlreadyExistsError(f"an actor named {rec.name!r} already exists in namespace {rec.namespace!r}")
        try:
            await self.actors.create_many([rec.actor_id], [rec.SerializeToString()])
        except Exception:
            if name_key:
                await guard(self._del_if[self.db.index(name_key)](keys=[name_key], args=[rec.actor_id.hex()]))
            raise
        await self.events.emit("actors", _CREATED, [(rec.actor_id, rec.SerializeToString())])
        return rec

    async def get_actor(self, actor_id: bytes = b"", name: str = "", namespace: str = "") -> pb.ActorInfo:
        if actor_id and name:
            raise InvalidArgumentError("give either actor_id or name, not both")
        if name:
            ns = check_name(namespace or "default", "namespace")
            key = self._name_key(ns, check_name(name, "name"))
            hexid = await guard(self.db.shard(key).get(key))
            if hexid is None:
                raise NotFoundError(f"no live actor named {name!r} in namespace {ns!r}")
            actor_id = bytes.fromhex(hexid.decode())
        elif not actor_id:
            raise InvalidArgumentError("actor_id or name is required")
        return await self.actors.get(idc.check_id("actor_id", actor_id), what="actor")

    async def list_actors(self, state: int = 0) -> list[pb.ActorInfo]:
        return [a for a in await self.actors.all() if not state or a.state == state]

    async def update_actor(self, actor_id: bytes, state: int, *, node_id: bytes = b"", address: str = "",
                           death_cause: str = "", creation_spec: bytes = b"", if_node_id: bytes = b"",
                           clear_node: bool = False) -> pb.ActorInfo:
        """Move an actor to ``state``. ``if_node_id`` makes it conditional on the node it is recorded on (a
        compare-and-set: of the schedulers that see its node die, only the first restarts it); ``clear_node``
        forgets its node and address (it is being restarted elsewhere)."""
        idc.check_id("actor_id", actor_id)
        if node_id:
            idc.check_id("node_id", node_id)
        if if_node_id:
            idc.check_id("node_id", if_node_id, field="if_node_id")
        if clear_node and node_id:
            raise InvalidArgumentError("give either node_id or clear_node, not both")
        transitions.check(transitions.ACTOR, pb.ActorState, "actor", actor_id.hex(), state, state)
        now = self.clock()

        def mutate(_: int, cur: pb.ActorInfo) -> pb.ActorInfo:
            if if_node_id and cur.node_id != if_node_id:
                raise FailedPreconditionError(
                    f"actor {actor_id.hex()} is recorded on node {cur.node_id.hex() or '(none)'}, "
                    f"not {if_node_id.hex()}")
            transitions.check(transitions.ACTOR, pb.ActorState, "actor", actor_id.hex(), cur.state, state)
            if state == pb.ACTOR_STATE_RESTARTING and cur.state != state:
                if cur.max_restarts != -1 and cur.restarts >= cur.max_restarts:
                    raise FailedPreconditionError(
                        f"actor {actor_id.hex()} has used all {cur.max_restarts} restarts; mark it DEAD")
                cur.restarts += 1
            cur.state = state  # type: ignore[assignment]
            if clear_node:
                cur.node_id, cur.address = b"", ""
            if node_id:
                cur.node_id = node_id
            if address:
                cur.address = address
            if death_cause:
                cur.death_cause = death_cause
            if creation_spec:
                cur.creation_spec = creation_spec
            cur.updated_ms = now
            return cur

        rec = (await self.actors.update_many([actor_id], mutate, what="actor"))[0]
        if rec.state == pb.ACTOR_STATE_DEAD and rec.name:
            key = self._name_key(rec.namespace, rec.name)
            await guard(self._del_if[self.db.index(key)](keys=[key], args=[actor_id.hex()]))
        await self.events.emit("actors", _UPDATED, [(actor_id, rec.SerializeToString())])
        return rec

    # ===================================================================== kv

    @staticmethod
    def _kv_check(namespace: str, key: bytes) -> None:
        check_name(namespace, "namespace")
        if not key:
            raise InvalidArgumentError("key is empty")
        if len(key) > MAX_KV_KEY:
            raise InvalidArgumentError(f"key of {len(key)} bytes exceeds the limit of {MAX_KV_KEY}")

    @staticmethod
    def _kv_keys(namespace: str, key: bytes) -> tuple[bytes, bytes]:
        return f"kv:{namespace}:".encode() + key, f"kv-index:{namespace}".encode()

    def _kv_shard_id(self, namespace: str, key: bytes) -> bytes:
        return namespace.encode() + b"\0" + key

    async def kv_put(self, namespace: str, key: bytes, value: bytes, *, overwrite: bool) -> bool:
        self._kv_check(namespace, key)
        if len(value) > MAX_KV_VALUE:
            raise InvalidArgumentError(
                f"value of {len(value)} bytes exceeds the limit of {MAX_KV_VALUE}; put bulk bytes in the object store")
        k, idx = self._kv_keys(namespace, key)
        r = self.db.shard(self._kv_shard_id(namespace, key))
        pipe = r.pipeline(transaction=True)
        if overwrite:
            pipe.set(k, value, get=True)
        else:
            pipe.set(k, value, nx=True)
        pipe.zadd(idx, {key: 0})
        res = await guard(pipe.execute())
        if overwrite:
            created = res[0] is None
        elif not res[0]:
            raise AlreadyExistsError(f"key {key!r} already exists in namespace {namespace!r}")
        else:
            created = True
        await self.events.emit("kv", _CREATED if created else _UPDATED, [(key, value)], namespace=namespace)
        return created

    async def kv_get(self, namespace: str, key: bytes) -> bytes:
        self._kv_check(namespace, key)
        k, _ = self._kv_keys(namespace, key)
        v = await guard(self.db.shard(self._kv_shard_id(namespace, key)).get(k))
        if v is None:
            raise NotFoundError(f"key {key!r} not found in namespace {namespace!r}")
        return bytes(v)

    async def kv_delete(self, namespace: str, key: bytes) -> bool:
        self._kv_check(namespace, key)
        k, idx = self._kv_keys(namespace, key)
        pipe = self.db.shard(self._kv_shard_id(namespace, key)).pipeline(transaction=True)
        pipe.delete(k)
        pipe.zrem(idx, key)
        deleted = bool((await guard(pipe.execute()))[0])
        if deleted:
            await self.events.emit("kv", _DELETED, [(key, b"")], namespace=namespace)
        return deleted

    async def kv_list(self, namespace: str, prefix: bytes = b"") -> list[bytes]:
        check_name(namespace, "namespace")
        _, idx = self._kv_keys(namespace, b"")
        lo = b"[" + prefix if prefix else b"-"
        end = _prefix_end(prefix) if prefix else None
        hi = b"(" + end if end else b"+"
        found = await self.db.each(lambda c: c.zrangebylex(idx, lo, hi))
        return sorted(bytes(k) for ks in found for k in ks)

    # ============================================================== instances

    _INST_INDEX = b"instance:index"

    @staticmethod
    def _inst_member(service: str, instance_id: str) -> bytes:
        return f"{service}/{instance_id}".encode()

    async def register_instance(self, inst: pb.ServiceInstance, ttl_s: int) -> bool:
        check_name(inst.service, "instance.service")
        if not _INSTANCE.match(inst.instance_id):
            raise InvalidArgumentError(
                f"instance.instance_id {inst.instance_id!r} must be 1-128 characters of letters, digits, '.', ':', '-', '_'")
        if not inst.address:
            raise InvalidArgumentError("instance.address is required")
        if ttl_s < 1 or ttl_s > 86_400:
            raise InvalidArgumentError(f"ttl_s must be between 1 and 86400, got {ttl_s}")
        now = self.clock()
        rec = pb.ServiceInstance()
        rec.CopyFrom(inst)
        rec.last_seen_ms = now
        member = self._inst_member(rec.service, rec.instance_id)
        pipe = self.db.shard(member).pipeline(transaction=True)
        pipe.set(b"instance:" + member, rec.SerializeToString(), px=ttl_s * 1000, get=True)
        pipe.zadd(self._INST_INDEX, {member: now + ttl_s * 1000})
        old = (await guard(pipe.execute()))[0]
        if old is None:
            await self.events.emit("instances", _CREATED, [(member, rec.SerializeToString())])
        return old is None

    async def deregister_instance(self, service: str, instance_id: str) -> bool:
        check_name(service, "service")
        member = self._inst_member(service, instance_id)
        pipe = self.db.shard(member).pipeline(transaction=True)
        pipe.delete(b"instance:" + member)
        pipe.zrem(self._INST_INDEX, member)
        gone = bool((await guard(pipe.execute()))[1])
        if gone:
            await self.events.emit("instances", _DELETED, [(member, b"")])
        return gone

    async def list_instances(self, service: str = "") -> list[pb.ServiceInstance]:
        if service:
            check_name(service, "service")
        now = self.clock()
        out: list[pb.ServiceInstance] = []

        async def run(c: object) -> None:
            members = await c.zrangebyscore(self._INST_INDEX, now, "+inf")  # type: ignore[attr-defined]
            if service:
                members = [m for m in members if m.startswith(service.encode() + b"/")]
            if members:
                for raw in await c.mget([b"instance:" + m for m in members]):  # type: ignore[attr-defined]
                    if raw is not None:
                        out.append(pb.ServiceInstance.FromString(raw))

        await self.db.each(run)
        return sorted(out, key=lambda i: (i.service, i.instance_id))

    async def reap_expired_instances(self) -> list[bytes]:
        """Drop registrations whose TTL passed; announce each once (ZREM decides who announces)."""
        now = self.clock()
        gone: list[bytes] = []

        async def run(c: object) -> None:
            for m in await c.zrangebyscore(self._INST_INDEX, "-inf", now):  # type: ignore[attr-defined]
                if await c.zrem(self._INST_INDEX, m):  # type: ignore[attr-defined]
                    gone.append(bytes(m))

        await self.db.each(run)
        await self.events.emit("instances", _DELETED, [(m, b"") for m in gone])
        return gone

