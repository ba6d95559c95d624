"""Wiring of the task scheduler: a node agent and/or a global scheduler replica.

The node agent (:class:`Node`) connects the local scheduler (agent.py) to its
surroundings: client sessions (gRPC), worker processes (a Unix socket), other
agents and the global scheduler (NATS), the control store (task lineage, actor
records, object locations) and the node's object store (small results).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common import auth, ids, procs, rpc
from tessera.common import bundles as bnd
from tessera.common.config import Settings
from tessera.common.errors import InvalidArgumentError
from tessera.common.metrics import observe
from tessera.common.names import NODES_HEARTBEAT_S, NODES_NAMESPACE, REFS_HEARTBEAT_S, REFS_NAMESPACE, REFS_STALE_S
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import ServiceApp
from tessera.task_scheduler import placement
from tessera.task_scheduler import resources as res
from tessera.task_scheduler.agent import NodeAgent, error_result
from tessera.task_scheduler.frames import pack, read_frame
from tessera.task_scheduler.runtime_env import ENV_VAR as RUNTIME_ENV_VAR
from tessera.task_scheduler.runtime_env import check as check_runtime_env
from tessera.task_scheduler.runtime_env import env_vars as runtime_env_vars
from tessera.task_scheduler.scheduler import (
    LOAD_SUBJECT,
    PG_GONE_SUBJECT,
    SPILL_SUBJECT,
    GlobalScheduler,
    node_subject,
)
from tessera.task_scheduler.servicer import TaskSchedulerServicer
from tessera.task_scheduler.worker_logs import WorkerLogs
from tessera.task_scheduler.zygote import ForkedProcess, Zygote

log = logging.getLogger(__name__)

NAME = "task-scheduler"
#: The name a replica running only the global scheduler (TESSERA_TASK_SCHEDULER_ROLE=global) registers under.
GLOBAL_NAME = "global-scheduler"
SERVICE = "tessera.task_scheduler.v1.TaskSchedulerService"
LOAD_INTERVAL_S = 0.1
#: How long a worker whose task was cancelled with force has to cancel what that task submitted before it is killed.
FORCE_CANCEL_GRACE_S = 1.0
#: How long bundles prepared for a placement group are held without a commit.
PREPARE_TTL_S = 10.0
#: How often a node agent compares the bundles it holds with the placement groups recorded.
RECONCILE_S = 2.0
#: How often the node agent rotates its workers' logs.
LOGS_EVERY_S = 10.0
ACTOR_STATES = {"ALIVE": cpb.ACTOR_STATE_ALIVE, "RESTARTING": cpb.ACTOR_STATE_RESTARTING, "DEAD": cpb.ACTOR_STATE_DEAD}


def node_resources(settings: Settings) -> dict[str, float]:
    total: dict[str, float] = {res.CPU: float(settings.num_cpus or os.cpu_count() or 1)}
    if settings.num_gpus:
        total[res.GPU] = float(settings.num_gpus)
    if settings.node_resources:
        try:
            custom = json.loads(settings.node_resources)
        except ValueError as e:
            raise InvalidArgumentError(f"TESSERA_NODE_RESOURCES is not JSON: {e}") from None
        if not isinstance(custom, dict):
            raise InvalidArgumentError("TESSERA_NODE_RESOURCES must be a JSON object of name: amount")
        total.update(res.check_request(custom, what="TESSERA_NODE_RESOURCES"))
    return total


def node_id_of(settings: Settings) -> bytes:
    if settings.node_id:
        try:
            return ids.check_id("node_id", bytes.fromhex(settings.node_id), field="TESSERA_NODE_ID")
        except ValueError:
            raise InvalidArgumentError(f"TESSERA_NODE_ID must be hex, got {settings.node_id!r}") from None
    return ids.new_id("node_id")


def validate(spec: pb.TaskSpec) -> None:
    """Refuse a malformed submission (it then fails alone, with ERROR_KIND_INVALID)."""
    ids.check_id("task_id", spec.task_id)
    if spec.kind not in (pb.TASK_KIND_NORMAL, pb.TASK_KIND_ACTOR_CREATE, pb.TASK_KIND_ACTOR_METHOD):
        raise InvalidArgumentError(f"task {spec.name!r}: unknown kind {spec.kind}")
    if spec.kind != pb.TASK_KIND_ACTOR_METHOD:
        ids.check_id("function_id", spec.function_id)
    if spec.kind != pb.TASK_KIND_NORMAL:
        ids.check_id("actor_id", spec.actor_id)
    if spec.kind == pb.TASK_KIND_ACTOR_METHOD and not spec.method:
        raise InvalidArgumentError(f"actor call {spec.name!r} names no method")
    for a in spec.args:
        if a.WhichOneof("kind") == "object_id":
            ids.check_id("object_id", a.object_id)
        elif a.WhichOneof("kind") is None:
            raise InvalidArgumentError(f"task {spec.name!r}: an argument has neither a value nor an object id")
    res.check_request(dict(spec.resources), what=f"task {spec.name!r}")
    if spec.runtime_env:
        check_runtime_env(spec.runtime_env)


class Node:
    """A node agent's surroundings; implements agent.Ports."""

    def __init__(self, app: ServiceApp, settings: Settings, node_id: bytes, total: dict[str, float]) -> None:
        self.app = app
        self.settings = settings
        self.node_id = node_id
        self.incarnation = os.urandom(6).hex()
        self.agent = NodeAgent(node_id, total, self, max_queue_per_cpu=settings.task_scheduler_queue_per_cpu,
                               unschedulable_after_s=settings.task_scheduler_unschedulable_s,
                               max_workers=settings.task_scheduler_max_workers,
                               gpu_ids=res.gpu_ids(total.get(res.GPU, 0.0), os.environ.get("CUDA_VISIBLE_DEVICES")))
        self.sessions: dict[str, Any] = {}  # session id -> put(result)
        self.next_session = 0
        self.worker_writers: dict[bytes, asyncio.StreamWriter] = {}
        self.procs: dict[bytes, asyncio.subprocess.Process | ForkedProcess] = {}
        self.zygote = Zygote()  # workers are forked from it; started with the first worker
        self.proc_actor: dict[bytes, bytes] = {}
        self.logs = WorkerLogs((settings.worker_log_dir or settings.run_dir / "logs" / "workers") / node_id.hex(),
                               max_bytes=settings.log_max_bytes, backups=settings.log_backups)
        self.socket_path = f"\0tessera-sched-{node_id.hex()[:16]}-{self.incarnation}"
        #: set once started: a session opened earlier waits for it (its welcome names the object store and socket)
        self.ready = asyncio.Event()
        # an abstract socket has no file permissions: with a token set, a peer's hello must carry it
        self._token = auth.server_token(settings)
        self.object_store_address = ""
        self.cs: Any = None
        self._out_results: dict[bytes, list[pb.TaskResult]] = {}
        self._refs_keys: dict[str, str] = {}  # driver session -> key of its reference table
        self._session_jobs: dict[str, bytes] = {}  # driver session -> its job
        self._reaping: set[str] = set()
        self._out_spill: list[pb.TaskSpec] = []
        self._out_forward: dict[bytes, list[pb.TaskSpec]] = {}
        self._recorded: dict[bytes, pb.TaskSpec] = {}  # submitted here, not finished: lineage to write
        # finished tasks to record: spec, state, node, and when and on which worker it ran (start, end, worker)
        self._finished: list[tuple[pb.TaskSpec, int, bytes, tuple[int, int, bytes], str]] = []
        self._flush_scheduled = False
        self._writes = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ sessions

    def open_session(self, put: Any, name: str, *, refs_key: str = "", job_id: bytes = b"") -> str:
        self.next_session += 1
        sid = f"s{self.next_session}"
        self.sessions[sid] = put
        if refs_key:
            self._refs_keys[sid] = refs_key[:256]
            self._session_jobs[sid] = job_id
        return sid

    def close_session(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is not None:
            self.agent.owner_gone(sid)
        key = self._refs_keys.pop(sid, "")
        job = self._session_jobs.pop(sid, b"")
        if key and key not in self._reaping and self._loop is not None:
            self._reaping.add(key)
            self._tasks.append(self._loop.create_task(self._reap_owner(key, job), name="owner-reaper"))

    async def _reap_owner(self, key: str, job: bytes = b"") -> None:
        """A driver's session ended. A driver that shut down freed what it owned and removed its reference
        table; one that died did neither: once it is surely gone (its process is gone, on this host, or its
        table went stale), free what its table says it owned, so its borrowers get OwnerDiedError."""
        try:
            host, _, pid = key.rpartition(":")
            deadline = time.monotonic() + REFS_STALE_S + REFS_HEARTBEAT_S
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                if any(k == key for k in self._refs_keys.values()):
                    return  # it opened another session: alive
                try:
                    raw = (await self.cs.KvGet(cpb.KvGetRequest(namespace=REFS_NAMESPACE, key=key.encode()),
                                               timeout=10.0)).value
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.NOT_FOUND:  # shut down cleanly, or never owned anything
                        if job and host == socket.gethostname() and pid.isdigit() and not procs.alive(int(pid)):
                            await self._job_failed(job.hex(), f"the driver {key} ended without shutting down")
                        return
                    continue
                doc = json.loads(raw)
                gone = host == socket.gethostname() and pid.isdigit() and not procs.alive(int(pid))
                if not gone and time.time() - float(doc.get("time", 0)) < float(doc.get("stale_s", REFS_STALE_S)):
                    continue
                owned = [bytes.fromhex(r["object_id"]) for r in doc.get("rows", []) if r.get("owned")]
                reason = f"owner died: the driver {key} ended without shutting down"
                await self._job_failed(doc.get("job_id", ""), f"the driver {key} ended without shutting down")
                for i in range(0, len(owned), 5000):
                    await self.cs.FreeObjects(cpb.FreeObjectsRequest(object_ids=owned[i:i + 5000], remember=True,
                                                                     reason=reason), timeout=30.0)
                await self.cs.KvDelete(cpb.KvDeleteRequest(namespace=REFS_NAMESPACE, key=key.encode()), timeout=10.0)
                log.warning("driver %s is gone: freed the %d object(s) it owned", key, len(owned))
                return
        except Exception as e:
            log.warning("could not free what driver %s owned: %s", key, e)
        finally:
            self._reaping.discard(key)

    def welcome(self, sid: str) -> pb.Welcome:
        return pb.Welcome(node_id=self.node_id, session=sid, object_store_address=self.object_store_address,
                          resources=self.agent.total, socket="@" + self.socket_path[1:], hostname=socket.gethostname())

    def client_frame(self, sid: str, frame: pb.ClientFrame) -> None:
        if frame.submit:
            good = []
            for spec in frame.submit:
                try:
                    validate(spec)
                except InvalidArgumentError as e:
                    put = self.sessions.get(sid)
                    if put is not None:
                        put(error_result(spec, pb.ERROR_KIND_INVALID, str(e)))
                    continue
                spec.owner_node_id = self.node_id
                spec.owner = sid
                good.append(spec)
            if good:
                self.agent.submit(good, local=True)
        if frame.cancel:
            self.agent.cancel(frame.cancel, force=frame.force, recursive=frame.recursive)
        for aid in frame.kill_actor:
            self.agent.kill_actor(aid)

    def status(self) -> pb.GetStatusResponse:
        a = self.agent
        return pb.GetStatusResponse(
            node_id=self.node_id, resources_total=a.total, resources_available=a.available, queued=len(a.queue),
            waiting=len(a.waiting), running=len(a.running), workers=len(a.workers), idle_workers=len(a.idle),
            actors=sum(1 for x in a.actors.values() if x.state != "DEAD"), tasks_finished=a.finished,
            tasks_spilled=a.spilled_count, tasks_received=a.received, sessions=len(self.sessions))

    # ------------------------------------------------------------------ workers (Ports)

    def start_worker(self, *, actor_id: bytes = b"", gpu_ids: Sequence[str] = (), runtime_env: str = "") -> bytes:
        wid = os.urandom(8)
        self._tasks.append(asyncio.create_task(self._spawn(wid, actor_id, tuple(gpu_ids), runtime_env)))
        return wid

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TESSERA_NODE_ID=self.node_id.hex(), TESSERA_CONTROL_STORE_ADDRESS=self.settings.control_store_address)
        env.pop("OTEL_SERVICE_NAME", None)
        return env

    async def _start_zygote(self) -> None:
        if self.zygote.proc is None:
            try:
                await self.zygote.start(self._worker_env())
            except (OSError, ValueError) as e:
                log.warning("could not start the worker template (workers start as new processes): %s", e)

    async def _new_worker(self, wid: bytes, actor_id: bytes, gpu_ids: tuple[str, ...] = (),
                          runtime_env: str = "") -> asyncio.subprocess.Process | ForkedProcess:
        """A worker process: forked from the template (started on first use), else a fresh interpreter.

        A worker for a task or actor that holds GPUs sees only those (``CUDA_VISIBLE_DEVICES``, as in Ray);
        ``TESSERA_GPU_IDS`` says which they are (``tessera.get_gpu_ids()``), empty for none. A worker of a
        runtime_env has its ``env_vars`` set (in a fresh interpreter, never a fork, when there are any) and
        ``TESSERA_RUNTIME_ENV`` holding it (the worker unpacks its packages before it says hello)."""
        # The socket is abstract (no file); "@" stands for its leading NUL, which env cannot hold.
        own = {"TESSERA_WORKER_SOCKET": "@" + self.socket_path[1:], "TESSERA_WORKER_ID": wid.hex(),
               "TESSERA_WORKER_ACTOR": actor_id.hex(), "TESSERA_GPU_IDS": ",".join(gpu_ids),
               "TESSERA_WORKER_LOG": self.logs.prefix(wid)}
        if gpu_ids:
            own["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        fresh = False
        if runtime_env:
            env_vars = runtime_env_vars(runtime_env)
            own = {**env_vars, **own, RUNTIME_ENV_VAR: runtime_env}
            # Variables read when a library loads or the interpreter starts (OMP_NUM_THREADS, PYTHONPATH, ...)
            # would come too late in a fork of the template, which made its imports already.
            fresh = bool(env_vars)
        await self._start_zygote()
        if self.zygote.alive and not fresh:
            try:
                return await self.zygote.fork(own)
            except OSError as e:
                log.warning("forking a worker failed (it starts as a new process): %s", e)
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tessera.task_scheduler.worker", env={**self._worker_env(), **own},
            stdin=asyncio.subprocess.DEVNULL)

    async def _spawn(self, wid: bytes, actor_id: bytes, gpu_ids: tuple[str, ...] = (), runtime_env: str = "") -> None:
        try:
            proc = await self._new_worker(wid, actor_id, gpu_ids, runtime_env)
        except (OSError, ValueError) as e:
            log.error("could not start a worker: %s", e)
            self._worker_gone(wid, actor_id, f"could not start: {e}")
            return
        self.procs[wid] = proc
        self.proc_actor[wid] = actor_id
        self.logs.started(wid, proc.pid, actor_id)
        code = await proc.wait()
        self.procs.pop(wid, None)
        self.logs.ended(wid)
        why = f"exit code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        self._worker_gone(wid, actor_id, why)
        if code != 0:  # killed or crashed: its reference table was left behind
            self._tasks.append(asyncio.create_task(self._drop_table(f"{socket.gethostname()}:{proc.pid}",
                                                                    time.time()), name="worker-table"))

    async def _job_failed(self, job_hex: str, why: str) -> None:
        """A driver died: its job is FAILED (what lives only as long as the job, as its placement groups, goes)."""
        try:
            job_id = bytes.fromhex(job_hex)
            job = (await self.cs.GetJob(cpb.GetJobRequest(job_id=job_id), timeout=10.0)).job
            if job.state == cpb.JOB_STATE_RUNNING:
                await self.cs.UpdateJobState(cpb.UpdateJobStateRequest(job_id=job_id, state=cpb.JOB_STATE_FAILED,
                                                                       message=why), timeout=10.0)
        except (ValueError, grpc.aio.AioRpcError) as e:
            log.debug("could not mark job %s failed: %s", job_hex, e)

    async def _drop_table(self, key: str, died: float) -> None:
        """A worker died without removing its reference table: remove it, so Redis does not keep the tables of
        every worker that was ever killed. Its lenders then see it gone (as they would once it went stale) and
        end its borrows. A table that lists refs passed on untracked stays: their owners keep those for life."""
        try:
            for _ in range(2):
                raw = (await self.cs.KvGet(cpb.KvGetRequest(namespace=REFS_NAMESPACE, key=key.encode()),
                                           timeout=10.0)).value
                doc = json.loads(raw)
                if doc.get("escaped") or float(doc.get("time", 0)) > died:  # (a newer process with the same pid)
                    return
                if not doc.get("lent"):
                    break
                # it names tables it lent refs on to: its lenders read it (and follow those) until it is stale
                await asyncio.sleep(float(doc.get("stale_s", REFS_STALE_S)) + REFS_HEARTBEAT_S)
            await self.cs.KvDelete(cpb.KvDeleteRequest(namespace=REFS_NAMESPACE, key=key.encode()), timeout=10.0)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                log.debug("could not remove the reference table of dead worker %s: %s", key, e)
        except (ValueError, TypeError) as e:
            log.debug("the reference table of dead worker %s does not parse: %s", key, e)

    def _worker_gone(self, wid: bytes, actor_id: bytes, why: str) -> None:
        self.proc_actor.pop(wid, None)
        self.worker_writers.pop(wid, None)
        known = wid in self.agent.workers
        if not known and actor_id:  # died before it said hello
            a = self.agent.actors.get(actor_id)
            if a is not None and a.state != "DEAD":
                from tessera.task_scheduler.agent import Worker
                self.agent.workers[wid] = Worker(wid, actor_id=actor_id)
        self.agent.worker_died(wid, why)

    def stop_worker(self, worker_id: bytes) -> None:
        proc = self.procs.get(worker_id)
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    def execute(self, worker_id: bytes, spec: pb.TaskSpec) -> None:
        w = self.worker_writers.get(worker_id)
        if w is None:
            return
        w.write(pack(pb.ServerFrame(execute=[spec])))

    def interrupt(self, worker_id: bytes, task_ids: list[bytes], *, force: bool, recursive: bool) -> None:
        w = self.worker_writers.get(worker_id)
        if w is not None:
            w.write(pack(pb.ServerFrame(cancel=task_ids, force=force, recursive=recursive)))
        if force:  # it exits by itself once it has cancelled what those tasks submitted; else it is stopped
            if w is None:
                self.stop_worker(worker_id)
            else:
                asyncio.get_running_loop().call_later(FORCE_CANCEL_GRACE_S, self.stop_worker, worker_id)

    async def _socket_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A session over the agent's Unix socket: a worker, or a driver on this host."""
        wid = b""
        sid = ""
        try:
            hello = pb.ClientFrame.FromString(await read_frame(reader)).hello
            if self._token and not auth.matches(hello.token, self._token):
                log.warning("refused a socket session whose hello lacks this cluster's token")
                return
            sink = _SocketSink(writer)
            if hello.worker:
                wid = hello.worker_id
                self.worker_writers[wid] = writer
                sid = self.open_session(sink.put, f"worker {wid.hex()}")
            else:
                if len(hello.job_id) != ids.JOB_ID_LEN:
                    return
                sid = self.open_session(sink.put, hello.name, refs_key=hello.refs_key, job_id=hello.job_id)
            writer.write(pack(pb.ServerFrame(welcome=self.welcome(sid))))
            if wid:
                self.agent.worker_ready(wid, actor_id=bytes.fromhex(hello.name) if hello.name else b"")
            while True:
                frame = pb.ClientFrame.FromString(await read_frame(reader))
                if wid:
                    for r in frame.done:
                        self.agent.task_done(wid, r)
                    if frame.blocked:
                        self.agent.worker_blocked(wid, frame.blocked)
                if frame.submit or frame.cancel or frame.kill_actor:
                    self.client_frame(sid, frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("session over the socket failed")
        finally:
            if sid:
                self.close_session(sid)
            writer.close()

    # ------------------------------------------------------------------ results, spill, forward (Ports)

    def deliver(self, owner_node: bytes, results: list[pb.TaskResult]) -> None:
        if owner_node == self.node_id or not owner_node:
            self._to_sessions(results)
            return
        self._out_results.setdefault(owner_node, []).extend(results)
        self._schedule_flush()

    def _to_sessions(self, results: list[pb.TaskResult]) -> None:
        for r in results:
            spec = None if r.partial else self._recorded.pop(r.task_id, None)
            if spec is not None:  # lineage: each task is recorded once, when it is done
                failed = r.HasField("error")
                self._finished.append((spec, cpb.TASK_STATE_FAILED if failed else cpb.TASK_STATE_FINISHED, r.node_id,
                                       (r.start_us, r.end_us, r.worker_id), error_text(r.error) if failed else ""))
                self._writes.set()
            put = self.sessions.get(r.owner)
            if put is not None:
                put(r)

    def spill(self, specs: list[pb.TaskSpec]) -> None:
        self._out_spill.extend(specs)
        self._schedule_flush()

    def forward(self, node_id: bytes, specs: list[pb.TaskSpec]) -> None:
        self._out_forward.setdefault(node_id, []).extend(specs)
        self._schedule_flush()

    def control(self, node_id: bytes, ctl: pb.Control) -> None:
        self._publish(node_subject(node_id, "control"), ctl.SerializeToString())

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        results, self._out_results = self._out_results, {}
        for node, rs in results.items():
            self._publish(node_subject(node, "results"),
                          pb.ResultBatch(results=rs, from_node_id=self.node_id).SerializeToString())
        if self._out_spill:
            specs, self._out_spill = self._out_spill, []
            self._publish(SPILL_SUBJECT, pb.TaskBatch(tasks=specs, from_node_id=self.node_id).SerializeToString())
        fwd, self._out_forward = self._out_forward, {}
        for node, specs in fwd.items():
            self._publish(node_subject(node, "tasks"), pb.TaskBatch(tasks=specs, from_node_id=self.node_id).SerializeToString())

    def _publish(self, subject: str, data: bytes) -> None:
        bus = self.app.bus
        if bus is None:
            return
        self._tasks.append(asyncio.create_task(bus.publish(subject, data)))
        if len(self._tasks) > 256:
            self._tasks = [t for t in self._tasks if not t.done()]

    # ------------------------------------------------------------------ control store and object store (Ports)

    def record_created(self, specs: list[pb.TaskSpec]) -> None:
        for spec in specs:
            self._recorded[spec.task_id] = spec

    def actor_state(self, actor_id: bytes, state: str, cause: str = "", spec: pb.TaskSpec | None = None) -> None:
        req = cpb.UpdateActorRequest(actor_id=actor_id, state=ACTOR_STATES[state], node_id=self.node_id,
                                     address=self.app.address, death_cause=cause,
                                     creation_spec=spec.SerializeToString() if spec is not None else b"")
        self._tasks.append(asyncio.create_task(self._update_actor(req)))

    async def _update_actor(self, req: cpb.UpdateActorRequest) -> None:
        try:
            await self.cs.UpdateActor(req, timeout=10.0)
        except Exception as e:
            log.warning("could not record actor %s as %s: %s", req.actor_id.hex(), cpb.ActorState.Name(req.state), e)

    def locate_objects(self, object_ids: list[bytes]) -> None:
        self._tasks.append(asyncio.create_task(self._locate(object_ids)))

    async def _locate(self, object_ids: list[bytes]) -> None:
        try:
            objs = (await self.cs.GetObjects(cpb.GetObjectsRequest(object_ids=object_ids), timeout=10.0)).objects
        except Exception as e:
            log.warning("object lookup failed: %s", e)
            return
        found = {o.object_id: b"" for o in objs if o.locations}
        if found:
            self.agent.objects_available(found)

    def locate_actor(self, actor_id: bytes) -> None:
        self._tasks.append(asyncio.create_task(self._locate_actor(actor_id)))

    async def _locate_actor(self, actor_id: bytes) -> None:
        deadline = time.monotonic() + 60.0
        delay = 0.01
        while time.monotonic() < deadline:
            try:
                a = (await self.cs.GetActor(cpb.GetActorRequest(actor_id=actor_id), timeout=10.0)).actor
            except Exception as e:
                if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                    self.agent.actor_located(actor_id, b"", dead="no such actor")
                    return
                a = None
            if a is not None:
                if a.state == cpb.ACTOR_STATE_DEAD:
                    self.agent.actor_located(actor_id, b"", dead=a.death_cause or "dead")
                    return
                # a node this agent lost (or never heard from) is not trusted: the actor's record still names
                # it until its node is declared dead and the actor restarted elsewhere
                if a.node_id and a.state in (cpb.ACTOR_STATE_ALIVE, cpb.ACTOR_STATE_RESTARTING) \
                        and (a.node_id == self.node_id or a.node_id in self.agent.peers):
                    self.agent.actor_located(actor_id, a.node_id)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        self.agent.actor_located(actor_id, b"", dead="it did not start within 60s")

    async def _writer(self) -> None:
        """Lineage to the control store: finished tasks, batched (one call per state and node)."""
        while True:
            await self._writes.wait()
            await asyncio.sleep(self.settings.task_scheduler_flush_s)  # let a batch gather
            self._writes.clear()
            done, self._finished = self._finished, []
            groups: dict[tuple[int, bytes], list[cpb.TaskSpec]] = {}
            errors: list[cpb.TaskStateUpdate] = []
            for spec, state, node, (start_us, end_us, worker_id), error in done:
                rec = lineage_record(spec)
                rec.start_us, rec.end_us, rec.worker_id = start_us, end_us, worker_id
                groups.setdefault((state, node), []).append(rec)
                if error:
                    errors.append(cpb.TaskStateUpdate(task_id=spec.task_id, state=state, node_id=node,  # type: ignore[arg-type]
                                                      error=error))
            for (state, node), specs in groups.items():
                for i in range(0, len(specs), 2000):
                    try:
                        await self.cs.CreateTasks(cpb.CreateTasksRequest(specs=specs[i:i + 2000], state=state,  # type: ignore[arg-type]
                                                                         node_id=node, replace=True), timeout=30.0)
                    except Exception as e:
                        log.warning("could not record %d finished task(s): %s", len(specs[i:i + 2000]), e)
            for i in range(0, len(errors), 2000):  # a failed task's record says why (tessera list, the dashboard)
                try:
                    await self.cs.UpdateTaskStates(cpb.UpdateTaskStatesRequest(updates=errors[i:i + 2000]), timeout=30.0)
                except Exception as e:
                    log.warning("could not record why %d task(s) failed: %s", len(errors[i:i + 2000]), e)

    # ------------------------------------------------------------------ NATS

    async def _bus_back(self) -> None:
        await asyncio.sleep(1.0)  # the other nodes' connections (and subscriptions) come back too
        self.agent.messages_lost()

    async def _on_tasks(self, msg: Any) -> None:
        self.agent.submit(remote_tasks(pb.TaskBatch.FromString(msg.data)), local=False)

    async def _on_results(self, msg: Any) -> None:
        batch = pb.ResultBatch.FromString(msg.data)
        self._to_sessions(self.agent.remote_results(batch.results))

    async def _on_control(self, msg: Any) -> None:
        ctl = pb.Control.FromString(msg.data)
        if ctl.cancel:
            self.agent.cancel(ctl.cancel, force=ctl.force, recursive=ctl.recursive)
        for aid in ctl.kill_actor:
            self.agent.kill_actor(aid)

    async def _on_assigned(self, msg: Any) -> None:
        batch = pb.TaskBatch.FromString(msg.data)
        self.agent.assigned([t.task_id for t in batch.tasks], batch.from_node_id)

    async def _on_load(self, msg: Any) -> None:
        view = view_of(pb.NodeLoad.FromString(msg.data))
        if view is not None:
            self.agent.peer_load(view)

    async def _on_sealed(self, msg: Any) -> None:
        if not self.agent.by_object:
            return
        ev = cpb.ChangeEvent.FromString(msg.data)
        found = {c.key: b"" for c in ev.changes if c.key in self.agent.by_object}
        if found:
            self.agent.objects_available(found)

    def load_report(self, leaving: bool = False) -> pb.NodeLoad:
        a = self.agent
        return pb.NodeLoad(node_id=self.node_id, incarnation=self.incarnation, resources_total=a.total,
                           resources_available=a.available, queued=len(a.queue) + len(a.waiting), running=len(a.running),
                           workers=len(a.workers), address=self.app.address, time_ms=int(time.time() * 1000),
                           leaving=leaving)

    def resources_doc(self) -> dict[str, Any]:
        """What this node offers to tasks, as kept in the control store (NODES_NAMESPACE) for the SDK."""
        a = self.agent
        return {"node_id": self.node_id.hex(), "address": self.app.address, "hostname": socket.gethostname(),
                "total": dict(a.total), "available": {k: max(0.0, v) for k, v in a.available.items()},
                "stale_s": max(3 * NODES_HEARTBEAT_S, self.settings.node_timeout_s)}

    async def _cluster_view(self) -> None:
        """Keep this node's resources in the control store (when they change, and as a heartbeat), and tell
        the agent which nodes registered lately (those not reporting load yet are joining)."""
        last: dict[str, Any] = {}
        written = listed = 0.0
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            doc = self.resources_doc()
            if doc != last or now - written >= NODES_HEARTBEAT_S:
                try:
                    await self.cs.KvPut(cpb.KvPutRequest(namespace=NODES_NAMESPACE, key=self.node_id.hex().encode(),
                                                         value=json.dumps({**doc, "time": time.time()}).encode(),
                                                         overwrite=True), timeout=5.0)
                    last, written = doc, now
                except Exception as e:
                    log.debug("could not record this node's resources: %s", e)
            if now - listed >= 1.0:
                listed = now
                try:
                    nodes = (await self.cs.ListNodes(cpb.ListNodesRequest(state=cpb.NODE_STATE_ALIVE),
                                                     timeout=5.0)).nodes
                except Exception as e:
                    log.debug("could not list the nodes: %s", e)
                    continue
                recent_ms = time.time() * 1000 - self.settings.task_scheduler_unschedulable_s * 1000
                self.agent.nodes_registered([n.node_id for n in nodes if n.registered_ms >= recent_ms])

    async def _reporter(self) -> None:
        last = b""
        last_sent = 0.0
        ticks = 0
        while True:
            await asyncio.sleep(LOAD_INTERVAL_S)
            rep = self.load_report()
            key = rep.SerializeToString(deterministic=True)
            key_nt = key[: -12] if len(key) > 12 else key
            now = time.monotonic()
            if key_nt != last or now - last_sent > 1.0:
                last, last_sent = key_nt, now
                if self.app.bus is not None:
                    await self.app.bus.publish(LOAD_SUBJECT, rep.SerializeToString())
            self.agent.tick(now, peer_timeout_s=max(3.0, self.settings.node_timeout_s / 2))
            ticks += 1
            if ticks % 10 == 0 and self.agent.by_object:  # missed sealed events: look again
                self.locate_objects(self.agent.waiting_objects()[:1000])

    # ------------------------------------------------------------------ placement groups

    async def _on_bundles(self, msg: Any) -> None:
        """PREPARE, COMMIT or RETURN this node's bundles of a group (from the global scheduler)."""
        try:
            req = cpb.PlacementGroupReservation.FromString(msg.data)
            pg = req.group.placement_group_id.hex()
            mine = self._my_bundles(req.group)
            if req.op == "PREPARE":
                why = self.agent.prepare_bundles(pg, mine, time.monotonic())
            elif req.op == "COMMIT":
                why = self.agent.commit_bundles(pg, mine, time.monotonic())
            elif req.op == "RETURN":
                self.agent.return_bundles(pg, "returned by the global scheduler")
                why = ""
            else:
                why = f"unknown op {req.op!r}"
        except Exception as e:  # a message that is not one: anyone on NATS can publish
            why = f"bad reservation: {e}"
        reply = cpb.PlacementGroupReservationReply(ok=not why, error=why)
        if msg.reply and self.app.bus is not None:
            await self.app.bus.respond(msg, reply.SerializeToString())

    def _my_bundles(self, group: cpb.PlacementGroup) -> dict[int, dict[str, float]]:
        return {i: res.check_request(dict(b.resources), what=f"bundle {i}") for i, b in enumerate(group.bundles)
                if b.node_id == self.node_id}

    async def _on_group_gone(self, msg: Any) -> None:
        group = cpb.PlacementGroup.FromString(msg.data)
        self.agent.group_gone(group.placement_group_id.hex(), group.error or "its placement group was removed")

    async def _groups(self) -> dict[str, cpb.PlacementGroup] | None:
        """The placement groups recorded in the control store, by id in hex; None when it cannot be read."""
        try:
            keys = (await self.cs.KvList(cpb.KvListRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE),
                                         timeout=5.0)).keys
            out: dict[str, cpb.PlacementGroup] = {}
            for k in keys:
                if b":" in k:
                    continue
                try:
                    raw = (await self.cs.KvGet(cpb.KvGetRequest(namespace=bnd.PLACEMENT_GROUPS_NAMESPACE, key=k),
                                               timeout=5.0)).value
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.NOT_FOUND:
                        continue
                    raise
                out[k.decode()] = cpb.PlacementGroup.FromString(raw)
            return out
        except Exception as e:
            log.debug("could not read the placement groups: %s", e)
            return None

    async def _reconcile(self) -> None:
        """The control store's records are the truth on bundles: hold (commit) those recorded here as created
        (after a restart of this agent, or a commit lost on the way), return those of groups gone or
        recorded elsewhere, and fail work waiting for a group that is not recorded."""
        while True:
            waited = set(self.agent.pg_waiting)  # waiting before the list: their groups, if any, are in it
            groups = await self._groups()
            if groups is not None:
                now = time.monotonic()
                for pg, g in groups.items():
                    mine = self._my_bundles(g)
                    if g.state == cpb.PLACEMENT_GROUP_STATE_CREATED and mine:
                        why = self.agent.commit_bundles(pg, mine, now)
                        if why:
                            log.warning("could not hold the bundles of placement group %s: %s", pg, why)
                for pg, r in list(self.agent.reservations.items()):
                    rec = groups.get(pg)
                    if rec is None or rec.state in (cpb.PLACEMENT_GROUP_STATE_REMOVED,
                                                    cpb.PLACEMENT_GROUP_STATE_INFEASIBLE):
                        if r.committed or rec is not None:
                            self.agent.group_gone(pg, rec.error if rec is not None and rec.error
                                                  else "its placement group was removed")
                    elif rec.state == cpb.PLACEMENT_GROUP_STATE_CREATED and not self._my_bundles(rec):
                        self.agent.return_bundles(pg, "recorded on other nodes")
                for tid, spec in list(self.agent.pg_waiting.items()):
                    if tid not in waited:
                        continue
                    missing = [p for p in bnd.groups_in(spec.resources) if p not in groups]
                    if missing:
                        self.agent.group_gone(missing[0], f"no placement group {missing[0]} exists")
                self.agent.expire_prepared(now, PREPARE_TTL_S)
            await asyncio.sleep(RECONCILE_S)

    async def _maintain_logs(self) -> None:
        """Rotate workers' logs past their size; drop those of long-ended workers."""
        while True:
            await asyncio.sleep(LOGS_EVERY_S)
            try:
                await asyncio.to_thread(self.logs.maintain)
            except OSError as e:
                log.warning("could not rotate the workers' logs: %s", e)

    def worker_log(self, req: pb.GetWorkerLogRequest) -> pb.GetWorkerLogResponse:
        data, start, size, wid, pid, alive = self.logs.read(worker_id=req.worker_id, actor_id=req.actor_id,
                                                            suffix=req.suffix, offset=req.offset,
                                                            max_bytes=req.max_bytes)
        return pb.GetWorkerLogResponse(data=data, offset=start, size=size, worker_id=wid, pid=pid, alive=alive)

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        bus = self.app.bus
        assert bus is not None
        self._loop = asyncio.get_running_loop()
        await self._start_zygote()  # its imports overlap the wait for this node's object store
        ch, self.cs = control_store_aio_stub(self.settings)
        self._cs_channel = ch
        self.object_store_address = await self._find_object_store()
        self._server = await asyncio.start_unix_server(self._socket_conn, path=self.socket_path, limit=2**20)
        await bus.subscribe(node_subject(self.node_id, "tasks"), self._on_tasks)
        await bus.subscribe(node_subject(self.node_id, "results"), self._on_results)
        await bus.subscribe(node_subject(self.node_id, "control"), self._on_control)
        await bus.subscribe(node_subject(self.node_id, "assigned"), self._on_assigned)
        await bus.subscribe(LOAD_SUBJECT, self._on_load)
        await bus.subscribe("tessera.events.objects.sealed", self._on_sealed)
        await bus.subscribe(node_subject(self.node_id, "bundles"), self._on_bundles)
        await bus.subscribe(PG_GONE_SUBJECT, self._on_group_gone)
        bus.on_reconnect(self._bus_back)
        self._tasks.append(asyncio.create_task(self._writer(), name="lineage-writer"))
        self._tasks.append(asyncio.create_task(self._reporter(), name="load-reporter"))
        self._tasks.append(asyncio.create_task(self._cluster_view(), name="cluster-view"))
        self._tasks.append(asyncio.create_task(self._reconcile(), name="bundles-reconciler"))
        self._tasks.append(asyncio.create_task(self._maintain_logs(), name="worker-logs"))
        n = self.settings.task_scheduler_prestart_workers
        if n < 0:
            n = int(self.agent.total.get(res.CPU, 1))
        for _ in range(n):
            self.agent.starting += 1
            self.start_worker()
        self.ready.set()
        log.info("node agent %s: %s, %d workers starting", self.node_id.hex()[:8], res.describe(self.agent.total), n)

    async def _find_object_store(self) -> str:
        """The object store of this node (the one registered under the same node id)."""
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                node = (await self.cs.GetNode(cpb.GetNodeRequest(node_id=self.node_id), timeout=5.0)).node
                if node.object_store_address:
                    return str(node.object_store_address)
            except Exception:
                pass
            await asyncio.sleep(0.1)
        log.error("no object store registered for node %s: large values cannot be stored", self.node_id.hex())
        return ""

    async def stop(self) -> None:
        if self.app.bus is not None:
            try:
                await self.app.bus.publish(LOAD_SUBJECT, self.load_report(leaving=True).SerializeToString())
            except Exception:
                pass
        try:
            await self.cs.KvDelete(cpb.KvDeleteRequest(namespace=NODES_NAMESPACE, key=self.node_id.hex().encode()),
                                   timeout=2.0)
        except Exception as e:
            log.debug("could not remove this node's resources record: %s", e)
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                proc.terminate()
        for proc in list(self.procs.values()):
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except TimeoutError:
                proc.kill()
        await self.zygote.close()
        for t in self._tasks:
            t.cancel()
        if self._server is not None:
            self._server.close()
        await self._cs_channel.close()


class _SocketSink:
    """Results for one socket session. The first result of a turn of the event loop is written at once (a
    lone result waits for no further turn); those that follow it in the same turn are written together, as
    one frame, at the end of the turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.batch: list[pb.TaskResult] = []
        self.wrote = False  # a result was written at once in this turn (cleared by flush, at its end)

    def put(self, r: pb.TaskResult) -> None:
        if self.batch:
            self.batch.append(r)
            return
        if not self.wrote:
            self.wrote = True
            if not self.writer.is_closing():
                self.writer.write(pack(pb.ServerFrame(results=[r])))
        else:
            self.batch.append(r)
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.wrote = False
        batch, self.batch = self.batch, []
        if batch and not self.writer.is_closing():
            self.writer.write(pack(pb.ServerFrame(results=batch)))


#: The most of a failure's text kept in its task's record (a traceback; the whole error travels in the result).
MAX_ERROR_CHARS = 16_000


def error_text(err: pb.TaskError) -> str:
    """What a failed task's record says: the exception's message and its remote traceback, if any."""
    head = f"{err.type_name}: {err.message}" if err.type_name else err.message
    text = f"{err.traceback.rstrip()}\n{head}" if err.traceback and head not in err.traceback else (err.traceback or head)
    return text[-MAX_ERROR_CHARS:]


def lineage_record(s: pb.TaskSpec) -> cpb.TaskSpec:
    """The control store's record of a task: enough to run it again (the whole spec rides in ``args``)."""
    return cpb.TaskSpec(task_id=s.task_id, job_id=s.job_id, function_id=s.function_id, function_name=s.name,
                        args=s.SerializeToString(), num_returns=s.num_returns, resources=s.resources,
                        arg_object_ids=[a.object_id for a in s.args if a.WhichOneof("kind") == "object_id"],
                        max_retries=max(0, s.max_retries), parent_task_id=s.parent_task_id)


def view_of(load: pb.NodeLoad) -> placement.NodeView | None:
    return placement.view_of(load.node_id, incarnation=load.incarnation, total=load.resources_total,
                             available=load.resources_available, queued=load.queued, running=load.running,
                             leaving=load.leaving)


def remote_tasks(batch: pb.TaskBatch) -> list[pb.TaskSpec]:
    """The tasks of a batch sent over NATS that are well formed; the others are dropped (logged)."""
    good = []
    for spec in batch.tasks:
        try:
            validate(spec)
        except InvalidArgumentError as e:
            log.warning("dropped a task sent to this node over NATS: %s", e)
            continue
        good.append(spec)
    return good


def observe_agent(a: NodeAgent) -> None:
    """The node agent's figures as metrics, read at each collection: task throughput, queue depths, workers."""
    scope = "tessera.task_scheduler"
    observe(scope, "tessera.tasks.finished", lambda: a.finished, kind="counter", unit="{task}",
            description="Tasks this node finished (succeeded or failed for good)")
    observe(scope, "tessera.tasks.received", lambda: a.received, kind="counter", unit="{task}",
            description="Tasks other nodes forwarded to this node")
    observe(scope, "tessera.tasks.spilled", lambda: a.spilled_count, kind="counter", unit="{task}",
            description="Tasks this node passed on to another node")
    observe(scope, "tessera.tasks", lambda: [(len(a.queue), {"tessera.task.state": "queued"}),
                                             (len(a.waiting), {"tessera.task.state": "waiting"}),
                                             (len(a.running), {"tessera.task.state": "running"})],
            unit="{task}", description="Tasks on this node by state: queued (ready), waiting (for arguments), running")
    observe(scope, "tessera.workers", lambda: [(len(a.idle), {"tessera.worker.state": "idle"}),
                                               (len(a.workers) - len(a.idle), {"tessera.worker.state": "busy"})],
            unit="{worker}", description="Worker processes on this node")
    observe(scope, "tessera.actors", lambda: sum(1 for x in a.actors.values() if x.state != "DEAD"),
            unit="{actor}", description="Live actors on this node")


def build(settings: Settings) -> ServiceApp:
    role = settings.task_scheduler_role
    # A global scheduler alone takes no sessions: it registers under its own name, so that drivers
    # looking for a node agent ("task-scheduler") never pick it.
    app = ServiceApp(GLOBAL_NAME if role == "global" else NAME, settings)
    node: Node | None = None
    if role in ("both", "agent"):
        node = Node(app, settings, node_id_of(settings), node_resources(settings))
        descriptor = pb.DESCRIPTOR.services_by_name["TaskSchedulerService"]
        app.add_servicer(lambda s, srv: rpc.add_servicer(s, srv, descriptor), TaskSchedulerServicer(node), SERVICE)
        app.on_start(node.start)
        app.on_stop(node.stop)
        observe_agent(node.agent)
    if role in ("both", "global"):
        gs = GlobalScheduler(app, settings)
        app.on_start(gs.start)
        app.on_stop(gs.stop)
    return app


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
