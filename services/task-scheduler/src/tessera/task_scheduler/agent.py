"""The node agent's local scheduler: queues, leased workers, actors, spill-over.

Pure bookkeeping: it reacts to events (a submission, a worker's result, a worker's
death, an object becoming available, a peer's load report) and says what to do
through :class:`Ports`, which the wiring implements over gRPC, NATS and
processes. Nothing here blocks or does I/O.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common import bundles as bnd
from tessera.task_scheduler import resources as res
from tessera.task_scheduler.placement import NodeView, choose_node

log = logging.getLogger(__name__)

#: Inline values kept for arguments of later tasks on this node.
CACHE_BYTES = 32 * 2**20
#: What one remembered object costs beyond its value (the key, the bytes object, the dict's entry): without
#: it, objects with empty or tiny values (stored results, None) were nearly free and the cache grew forever.
ENTRY_BYTES = 200
#: Scanned past a head-of-line task that does not fit.
LOOKAHEAD = 64
#: After an agent starts, how long until it has heard every live peer (each reports at least every second):
#: until then a request no known node can meet waits for the nodes not heard yet, rather than failing.
JOIN_GRACE_S = 2.0
#: How long a worker of a runtime_env stays idle before it is stopped (the node's own workers stay): a job that
#: ran many runtime_envs leaves no processes behind for them.
ENV_IDLE_S = 60.0


class Ports(Protocol):
    """What the agent asks its surroundings to do."""

    def execute(self, worker_id: bytes, spec: pb.TaskSpec) -> None: ...
    def interrupt(self, worker_id: bytes, task_ids: list[bytes], *, force: bool, recursive: bool) -> None:
        """Tell a worker to cancel tasks it runs (and, ``recursive``, what they submitted); ``force``: the
        worker is then stopped (after a short grace in which it cancels what they submitted)."""
        ...
    def start_worker(self, *, actor_id: bytes = b"", gpu_ids: Sequence[str] = (), runtime_env: str = "") -> bytes:
        """A new worker process (its id); ``runtime_env``: what it runs with, for its life (TaskSpec.runtime_env)."""
        ...
    def stop_worker(self, worker_id: bytes) -> None: ...
    def deliver(self, owner_node: bytes, results: list[pb.TaskResult]) -> None: ...
    def spill(self, specs: list[pb.TaskSpec]) -> None: ...
    def forward(self, node_id: bytes, specs: list[pb.TaskSpec]) -> None: ...
    def control(self, node_id: bytes, ctl: pb.Control) -> None: ...
    def locate_objects(self, object_ids: list[bytes]) -> None: ...
    def locate_actor(self, actor_id: bytes) -> None: ...
    def record_created(self, specs: list[pb.TaskSpec]) -> None: ...
    def actor_state(self, actor_id: bytes, state: str, cause: str = "", spec: pb.TaskSpec | None = None) -> None: ...


@dataclass
class Worker:
    worker_id: bytes
    actor_id: bytes = b""
    task: pb.TaskSpec | None = None
    held: dict[str, float] = field(default_factory=dict)
    blocked: int = 0
    ready: bool = False
    #: The GPUs its process sees (CUDA_VISIBLE_DEVICES): a worker started for one GPU task runs only that
    #: task and then exits (as Ray's GPU tasks do, which frees the GPU memory it took).
    gpu_ids: tuple[str, ...] = ()
    once: bool = False
    #: The runtime_env it runs with ("": the node's own): it only ever runs tasks of that runtime_env.
    env: str = ""


@dataclass
class Actor:
    spec: pb.TaskSpec  # the creation task
    worker_id: bytes = b""
    state: str = "PENDING"  # PENDING, ALIVE, RESTARTING, DEAD
    queue: deque[pb.TaskSpec] = field(default_factory=deque)
    # calls sent to its worker, not finished (in order): the worker runs as many at once as its
    # concurrency allows, and keeps the rest in order
    inflight: dict[bytes, pb.TaskSpec] = field(default_factory=dict)
    restarts: int = 0
    cause: str = ""
    held: dict[str, float] = field(default_factory=dict)
    gpu_ids: tuple[str, ...] = ()


@dataclass
class Reservation:
    """The bundles of one placement group held on this node: PREPAREd (taken from the free pool, not
    usable yet, returned if no COMMIT comes in time), then COMMITted (offered under the bundle's names)."""

    bundles: dict[int, dict[str, float]]
    since: float
    committed: bool = False

    def whole(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles.values():
            res.release(b, out)
        return out


def error_result(spec: pb.TaskSpec, kind: int, message: str, node_id: bytes = b"") -> pb.TaskResult:
    return pb.TaskResult(task_id=spec.task_id, owner=spec.owner, node_id=node_id, attempt=spec.attempt,
                         error=pb.TaskError(kind=kind, message=message))  # type: ignore[arg-type]


class NodeAgent:
    """One node's scheduler state."""

    def __init__(self, node_id: bytes, total: dict[str, float], ports: Ports, *, max_queue_per_cpu: float = 4.0,
                 unschedulable_after_s: float = 60.0, max_workers: int = 64, gpu_ids: Sequence[str] | None = None,
                 join_grace_s: float = JOIN_GRACE_S, env_idle_s: float = ENV_IDLE_S) -> None:
        self.node_id = node_id
        self.total = dict(total)
        self.available = dict(total)
        self.gpus = res.GpuSlots(gpu_ids if gpu_ids is not None else res.gpu_ids(total.get(res.GPU, 0.0), None))
        self.gpu_actors: deque[bytes] = deque()  # actors waiting for GPU ids to come free
        self.retired: set[bytes] = set()  # GPU tasks' workers stopped before they said hello
        self.started = time.monotonic()
        self.join_grace_s = join_grace_s
        self.joining: set[bytes] = set()  # registered in the control store, not reporting yet
        self.heard: set[bytes] = set()  # every peer that ever reported (one that left is not joining)
        self.ports = ports
        self.max_queue_per_cpu = max_queue_per_cpu
        self.unschedulable_after_s = unschedulable_after_s
        self.max_workers = max_workers
        self.workers: dict[bytes, Worker] = {}
        self.idle: deque[bytes] = deque()
        self.starting = 0
        # Workers of a runtime_env run nothing else (env vars, cwd and sys.path are the process's): a pool each.
        self.env_idle: dict[str, deque[bytes]] = {}
        self.env_starting: dict[str, int] = {}
        self.env_of: dict[bytes, str] = {}  # started for a runtime_env, not ready yet
        self.idle_since: dict[bytes, float] = {}  # workers of a runtime_env: when they went idle
        self.env_idle_s = env_idle_s
        self.queue: deque[tuple[pb.TaskSpec, dict[str, float]]] = deque()  # ready: (spec, its request)
        self.waiting: dict[bytes, tuple[pb.TaskSpec, set[bytes]]] = {}
        self.by_object: dict[bytes, set[bytes]] = {}
        self.objects: OrderedDict[bytes, bytes] = OrderedDict()  # known to exist; inline value or b""
        self.object_bytes = 0
        self.running: dict[bytes, bytes] = {}  # task id -> worker id
        self.actors: dict[bytes, Actor] = {}
        self.actor_nodes: dict[bytes, bytes] = {}  # remote actors: actor id -> node id
        self.actor_waiting: dict[bytes, list[pb.TaskSpec]] = {}  # calls to actors not located yet
        # calls to actors elsewhere, for owners here: task id -> (node id, the call)
        self.forwarded_calls: dict[bytes, tuple[bytes, pb.TaskSpec]] = {}
        self.dead_actors: dict[bytes, str] = {}
        self.owned_remote: dict[bytes, tuple[bytes, str]] = {}  # actors placed elsewhere for local owners
        self.spilled: dict[bytes, tuple[pb.TaskSpec, bytes, float]] = {}  # task id -> (spec, node or b"", when)
        self.unschedulable: dict[bytes, tuple[pb.TaskSpec, float]] = {}
        self.peers: dict[bytes, NodeView] = {}
        self.reservations: dict[str, Reservation] = {}  # placement group id (hex) -> its bundles here
        self.pg_waiting: dict[bytes, pb.TaskSpec] = {}  # work for a bundle no node offers yet (group pending)
        self.gone_groups: OrderedDict[str, str] = OrderedDict()  # removed or infeasible groups -> why
        self._spread_next = 0
        self.finished = 0
        self.spilled_count = 0
        self.received = 0

    # ------------------------------------------------------------------ views

    def load(self) -> NodeView:
        return NodeView(self.node_id, total=dict(self.total), available=dict(self.available),
                        queued=len(self.queue) + len(self.waiting), running=len(self.running))

    def _feasible_somewhere(self, req: dict[str, float]) -> bool:
        return res.fits(req, self.total) or any(p.can_ever(req) and not p.leaving for p in self.peers.values())

    def nodes_registered(self, node_ids: Iterable[bytes]) -> None:
        """The nodes the control store lists as alive and newly registered: those not reporting yet are joining."""
        self.joining = {n for n in node_ids if n != self.node_id and n not in self.heard}
        if self.unschedulable and not self._joining(time.monotonic()):
            self._retry_unschedulable()

    def _joining(self, now: float) -> bool:
        """Whether a node may still join that this agent has not heard from (then infeasible requests wait)."""
        return bool(self.joining) or now - self.started < self.join_grace_s

    def _node_totals(self) -> list[dict[str, float]]:
        return [self.total, *(p.total for p in self.peers.values() if not p.leaving)]

    def _fail_infeasible(self, spec: pb.TaskSpec) -> None:
        msg = res.infeasible_message(spec.name, dict(spec.resources), self._node_totals())
        log.warning("%s", msg)
        self._finish(spec, error_result(spec, pb.ERROR_KIND_UNSCHEDULABLE, msg))
        if spec.kind == pb.TASK_KIND_ACTOR_CREATE:  # the actor never starts: its calls fail rather than wait for it
            self.ports.actor_state(spec.actor_id, "DEAD", msg)
            self.actor_located(spec.actor_id, b"", dead=msg)

    def _busy(self) -> bool:
        cpus = max(1.0, self.total.get(res.CPU, 1.0))
        return len(self.queue) >= self.max_queue_per_cpu * cpus

    # ------------------------------------------------------------------ submissions

    def submit(self, specs: Iterable[pb.TaskSpec], *, local: bool) -> None:
        """Tasks from a client on this node (``local``) or forwarded by another node."""
        created = []
        for spec in specs:
            if not local:
                self.received += 1
            if local and spec.kind == pb.TASK_KIND_NORMAL and spec.attempt == 0:
                created.append(spec)
            self._route(spec, local=local)
        if created:
            self.ports.record_created(created)
        self.pump()

    def _route(self, spec: pb.TaskSpec, *, local: bool) -> None:
        if spec.kind == pb.TASK_KIND_ACTOR_METHOD:
            self._actor_call(spec)
            return
        req = dict(spec.resources)
        if local and (spec.affinity_node_id or spec.scheduling_strategy == "SPREAD") and self._steer(spec, req):
            return
        if not res.fits(req, self.total):
            groups = bnd.groups_in(req)
            if groups and self._wait_for_group(spec, req, groups):
                return
            if local:
                self._place_elsewhere(spec)
            elif not self._feasible_somewhere(req) and not self._joining(time.monotonic()):
                self._fail_infeasible(spec)  # no node can ever run it: its owner hears now
            else:  # sent here by mistake (stale view): give it back to the global scheduler
                self.spilled_count += 1
                self.ports.spill([spec])
            return
        if spec.kind == pb.TASK_KIND_ACTOR_CREATE:
            self._create_actor(spec)
            return
        if local and self._busy() and self._peer_has_room(req):
            self._spill(spec)
            return
        self._enqueue(spec)

    def _steer(self, spec: pb.TaskSpec, req: dict[str, float]) -> bool:
        """Scheduling strategies: NodeAffinity sends work to its node (hard: fails if that node is gone or can
        never run it; soft: else places it as usual); SPREAD sends each task to the next node, in turn, of
        those that can run it. True when the work was sent (or failed) here."""
        target = spec.affinity_node_id
        if target:
            if target == self.node_id and res.fits(req, self.total):
                return False  # runs here, as usual
            peer = self.peers.get(target)
            if peer is not None and not peer.leaving and peer.can_ever(req):
                self._send(peer.node_id, spec)
                return True
            if spec.affinity_soft:
                return False
            has = self.total if target == self.node_id else peer.total if peer is not None else None
            why = "is not alive" if has is None else f"has only {res.describe(has)}"
            msg = (f"{spec.name} needs {res.describe(req)} on node {target.hex()} "
                   f"(NodeAffinitySchedulingStrategy, soft=False), and that node {why}")
            self._finish(spec, error_result(spec, pb.ERROR_KIND_UNSCHEDULABLE, msg))
            if spec.kind == pb.TASK_KIND_ACTOR_CREATE:
                self.ports.actor_state(spec.actor_id, "DEAD", msg)
                self.actor_located(spec.actor_id, b"", dead=msg)
            return True
        nodes = sorted([self.node_id, *(p.node_id for p in self.peers.values() if not p.leaving and p.can_ever(req))])
        if self.node_id not in nodes or not res.fits(req, self.total):
            nodes = [n for n in nodes if n != self.node_id]
        if not nodes:
            return False
        pick = nodes[self._spread_next % len(nodes)]
        self._spread_next += 1
        if pick == self.node_id:
            return False
        self._send(pick, spec)
        return True

    def _send(self, node_id: bytes, spec: pb.TaskSpec) -> None:
        """Work this node's client submitted, sent to run on ``node_id`` (followed as spilled work is)."""
        if spec.kind == pb.TASK_KIND_ACTOR_CREATE:
            self.actor_nodes[spec.actor_id] = node_id
            if not spec.detached:
                self.owned_remote[spec.actor_id] = (node_id, spec.owner)
        else:
            self.spilled_count += 1
            self.spilled[spec.task_id] = (spec, node_id, time.monotonic())
        self.ports.forward(node_id, [spec])

    def _wait_for_group(self, spec: pb.TaskSpec, req: dict[str, float], groups: set[str]) -> bool:
        """Work for a placement group's bundle: it fails if the group is gone, waits while no node offers the
        bundle (the group is pending), else is placed as usual. True when it failed or waits."""
        gone = [self.gone_groups[g] for g in groups if g in self.gone_groups]
        if gone:
            self._fail_group(spec, gone[0])
            return True
        if self._feasible_somewhere(req):
            return False
        self.pg_waiting[spec.task_id] = spec
        return True

    def _fail_group(self, spec: pb.TaskSpec, why: str) -> None:
        self._finish(spec, error_result(spec, pb.ERROR_KIND_UNSCHEDULABLE, f"{spec.name}: {why}"))
        if spec.kind == pb.TASK_KIND_ACTOR_CREATE:
            self.ports.actor_state(spec.actor_id, "DEAD", why)
            self.actor_located(spec.actor_id, b"", dead=why)

    def _retry_pg_waiting(self) -> None:
        for tid, spec in list(self.pg_waiting.items()):
            req = dict(spec.resources)
            if self._feasible_somewhere(req) or bnd.groups_in(req) & set(self.gone_groups):
                del self.pg_waiting[tid]
                self._route(spec, local=True)
        self.pump()

    # ------------------------------------------------------------------ placement-group bundles

    def prepare_bundles(self, pg: str, bundles: dict[int, dict[str, float]], now: float) -> str:
        """Take a group's bundles for this node out of the free pool (PREPARE): "" when done (or held
        already), else why not. Usable only once committed; returned by :meth:`expire_prepared` if not."""
        if pg in self.reservations:
            return ""
        if pg in self.gone_groups:
            return f"placement group {pg} is gone: {self.gone_groups[pg]}"
        r = Reservation({i: dict(b) for i, b in bundles.items()}, now)
        need = r.whole()
        if not res.fits(need, self.available):
            return (f"node {self.node_id.hex()[:8]} has {res.describe(self.available)} free, "
                    f"and the bundles need {res.describe(need)}")
        res.acquire(need, self.available)
        self.reservations[pg] = r
        return ""

    def commit_bundles(self, pg: str, bundles: dict[int, dict[str, float]], now: float) -> str:
        """Offer a group's bundles here under their own names (COMMIT; prepares them first if needed, e.g.
        after this agent restarted): "" when done, else why not."""
        if pg not in self.reservations:
            why = self.prepare_bundles(pg, bundles, now)
            if why:
                return why
        r = self.reservations[pg]
        if r.committed:
            return ""
        r.committed = True
        for i, b in r.bundles.items():
            for k, v in bnd.offered(pg, i, b).items():
                self.total[k] = self.total.get(k, 0.0) + v
                self.available[k] = self.available.get(k, 0.0) + v
        self._retry_pg_waiting()
        self.pump()
        return ""

    def return_bundles(self, pg: str, why: str) -> None:
        """Give a group's bundles back to the free pool; what runs in them (actors, tasks) is stopped."""
        r = self.reservations.pop(pg, None)
        if r is None:
            return
        if r.committed:
            for aid, a in list(self.actors.items()):
                if a.state != "DEAD" and pg in bnd.groups_in(a.spec.resources):
                    self.kill_actor(aid, cause=why)
            for spec in [s for s, _ in self.queue if pg in bnd.groups_in(s.resources)]:
                self._dequeue(spec.task_id)
                self._fail_group(spec, why)
            doomed = [tid for tid, wid in self.running.items()
                      if (w := self.workers.get(wid)) is not None and pg in bnd.groups_in(w.held)]
            if doomed:
                self.cancel(doomed, force=True, recursive=True)
            for i, b in r.bundles.items():
                for k in bnd.offered(pg, i, b):
                    self.total.pop(k, None)
                    self.available.pop(k, None)
        res.release(r.whole(), self.available)
        self.pump()

    def group_gone(self, pg: str, why: str) -> None:
        """A placement group was removed (or can never be placed): its bundles here are returned and the
        work waiting for it fails with ``why``."""
        self.gone_groups[pg] = why
        while len(self.gone_groups) > 10000:
            self.gone_groups.popitem(last=False)
        self.return_bundles(pg, why)
        for tid, spec in list(self.pg_waiting.items()):
            if pg in bnd.groups_in(spec.resources):
                del self.pg_waiting[tid]
                self._fail_group(spec, why)

    def expire_prepared(self, now: float, ttl_s: float) -> None:
        """Return bundles prepared and never committed (their coordinator died or gave up)."""
        for pg, r in list(self.reservations.items()):
            if not r.committed and now - r.since > ttl_s:
                self.return_bundles(pg, "not committed in time")

    def _peer_has_room(self, req: dict[str, float]) -> bool:
        return any(not p.leaving and res.fits(req, p.available) and p.queued == 0 for p in self.peers.values())

    def _place_elsewhere(self, spec: pb.TaskSpec) -> None:
        req = dict(spec.resources)
        if not self._feasible_somewhere(req):
            if not self._joining(time.monotonic()):
                self._fail_infeasible(spec)
                return
            log.warning("%s needs %s; no node has that yet, and nodes are joining: waiting up to %.0fs for one",
                        spec.name, res.describe(req), self.unschedulable_after_s)
            self.unschedulable[spec.task_id] = (spec, time.monotonic())
            return
        if spec.kind == pb.TASK_KIND_ACTOR_CREATE:
            node = choose_node(req, self.peers.values())
            if node is None:
                self.unschedulable[spec.task_id] = (spec, time.monotonic())
                return
            self.actor_nodes[spec.actor_id] = node.node_id
            if not spec.detached:
                self.owned_remote[spec.actor_id] = (node.node_id, spec.owner)
            self.ports.forward(node.node_id, [spec])
            return
        self._spill(spec)

    def _spill(self, spec: pb.TaskSpec) -> None:
        self.spilled_count += 1
        self.spilled[spec.task_id] = (spec, b"", time.monotonic())
        self.ports.spill([spec])

    def _enqueue(self, spec: pb.TaskSpec) -> None:
        missing = {a.object_id for a in spec.args if a.WhichOneof("kind") == "object_id" and a.object_id not in self.objects}
        if not missing:
            self.queue.append((spec, dict(spec.resources)))
            return
        self.waiting[spec.task_id] = (spec, missing)
        for oid in missing:
            self.by_object.setdefault(oid, set()).add(spec.task_id)
        self.ports.locate_objects(sorted(missing))

    def assigned(self, task_ids: Iterable[bytes], node_id: bytes) -> None:
        """The global scheduler placed spilled tasks on ``node_id``."""
        for tid in task_ids:
            entry = self.spilled.get(tid)
            if entry is not None:
                self.spilled[tid] = (entry[0], node_id, time.monotonic())

    # ------------------------------------------------------------------ objects

    def objects_available(self, values: dict[bytes, bytes]) -> None:
        """Objects now exist (value: inline bytes, or b"" when only in the object store)."""
        woken = False
        for oid, data in values.items():
            self._remember(oid, data)
            for tid in self.by_object.pop(oid, ()):
                entry = self.waiting.get(tid)
                if entry is None:
                    continue
                entry[1].discard(oid)
                if not entry[1]:
                    del self.waiting[tid]
                    self.queue.append((entry[0], dict(entry[0].resources)))
                    woken = True
        if woken:
            self.pump()

    def waiting_objects(self) -> list[bytes]:
        return list(self.by_object)

    def _remember(self, oid: bytes, data: bytes) -> None:
        old = self.objects.pop(oid, None)
        if old is not None:
            self.object_bytes -= len(old) + ENTRY_BYTES
        if old and not data:
            data = old
        self.objects[oid] = data
        self.object_bytes += len(data) + ENTRY_BYTES
        while self.object_bytes > CACHE_BYTES and self.objects:
            _, d = self.objects.popitem(last=False)
            self.object_bytes -= len(d) + ENTRY_BYTES

    # ------------------------------------------------------------------ dispatch

    def pump(self) -> None:
        """Dispatch queued tasks to idle workers (a GPU task: to a worker of its own) while resources last."""
        queue, avail = self.queue, self.available
        # requests found not to fit in this pass: tasks behind one that asks the same are passed over without
        # checking again (resources only come free between passes)
        unfit: list[dict[str, float]] = []
        i = 0
        while queue and i < len(queue) and i < LOOKAHEAD:
            spec, req = queue[i]
            gpu = req.get(res.GPU)
            if req in unfit:
                i += 1
                continue
            if spec.runtime_env and not gpu:
                if not res.fits(req, avail):
                    unfit.append(req)
                    i += 1
                    continue
                pool = self.env_idle.get(spec.runtime_env)
                if not pool:
                    self._grow_env(spec.runtime_env)
                    i += 1
                    continue
                del queue[i]
                wid = pool.pop()  # the most recently idle (see below)
                self.idle_since.pop(wid, None)
                self._run(wid, spec, req)
                continue
            if not res.fits(req, avail):
                unfit.append(req)
                i += 1
                continue
            if not gpu and not self.idle:
                self._grow()  # a worker more only for work that could run now: none is started to sit idle
                return
            if gpu:
                gpus = self.gpus.assign(gpu)
                if gpus is None:  # enough GPU in sum, but split across devices in shares too small
                    i += 1
                    continue
                del queue[i]
                self._run_on_gpus(spec, req, gpus)
                continue
            del queue[i]
            # The worker idle for the shortest time: its caches and page tables are warm (a task reading an
            # object another task just wrote in shared memory maps no page afresh), and the workers a burst
            # started but no longer needed stay idle at the front, the first to be retired.
            self._run(self.idle.pop(), spec, req)

    def _live(self) -> int:
        """Task workers, running or starting."""
        return sum(1 for w in self.workers.values() if not w.actor_id) + self.starting \
            + sum(self.env_starting.values())

    def _grow(self) -> None:
        if self.starting == 0 and (self._live() < self.max_workers or self._retire_idle("")):
            self.starting += 1
            self.ports.start_worker()

    def _grow_env(self, env: str) -> None:
        """Start a worker for tasks of runtime_env ``env`` (one at a time), making room by stopping an idle
        worker of another runtime_env when the node has as many workers as it may."""
        if self.env_starting.get(env, 0) or (self._live() >= self.max_workers and not self._retire_idle(env)):
            return
        self.env_starting[env] = self.env_starting.get(env, 0) + 1
        self.env_of[self.ports.start_worker(runtime_env=env)] = env

    def _retire_idle(self, keep: str) -> bool:
        """Stop an idle task worker whose runtime_env is not ``keep``; whether there was one."""
        for env, pool in [("", self.idle), *self.env_idle.items()]:
            if env != keep and pool:
                wid = pool.popleft()
                self.idle_since.pop(wid, None)
                self.workers.pop(wid, None)
                self.retired.add(wid)  # its exit is then expected: nothing ran in it
                self.ports.stop_worker(wid)
                return True
        return False

    def _idle_of(self, w: Worker) -> deque[bytes]:
        return self.env_idle.setdefault(w.env, deque()) if w.env else self.idle

    def _to_idle(self, w: Worker) -> None:
        if w.env:
            self.idle_since[w.worker_id] = time.monotonic()
        self._idle_of(w).append(w.worker_id)

    def _stop_idle_env_workers(self, now: float) -> None:
        """Stop the workers of a runtime_env idle for env_idle_s (a pool's oldest idle worker is its first)."""
        for env, pool in list(self.env_idle.items()):
            while pool and now - self.idle_since.get(pool[0], now) > self.env_idle_s:
                wid = pool.popleft()
                self.idle_since.pop(wid, None)
                self.workers.pop(wid, None)
                self.retired.add(wid)
                self.ports.stop_worker(wid)
            if not pool and not self.env_starting.get(env):
                del self.env_idle[env]
                self.env_starting.pop(env, None)

    def _run_on_gpus(self, spec: pb.TaskSpec, req: dict[str, float], gpus: tuple[str, ...]) -> None:
        """A GPU task runs in a worker of its own that sees only its GPUs (CUDA_VISIBLE_DEVICES is read once,
        when CUDA starts in a process), and that exits after it."""
        res.acquire(req, self.available)
        wid = self.ports.start_worker(gpu_ids=gpus, runtime_env=spec.runtime_env)
        self.workers[wid] = Worker(wid, task=spec, held=req, gpu_ids=gpus, once=True, env=spec.runtime_env)
        self.running[spec.task_id] = wid

    def _run(self, wid: bytes, spec: pb.TaskSpec, req: dict[str, float]) -> None:
        w = self.workers[wid]
        res.acquire(req, self.available)
        w.task, w.held = spec, req
        self.running[spec.task_id] = wid
        self.ports.execute(wid, self._with_values(spec))

    def _with_values(self, spec: pb.TaskSpec) -> pb.TaskSpec:
        """Inline argument values this node holds, so the worker need not fetch them."""
        if not any(a.WhichOneof("kind") == "object_id" and self.objects.get(a.object_id) for a in spec.args):
            return spec
        out = pb.TaskSpec()
        out.CopyFrom(spec)
        for a in out.args:
            if a.WhichOneof("kind") == "object_id":
                data = self.objects.get(a.object_id)
                if data:
                    a.value = data
        return out

    # ------------------------------------------------------------------ workers

    def worker_ready(self, wid: bytes, *, actor_id: bytes = b"") -> None:
        if wid in self.retired:  # started for a GPU task cancelled meanwhile: it sees GPUs, so it serves no other
            self.retired.discard(wid)
            self.ports.stop_worker(wid)
            return
        w = self.workers.get(wid)
        if w is None:
            w = self.workers[wid] = Worker(wid, actor_id=actor_id, env=self.env_of.pop(wid, ""))
        w.ready = True
        if w.once:
            if w.task is not None:
                self.ports.execute(wid, self._with_values(w.task))
            return
        if actor_id:
            a = self.actors.get(actor_id)
            if a is None or a.state == "DEAD":
                self.ports.stop_worker(wid)
                return
            a.worker_id = wid
            self.ports.execute(wid, self._with_values(a.spec))
            return
        if w.env:
            self.env_starting[w.env] = max(0, self.env_starting.get(w.env, 0) - 1)
        else:
            self.starting = max(0, self.starting - 1)
        self._to_idle(w)
        self.pump()

    def worker_blocked(self, wid: bytes, delta: int) -> None:
        """A worker waits in ``get`` (+1) or runs again (-1): lend its CPU meanwhile."""
        w = self.workers.get(wid)
        if w is None or w.task is None:
            return
        cpu = {k: v for k, v in w.held.items() if k == res.CPU}
        if delta > 0 and w.blocked == 0:
            res.release(cpu, self.available)
            w.blocked = 1
            self.pump()
            self._grow_if_starved()
        elif delta < 0 and w.blocked:
            res.acquire(cpu, self.available)
            w.blocked = 0

    def _grow_if_starved(self) -> None:
        if self.queue and not self.idle:
            self._grow()

    def task_done(self, wid: bytes, result: pb.TaskResult) -> None:
        w = self.workers.get(wid)
        if w is None:
            return
        if result.partial:
            self._stream_item(w, result)
            return
        if w.actor_id:
            self._actor_done(w, result)
            return
        spec = w.task
        if spec is None or spec.task_id != result.task_id:
            return
        self.running.pop(spec.task_id, None)
        self._free(w)
        if w.once:
            self.ports.stop_worker(wid)  # its death is then reported with nothing running in it
        else:
            self._to_idle(w)
        self._finish(spec, result)
        self.pump()

    def _stream_item(self, w: Worker, result: pb.TaskResult) -> None:
        """A value a generator task yielded: to its owner now; the task runs on (nothing is released)."""
        if w.actor_id:
            a = self.actors.get(w.actor_id)
            spec = a.inflight.get(result.task_id) if a is not None else None
        else:
            spec = w.task if w.task is not None and w.task.task_id == result.task_id else None
        if spec is None:
            return
        result.node_id = self.node_id
        result.owner = spec.owner
        result.attempt = spec.attempt
        self.ports.deliver(spec.owner_node_id, [result])
        values = {r.object_id: (r.value if not r.stored else b"") for r in result.returns}
        if values:
            self.objects_available(values)

    def _free(self, w: Worker) -> None:
        held = dict(w.held)
        if w.blocked:
            held.pop(res.CPU, None)
        res.release(held, self.available)
        for k in held:
            if k not in self.total:  # a bundle's resource, and the bundle was returned meanwhile
                self.available.pop(k, None)
        if w.gpu_ids:
            self.gpus.release(w.gpu_ids, w.held.get(res.GPU, 0.0))
            w.gpu_ids = ()
        w.task, w.held, w.blocked = None, {}, 0

    def _finish(self, spec: pb.TaskSpec, result: pb.TaskResult) -> None:
        self.finished += 1
        result.node_id = self.node_id
        result.owner = spec.owner
        result.attempt = spec.attempt
        # Small values go to their owner only (as in Ray); the owner stores one in the object
        # store if a ref to it leaves the owner. Large ones are in the object store already.
        values = {r.object_id: (r.value if not r.stored else b"") for r in result.returns}
        self.ports.deliver(spec.owner_node_id, [result])
        if values:
            self.objects_available(values)

    def worker_died(self, wid: bytes, why: str) -> None:
        if wid in self.retired:
            self.retired.discard(wid)
            return
        w = self.workers.pop(wid, None)
        if w is None:
            env = self.env_of.pop(wid, None)
            if env:
                self.env_starting[env] = max(0, self.env_starting.get(env, 0) - 1)
                self.pump()  # its tasks start another
            else:
                self.starting = max(0, self.starting - 1)
            return
        pool = self._idle_of(w)
        self.idle_since.pop(wid, None)
        if wid in pool:
            pool.remove(wid)
        if w.actor_id:
            self._actor_worker_died(w, why)
            return
        spec = w.task
        if spec is not None:
            self.running.pop(spec.task_id, None)
            self._free(w)
            self._retry_or_fail(spec, f"the worker running {spec.name} died ({why})")
        self._grow_if_starved()
        self.pump()

    def _retry_or_fail(self, spec: pb.TaskSpec, why: str) -> None:
        if spec.max_retries < 0 or spec.attempt < spec.max_retries:
            retry = pb.TaskSpec()
            retry.CopyFrom(spec)
            retry.attempt += 1
            log.warning("%s; retrying (attempt %d)", why, retry.attempt)
            self.queue.appendleft((retry, dict(retry.resources)))
            return
        self._finish(spec, error_result(spec, pb.ERROR_KIND_WORKER_CRASHED, f"{why}; no retries left"))

    # ------------------------------------------------------------------ actors

    def _create_actor(self, spec: pb.TaskSpec) -> None:
        old = self.actors.get(spec.actor_id)
        if old is not None and old.state != "DEAD":
            return  # a duplicate creation (resubmitted after a reconnect)
        a = self.actors[spec.actor_id] = Actor(spec, restarts=spec.actor_restarts)
        for call in self.actor_waiting.pop(spec.actor_id, []):
            a.queue.append(call)
        if spec.resources.get(res.GPU):
            self.gpu_actors.append(spec.actor_id)  # started once GPU ids are free for it
            self._start_gpu_actors()
            return
        a.held = dict(spec.resources)
        res.acquire(a.held, self.available)
        self.ports.start_worker(actor_id=spec.actor_id, runtime_env=spec.runtime_env)

    def _start_gpu_actors(self) -> None:
        """Start the actors waiting for GPUs, in order, while GPU ids can be assigned to them."""
        while self.gpu_actors:
            a = self.actors.get(self.gpu_actors[0])
            if a is None or a.state != "PENDING" or a.worker_id:
                self.gpu_actors.popleft()
                continue
            gpus = self.gpus.assign(a.spec.resources[res.GPU])
            if gpus is None:
                return
            self.gpu_actors.popleft()
            a.gpu_ids = gpus
            a.held = dict(a.spec.resources)
            res.acquire(a.held, self.available)
            self.ports.start_worker(actor_id=a.spec.actor_id, gpu_ids=gpus, runtime_env=a.spec.runtime_env)

    def _actor_call(self, spec: pb.TaskSpec) -> None:
        aid = spec.actor_id
        a = self.actors.get(aid)
        if a is not None:
            if a.state == "DEAD":
                self._finish(spec, error_result(spec, pb.ERROR_KIND_ACTOR_DIED, f"the actor is dead: {a.cause}"))
                return
            a.queue.append(spec)
            self._actor_next(a)
            return
        if aid in self.dead_actors:
            self._finish(spec, error_result(spec, pb.ERROR_KIND_ACTOR_DIED, f"the actor is dead: {self.dead_actors[aid]}"))
            return
        node = self.actor_nodes.get(aid)
        if node is not None and node != self.node_id:
            if spec.owner_node_id == self.node_id:
                self.forwarded_calls[spec.task_id] = (node, spec)
            self.ports.forward(node, [spec])
            return
        first = aid not in self.actor_waiting
        self.actor_waiting.setdefault(aid, []).append(spec)
        if first:
            self.ports.locate_actor(aid)

    def actor_located(self, actor_id: bytes, node_id: bytes, *, dead: str = "") -> None:
        """Where an actor lives (from the control store), or that it is dead. An actor restarted on another
        node (its node died) is found here again: its owner's record follows it."""
        if not dead and node_id == self.node_id and actor_id not in self.actors:
            # The record says here, but this agent does not host it (restarted): the actor is gone.
            dead = "its node agent restarted"
        calls = self.actor_waiting.pop(actor_id, [])
        if dead:
            self.dead_actors[actor_id] = dead
            for c in calls:
                self._finish(c, error_result(c, pb.ERROR_KIND_ACTOR_DIED, f"the actor is dead: {dead}"))
            return
        self.actor_nodes[actor_id] = node_id
        owned = self.owned_remote.get(actor_id)
        if owned is not None:
            self.owned_remote[actor_id] = (node_id, owned[1])
        for c in calls:
            self._actor_call(c)

    def _actor_next(self, a: Actor) -> None:
        if a.state != "ALIVE" or not a.worker_id or not a.queue:
            return
        if a.worker_id not in self.workers:
            return
        while a.queue:  # all of them: the worker orders them and runs as many at once as the actor allows
            spec = a.queue.popleft()
            a.inflight[spec.task_id] = spec
            self.ports.execute(a.worker_id, self._with_values(spec))

    def _actor_done(self, w: Worker, result: pb.TaskResult) -> None:
        a = self.actors.get(w.actor_id)
        if a is None:
            return
        spec = a.inflight.pop(result.task_id, None)
        if spec is None and result.task_id == a.spec.task_id:
            spec = a.spec
        if spec is None:
            return
        if spec.kind == pb.TASK_KIND_ACTOR_CREATE:
            if result.HasField("error"):
                self._actor_dead(a, f"its constructor raised: {result.error.message}")
                self._finish(spec, result)
                self.ports.stop_worker(w.worker_id)
                return
            first = a.state == "PENDING"
            a.state = "ALIVE"
            # the first start on this node records the creation task with the actor: what a scheduler submits
            # again should this node die
            self.ports.actor_state(spec.actor_id, "ALIVE", spec=spec if first and not spec.actor_restarts else None)
            if first and not spec.actor_restarts:  # a restart elsewhere: its owner had this result long ago
                self._finish(spec, result)
        else:
            self._finish(spec, result)
        self._actor_next(a)

    def _actor_worker_died(self, w: Worker, why: str) -> None:
        a = self.actors.get(w.actor_id)
        if a is None or a.state == "DEAD":
            return
        restarts = a.spec.max_restarts < 0 or a.restarts < a.spec.max_restarts
        running, a.inflight = list(a.inflight.values()), {}
        again: list[pb.TaskSpec] = []
        for call in running:
            # max_task_retries (the call's max_retries): sent again to the restarted actor, in its order
            if restarts and (call.max_retries < 0 or call.attempt < call.max_retries):
                retry = pb.TaskSpec()
                retry.CopyFrom(call)
                retry.attempt += 1
                again.append(retry)
                continue
            self._finish(call, error_result(call, pb.ERROR_KIND_ACTOR_DIED,
                                            f"the actor's process died while running {call.name} ({why})"))
        a.queue.extendleft(reversed(again))
        if restarts:
            a.restarts += 1
            a.state = "RESTARTING"
            a.worker_id = b""
            log.warning("actor %s died (%s); restarting (%d)", a.spec.name, why, a.restarts)
            self.ports.actor_state(a.spec.actor_id, "RESTARTING")
            self.ports.start_worker(actor_id=a.spec.actor_id, gpu_ids=a.gpu_ids, runtime_env=a.spec.runtime_env)
            return
        self._actor_dead(a, f"its process died ({why}) and it has no restarts left")

    def _actor_dead(self, a: Actor, cause: str) -> None:
        a.state, a.cause = "DEAD", cause
        res.release(a.held, self.available)
        if a.gpu_ids:
            self.gpus.release(a.gpu_ids, a.held.get(res.GPU, 0.0))
            a.gpu_ids = ()
            self._start_gpu_actors()
        a.held = {}
        self.dead_actors[a.spec.actor_id] = cause
        self.ports.actor_state(a.spec.actor_id, "DEAD", cause)
        running, a.inflight = list(a.inflight.values()), {}
        for c in running:
            self._finish(c, error_result(c, pb.ERROR_KIND_ACTOR_DIED, f"the actor is dead: {cause}"))
        while a.queue:
            c = a.queue.popleft()
            self._finish(c, error_result(c, pb.ERROR_KIND_ACTOR_DIED, f"the actor is dead: {cause}"))
        self.pump()

    def owner_gone(self, owner: str) -> None:
        """A session ended: its actors go with it (unless detached), as in Ray."""
        for aid, a in list(self.actors.items()):
            if a.state != "DEAD" and a.spec.owner == owner and a.spec.owner_node_id == self.node_id \
                    and not a.spec.detached:
                self.kill_actor(aid, cause="its owner went away")
        for aid, node in list(self.owned_remote.items()):
            if node[1] == owner:
                del self.owned_remote[aid]
                self.ports.control(node[0], pb.Control(kill_actor=[aid]))

    def kill_actor(self, actor_id: bytes, *, cause: str = "killed by tessera.kill") -> None:
        a = self.actors.get(actor_id)
        if a is not None:
            if a.state != "DEAD":
                wid = a.worker_id
                self._actor_dead(a, cause)
                if wid:
                    self.workers.pop(wid, None)
                    self.ports.stop_worker(wid)
            return
        node = self.actor_nodes.get(actor_id)
        if node is not None and node != self.node_id:
            self.ports.control(node, pb.Control(kill_actor=[actor_id]))

    # ------------------------------------------------------------------ cancellation

    def cancel(self, task_ids: Iterable[bytes], *, force: bool, recursive: bool = True) -> None:
        """Ray's cancel: a queued task fails with TaskCancelledError here; a running one is interrupted by its
        worker (which reports it cancelled), or with ``force`` its worker is stopped. A finished or unknown
        task is left alone."""
        for tid in task_ids:
            spec = self._dequeue(tid)
            if spec is not None:
                self._finish(spec, error_result(spec, pb.ERROR_KIND_CANCELLED, "cancelled"))
                continue
            wid = self.running.get(tid)
            if wid is not None:
                if not force:
                    self.ports.interrupt(wid, [tid], force=False, recursive=recursive)
                    continue
                w = self.workers.pop(wid)
                self.running.pop(tid, None)
                if w.once and not w.ready:
                    self.retired.add(wid)
                if w.task is not None:
                    spec = w.task
                    self._free(w)
                    self._finish(spec, error_result(spec, pb.ERROR_KIND_CANCELLED, "cancelled (its worker was stopped)"))
                self.ports.interrupt(wid, [tid], force=True, recursive=recursive)
                self.pump()
                continue
            if self._cancel_actor_call(tid, recursive=recursive):
                continue
            entry = self.spilled.get(tid)
            node = entry[1] if entry is not None else self.forwarded_calls.get(tid, (b"",))[0]
            if node:
                self.ports.control(node, pb.Control(cancel=[tid], force=force, recursive=recursive))

    def _cancel_actor_call(self, tid: bytes, *, recursive: bool) -> bool:
        """A call to an actor here: dropped if queued, else its worker cancels it (an async actor's coroutine
        is cancelled; a call already running in a sync actor runs on, as in Ray)."""
        for a in self.actors.values():
            for i, c in enumerate(a.queue):
                if c.task_id == tid:
                    del a.queue[i]
                    self._finish(c, error_result(c, pb.ERROR_KIND_CANCELLED, "cancelled"))
                    return True
            if tid in a.inflight and a.worker_id:
                self.ports.interrupt(a.worker_id, [tid], force=False, recursive=recursive)
                return True
        for calls in self.actor_waiting.values():
            for i, c in enumerate(calls):
                if c.task_id == tid:
                    del calls[i]
                    self._finish(c, error_result(c, pb.ERROR_KIND_CANCELLED, "cancelled"))
                    return True
        return False

    def _dequeue(self, tid: bytes) -> pb.TaskSpec | None:
        for i, (s, _) in enumerate(self.queue):
            if s.task_id == tid:
                del self.queue[i]
                return s
        entry = self.waiting.pop(tid, None)
        if entry is not None:
            for oid in entry[1]:
                self.by_object.get(oid, set()).discard(tid)
            return entry[0]
        u = self.unschedulable.pop(tid, None)
        return u[0] if u else None

    # ------------------------------------------------------------------ results from elsewhere, peers, time

    def remote_results(self, results: Iterable[pb.TaskResult]) -> list[pb.TaskResult]:
        """Results of tasks that ran elsewhere for owners here; returns those to deliver."""
        out = []
        values = {}
        for r in results:
            if not r.partial:  # a generator's item: the task still runs there
                self.spilled.pop(r.task_id, None)
                self.forwarded_calls.pop(r.task_id, None)
            for v in r.returns:
                values[v.object_id] = v.value if not v.stored else b""
            out.append(r)
        if values:
            self.objects_available(values)
        return out

    def peer_load(self, view: NodeView) -> None:
        if view.node_id == self.node_id:
            return
        old = self.peers.get(view.node_id)
        self.peers[view.node_id] = view
        self.joining.discard(view.node_id)
        self.heard.add(view.node_id)
        if old is not None and old.incarnation and old.incarnation != view.incarnation:
            self._node_lost(view.node_id, "its agent restarted")
        if view.leaving:
            self._node_lost(view.node_id, "its agent stopped")
            del self.peers[view.node_id]
        if self.unschedulable:
            self._retry_unschedulable()
        if self.pg_waiting and (old is None or old.total != view.total):
            self._retry_pg_waiting()

    def _retry_unschedulable(self) -> None:
        joining = self._joining(time.monotonic())
        for tid, (spec, _) in list(self.unschedulable.items()):
            if self._feasible_somewhere(dict(spec.resources)):
                del self.unschedulable[tid]
                self._route(spec, local=True)
            elif not joining:
                del self.unschedulable[tid]
                self._fail_infeasible(spec)

    def _node_lost(self, node_id: bytes, why: str) -> None:
        """Work placed on a node that is gone is placed again; calls sent to its actors fail (as in Ray, a call
        in flight to an actor whose node died raises ActorDiedError), and later calls look the actors up again
        (a scheduler restarts them elsewhere, when they have restarts left)."""
        self._place_again(lambda node: node == node_id, f"placed on node {node_id.hex()[:8]}, and {why}")
        for aid, node in list(self.actor_nodes.items()):
            if node == node_id:
                del self.actor_nodes[aid]
        for tid, (node, call) in list(self.forwarded_calls.items()):
            if node == node_id:
                del self.forwarded_calls[tid]
                self._finish(call, error_result(call, pb.ERROR_KIND_ACTOR_DIED,
                                                f"the actor's node {node_id.hex()} was lost while it ran {call.name} "
                                                f"({why})"))
        self.pump()

    def messages_lost(self) -> None:
        """The bus was down: a task sent to another node, or its result coming back, may be lost on the way.
        Every task placed elsewhere is placed again (it may then run twice: its owner takes the first result)."""
        self._place_again(lambda node: True, "sent elsewhere while the bus went down")
        self.pump()

    def _place_again(self, which: Callable[[bytes], bool], why: str) -> None:
        for tid, (spec, node, _) in list(self.spilled.items()):
            if which(node):
                del self.spilled[tid]
                log.warning("task %s was %s: placing it again", spec.name, why)
                retry = pb.TaskSpec()
                retry.CopyFrom(spec)
                self._route(retry, local=True)

    def tick(self, now: float, *, peer_timeout_s: float, spill_ack_s: float = 5.0) -> None:
        """Periodic: forget silent peers, re-spill unassigned work, fail what no node can ever run, stop the
        workers of a runtime_env idle for long."""
        if self.env_idle:
            self._stop_idle_env_workers(now)
        for nid, p in list(self.peers.items()):
            if now - p.seen > peer_timeout_s:
                del self.peers[nid]
                self._node_lost(nid, f"it sent no load report for {peer_timeout_s:g}s")
        for tid, (spec, node, when) in list(self.spilled.items()):
            if not node and now - when > spill_ack_s:  # the global scheduler never placed it
                self.spilled[tid] = (spec, b"", now)
                self.ports.spill([spec])
        if self.unschedulable and not self._joining(now):
            self._retry_unschedulable()  # every node has been heard from: what none can run fails now
        for tid, (spec, since) in list(self.unschedulable.items()):
            if now - since > self.unschedulable_after_s:
                del self.unschedulable[tid]
                have = "; ".join(f"{p.node_id.hex()[:8]}: {res.describe(p.total)}" for p in self.peers.values())
                mine = f"{self.node_id.hex()[:8]}: {res.describe(self.total)}"
                self._finish(spec, error_result(
                    spec, pb.ERROR_KIND_UNSCHEDULABLE,
                    f"{spec.name} needs {res.describe(dict(spec.resources))}, and no node has it "
                    f"(nodes: {mine}{'; ' + have if have else ''}) after {self.unschedulable_after_s:g}s"))
