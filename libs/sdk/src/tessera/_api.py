"""``tessera.init`` and the module-level task API: get, wait, put, cancel, kill, get_actor; the runtime context,
the cluster's nodes and resources, and the GPUs of a task."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tessera._core import Core
from tessera._framing import SocketConnection
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.control_store.v1 import control_store_pb2_grpc as cpb_grpc
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2_grpc as pb_grpc
from tessera.client import objects as _objects
from tessera.client._base import ObjectClientBase
from tessera.client._discovery import connected_to
from tessera.client.objects import ObjectRef
from tessera.common import auth, ids, rpc
from tessera.common.config import current_settings
from tessera.common.metrics import install_from_env
from tessera.common.registry import control_store_stub
from tessera.common.serialization import serialize
from tessera.exceptions import TesseraSDKError

log = logging.getLogger(__name__)

#: ``service.name`` of a driver's own spans and metrics (``OTEL_SERVICE_NAME`` wins)
DRIVER_SERVICE_NAME = "tessera-driver"

#: How long a driver keeps trying to reach its node agent again after losing it.
RECONNECT_S = 60.0


@dataclass
class _State:
    core: Core
    control_store_address: str
    object_store_address: str
    inline_threshold: int
    cluster_key: str
    session: GrpcSession | None = None
    #: The job's runtime_env, resolved (tasks and actors merge theirs over it); in a worker, the worker's own.
    runtime_env: dict[str, Any] = field(default_factory=dict)
    #: The run directory of the local cluster ``init`` started (stopped by ``shutdown``); None: it found one.
    started: str | None = None
    _objects: ObjectClientBase | None = None
    _cs: Any = None
    _cs_channel: grpc.Channel | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def objects(self) -> ObjectClientBase:
        with self._lock:
            if self._objects is None:  # mapped, or streaming when this process cannot map the store's arena
                self._objects = _objects.open_object_client(self.object_store_address)
            return self._objects

    def control_store(self) -> cpb_grpc.ControlStoreServiceStub:
        with self._lock:
            if self._cs is None:
                self._cs_channel, self._cs = control_store_stub(self.control_store_address)
            return self._cs


_state: _State | None = None
_state_lock = threading.Lock()


def state() -> _State:
    st = _state
    if st is None:
        raise TesseraSDKError("tessera is not initialized: call tessera.init() (after `tessera up`)")
    return st


def object_client() -> ObjectClientBase:
    return state().objects()


def control_store() -> cpb_grpc.ControlStoreServiceStub:
    return state().control_store()


# ---------------------------------------------------------------------- the driver's session


class GrpcSession:
    """A driver's session with its node agent; reconnects and resubmits if the agent restarts.

    It opens over gRPC; when the agent is on this host, the session moves to the
    agent's Unix socket (the same frames, without HTTP/2), unless
    ``TESSERA_SESSION_TRANSPORT=grpc``.
    """

    def __init__(self, address: str, core: Core, name: str) -> None:
        self.address = address
        self.core = core
        self.name = name
        self.outbox: queue.SimpleQueue[pb.ClientFrame | None] = queue.SimpleQueue()
        self.closing = False
        self.welcome = pb.Welcome()
        self.channel = rpc.stream_channel(address)
        self._call: Any = None
        self._sock: SocketConnection | None = None
        self._sender: threading.Thread | None = None
        # Over the socket, _queued counts the frames queued for the sender thread and not written yet; a frame
        # sent while none are (and nothing else is in flight) is written by the sending thread itself, without
        # the hand-off to the sender. _wlock is held across every write, and the count drops only once its
        # frames are written, so frames keep the order they were sent in. _qlock guards the count and the queue.
        self._wlock = threading.Lock()
        self._qlock = threading.Lock()
        self._queued = 0
        self._connect(timeout=30.0)
        self.reader = threading.Thread(target=self._read, name="tessera-session", daemon=True)
        self.reader.start()

    @property
    def transport(self) -> str:
        return "socket" if self._sock is not None else "grpc"

    def _connect(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"no task scheduler answered at {self.address} within {timeout:g}s") from None
        with self._wlock, self._qlock:
            self.outbox = queue.SimpleQueue()
            self._sock = None
            self._queued = 0
        stub = pb_grpc.TaskSchedulerServiceStub(self.channel)
        hello = pb.ClientFrame(hello=pb.Hello(job_id=self.core.job_id, name=self.name,
                                              refs_key=self.core.refs_key.decode()))
        self._call = stub.Session(self._frames(hello, self.outbox), metadata=rpc.trace_metadata())
        first = next(self._call)
        self.welcome = first.welcome
        self.core.node_id = self.welcome.node_id
        if self.welcome.socket and self.welcome.hostname == socket.gethostname() \
                and os.environ.get("TESSERA_SESSION_TRANSPORT", "") != "grpc":
            try:
                conn = SocketConnection(self.welcome.socket, timeout=5.0)
                # the socket has no metadata: the token (when one is set) travels in the hello
                conn.send(pb.ClientFrame(hello=pb.Hello(job_id=self.core.job_id, name=self.name,
                                                        token=auth.client_token(),
                                                        refs_key=self.core.refs_key.decode())))
                welcome = conn.recv().welcome
            except OSError as e:
                log.info("staying on gRPC: the agent's socket is not reachable (%s)", e)
                return
            self._call.cancel()
            self._call = None
            with self._wlock, self._qlock:
                self.welcome, self._sock = welcome, conn
                self.outbox = queue.SimpleQueue()
                self._queued = 0
            self._sender = threading.Thread(target=self._socket_sender, args=(conn, self.outbox),
                                            name="tessera-session-send", daemon=True)
            self._sender.start()

    def _frames(self, hello: pb.ClientFrame, box: queue.SimpleQueue[pb.ClientFrame | None]) -> Iterator[pb.ClientFrame]:
        yield hello
        yield from _coalesced(box)

    def _socket_sender(self, conn: SocketConnection, box: queue.SimpleQueue[pb.ClientFrame | None]) -> None:
        try:
            for frame, n in _coalesced_counted(box):
                with self._wlock:
                    try:
                        live = self._sock is conn  # (not a socket a reconnect replaced)
                        if live:
                            conn.send(frame)
                    finally:
                        with self._qlock:
                            if conn is self._sock:
                                self._queued -= n
        except OSError:
            pass  # the reader notices and reconnects

    def send(self, frame: pb.ClientFrame, *, idle: bool = False) -> None:
        """Queue ``frame`` for the sender, which batches submissions; ``idle`` (nothing else of this owner in
        flight): over the socket, write it from this thread now if nothing queued is still unwritten."""
        conn = self._sock
        if idle and conn is not None and self._wlock.acquire(blocking=False):
            try:
                live = self._sock is conn
                if live and self._queued == 0:
                    try:
                        conn.send(frame)
                    except OSError:
                        pass  # the reader notices and reconnects (and resubmits what is pending)
                    return
            finally:
                self._wlock.release()
        with self._qlock:
            if self._sock is not None:
                self._queued += 1
            self.outbox.put(frame)

    def _read(self) -> None:
        while not self.closing:
            try:
                if self._sock is not None:
                    conn = self._sock
                    while True:
                        frame = conn.recv()
                        if frame.results:
                            self.core.deliver(frame.results)
                else:
                    for frame in self._call:
                        if frame.results:
                            self.core.deliver(frame.results)
            except (grpc.RpcError, OSError) as e:
                if self._closed():
                    return
                why = e.code().name if isinstance(e, grpc.RpcError) else str(e)  # type: ignore[attr-defined]
                log.warning("lost the session with the node agent at %s (%s): reconnecting", self.address, why)
            if self._closed():
                return
            self._reconnect()

    def _closed(self) -> bool:
        return self.closing

    def _reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self.outbox.put(None)
        deadline = time.monotonic() + RECONNECT_S
        while not self.closing:
            try:
                self._connect(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
                pending = self.core.pending_specs()
                if pending:
                    log.warning("resubmitting %d unfinished task(s) to the node agent", len(pending))
                    self.send(pb.ClientFrame(submit=pending))
                return
            except (ConnectionError, grpc.RpcError, StopIteration) as e:
                if time.monotonic() > deadline:
                    log.error("could not reach the node agent at %s for %.0fs: %s", self.address, RECONNECT_S, e)
                    self.core.close()
                    return
                time.sleep(0.2)

    def close(self) -> None:
        self.closing = True
        self.outbox.put(None)
        try:
            if self._call is not None:
                self._call.cancel()
        except Exception:
            pass
        if self._sock is not None:
            if self._sender is not None:
                self._sender.join(2.0)  # what is queued (e.g. kills) is written before the socket closes
            self._sock.close()
        self.channel.close()


def _coalesced(box: queue.SimpleQueue[pb.ClientFrame | None]) -> Iterator[pb.ClientFrame]:
    """Frames from ``box`` until None; submissions queued meanwhile travel as one frame."""
    for frame, _ in _coalesced_counted(box):
        yield frame


def _coalesced_counted(box: queue.SimpleQueue[pb.ClientFrame | None]) -> Iterator[tuple[pb.ClientFrame, int]]:
    """As ``_coalesced``, each frame with how many frames taken from ``box`` it carries."""
    while True:
        frame = box.get()
        if frame is None:
            return
        if not frame.submit:
            yield frame, 1
            continue
        specs = list(frame.submit)
        n = 1
        while len(specs) < 4096:
            try:
                more = box.get_nowait()
            except queue.Empty:
                more = pb.ClientFrame()
            if more is not None and more.submit:
                specs.extend(more.submit)
                n += 1
                continue
            if more is None:
                yield pb.ClientFrame(submit=specs), n
                return
            if more.ByteSize():
                yield pb.ClientFrame(submit=specs), n
                yield more, 1
            else:
                yield pb.ClientFrame(submit=specs), n
            break
        else:
            yield pb.ClientFrame(submit=specs), n


# ---------------------------------------------------------------------- init / shutdown


def _agent_address(cluster: Any, cs: cpb_grpc.ControlStoreServiceStub) -> str:
    svc = cluster.services.get("task-scheduler")
    if svc and svc.get("address"):
        return str(svc["address"])
    inst = cs.ListInstances(cpb.ListInstancesRequest(service="task-scheduler"), timeout=10.0).instances
    here = os.uname().nodename
    local = [i for i in inst if i.hostname == here] or list(inst)
    if not local:
        raise ConnectionError("no task scheduler is registered in the cluster")
    return local[0].address


def init(address: str | None = None, *, name: str = "", log_to_driver: bool = True,
         runtime_env: dict[str, Any] | None = None) -> None:
    """Connect this process to a Tessera cluster as a driver, as ``ray.init`` does.

    Args:
        address: the control store's ``host:port``; None: ``TESSERA_ADDRESS``, else the cluster that
            ``tessera up`` started on this machine (its run directory), else a local cluster started now
            (one node, in a run directory of its own; stopped by ``shutdown`` or when this process exits).
            ``"auto"``: only a running cluster (``TESSERA_ADDRESS`` or the run directory's), never a new one.
        name: a name for this driver, shown in the cluster's job table.
        runtime_env: the job's runtime_env (``env_vars``, ``working_dir``, ``py_modules``), which its tasks
            and actors merge theirs over.

    Raises:
        ClusterNotFoundError: ``address="auto"`` and no running cluster found.
        ValueError, TypeError, NotImplementedError: a bad ``runtime_env`` (nothing is started or connected).
    """
    global _state
    import tessera._starter as _starter
    from tessera import _runtime_env

    env = _runtime_env.validate(runtime_env)
    with _state_lock:
        if _state is not None:
            return
        install_from_env(DRIVER_SERVICE_NAME)  # OpenTelemetry from OTEL_*, unless the application set it up
        started, cluster, address = _starter.find_or_start(address)
        ch, cs = control_store_stub(cluster.control_store_address)
        try:
            env = _runtime_env.resolve(env, cs, cluster.control_store_address)
            job = cs.CreateJob(cpb.CreateJobRequest(job=cpb.JobInfo(job_id=ids.new_id("job_id"),
                                                                    entrypoint=name or _entrypoint(),
                                                                    driver_address=f"pid-{os.getpid()}")),
                               timeout=30.0).job
        except grpc.RpcError as e:
            ch.close()
            raise connect_error(cluster.control_store_address, e) from None
        agent = _agent_address(cluster, cs)
        core = Core(job_id=job.job_id, objects=object_client, control_store=control_store,
                    stale_s=current_settings().refs_stale_s)
        session = GrpcSession(agent, core, name or _entrypoint())
        core.transport = session
        w = session.welcome
        st = _State(core=core, control_store_address=cluster.control_store_address,
                    object_store_address=w.object_store_address or _objects.local_object_store_address(address),
                    inline_threshold=current_settings().object_store_inline_threshold,
                    cluster_key=cluster.control_store_address, session=session, runtime_env=env, started=started,
                    _cs=cs, _cs_channel=ch)
        _state = st
        if address or started:
            connected_to(address or cluster.control_store_address)
        _objects.escape_hook = core.escape
        _objects.counter = core.refs
        core.start_refs()


def runtime_env_of(st: _State, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The runtime_env of a task or actor (``options["runtime_env"]``, validated, merged over this job's or
    worker's), resolved (its packages stored in the cluster), as the text its spec carries; and ``options``
    with its own runtime_env resolved, what a copy sent to another process carries (package uris, not paths
    that may not exist where it lands)."""
    from tessera import _runtime_env

    own = options.get("runtime_env")
    if not own:
        return _runtime_env.dumps(st.runtime_env), options
    own = _runtime_env.resolve(own, st.control_store(), st.cluster_key)
    return _runtime_env.dumps(_runtime_env.merge(st.runtime_env, own)), {**options, "runtime_env": own}


def connect_error(address: str, e: grpc.RpcError) -> Exception:
    """The one-line error for a cluster that cannot be reached or refuses this process."""
    code, details = e.code(), e.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ConnectionRefusedError(
            f"the cluster at {address} refused this process's credentials ({details}): set TESSERA_AUTH_TOKEN_FILE to "
            "the cluster's token (compose: deploy/secrets/auth_token; `tessera up --auth`: <run dir>/secrets/auth_token)")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ConnectionError(
            f"no Tessera cluster answered at {address} ({details}): check the address (compose: the gateway's "
            "published port, localhost:50051 by default; `tessera up`: `tessera status` prints it) and that it is up")
    return ConnectionError(f"the cluster at {address} answered {code.name}: {details}")


def _entrypoint() -> str:
    import sys

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def attach_worker(core: Core, *, object_store_address: str, control_store_address: str) -> None:
    """Inside a worker process: the task API talks through the worker's own agent connection."""
    global _state
    import json

    from tessera._runtime_env import ENV_VAR

    with _state_lock:
        _state = _State(core=core, control_store_address=control_store_address,
                        object_store_address=object_store_address,
                        inline_threshold=current_settings().object_store_inline_threshold, cluster_key=control_store_address,
                        runtime_env=json.loads(os.environ.get(ENV_VAR) or "{}"))
        _objects.escape_hook = core.escape
        _objects.counter = core.refs
        core.start_refs()


def is_initialized() -> bool:
    return _state is not None


def shutdown() -> None:
    """Disconnect this driver (its unfinished tasks are abandoned), and stop the local cluster ``init`` started."""
    global _state
    st = _state
    if st is not None and st.session is not None:  # a driver: what it owns goes with it
        try:
            st.core.release_all(f"owner died: the driver of job {st.core.job_id.hex()} exited")
            st.core.unpublish_refs()
        except Exception as e:
            log.warning("could not free this driver's objects: %s", e)
    with _state_lock:
        st, _state = _state, None
    if st is None:
        return
    if st.session is not None:
        connected_to(None)
    _objects.escape_hook = None
    _objects.counter = None
    st.core.close()
    if st._objects is not None:
        try:
            st._objects.flush(timeout=10.0)
        except Exception:
            pass
        st._objects.close()
    if st.session is not None:
        try:
            st.control_store().UpdateJobState(cpb.UpdateJobStateRequest(job_id=st.core.job_id,
                                                                        state=cpb.JOB_STATE_SUCCEEDED), timeout=5.0)
        except Exception:
            pass
        st.session.close()
    if st._cs_channel is not None:
        st._cs_channel.close()
    if st.started:
        import tessera._starter as _starter

        _starter.stop_local(st.started)


# ---------------------------------------------------------------------- the task API


def _as_list(refs: Any, what: str) -> tuple[list[ObjectRef], bool]:
    if isinstance(refs, ObjectRef):
        return [refs], True
    if isinstance(refs, list | tuple):
        bad = [type(r).__name__ for r in refs if not isinstance(r, ObjectRef)]
        if bad:
            raise TypeError(f"{what} takes ObjectRefs, got {bad[0]}")
        return list(refs), False
    raise TypeError(f"{what} takes an ObjectRef or a list of them, got {type(refs).__name__}")


def get(refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) of ``refs``, waiting up to ``timeout`` seconds (None: forever).

    Raises:
        TaskError: the task raised (also an instance of its exception's type where possible).
        WorkerCrashedError, ActorDiedError, TaskCancelledError, ObjectLostError, GetTimeoutError.
    """
    items, single = _as_list(refs, "tessera.get")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    st = _state
    if st is None:  # objects only (no tasks): the local object store, as before init
        return _objects.get(refs, timeout=timeout)
    values = st.core.get(items, timeout)
    return values[0] if single else values


def wait(refs: Sequence[ObjectRef], *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` are ready, or ``timeout``; returns ``(ready, not_ready)`` in input order."""
    items, single = _as_list(refs, "tessera.wait")
    if single:
        raise TypeError("tessera.wait takes a list of ObjectRefs")
    if len(set(items)) != len(items):
        raise ValueError("tessera.wait got the same ObjectRef twice")
    if not 0 <= num_returns <= len(items):
        raise ValueError(f"num_returns must be between 0 and {len(items)}, got {num_returns}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    ready, not_ready = state().core.wait(items, num_returns, timeout)
    return [items[i] for i in ready], [items[i] for i in not_ready]


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the local node's object store and return its reference."""
    if isinstance(value, ObjectRef):
        raise TypeError("tessera.put of an ObjectRef: pass the ref itself instead")
    st = _state
    if st is None:
        return _objects.put(value)
    with st.core.refs.capture() as nested:  # refs inside the value: held while it lives
        ser = serialize(value)
    big = ser.size > st.inline_threshold
    if big:
        st.core.flush_frees(records=False, urgent_only=True)  # what was dropped makes room first
    oid = ids.new_id("object_id")
    st.core.refs.own_put(oid, big=big)
    if nested:
        st.core.refs.contains(oid, nested)
    return st.objects().put_serialized(oid, ser)


def cancel(ref: Any, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes ``ref`` (Ray's ``ray.cancel``): dropped if queued; if running, interrupted
    (KeyboardInterrupt in its thread; an async actor call's coroutine is cancelled), or with ``force`` its
    worker is killed. ``get`` then raises TaskCancelledError. ``recursive``: the tasks it submitted that have
    not finished are cancelled too. A finished task is left alone; ``force`` is refused for actor calls."""
    from tessera._generators import ObjectRefGenerator

    if isinstance(ref, ObjectRefGenerator):  # a generator task: its items so far stay readable
        state().core.cancel(ref._task_ref(), force=force, recursive=recursive)
        return
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"tessera.cancel takes an ObjectRef or an ObjectRefGenerator, got {type(ref).__name__}")
    state().core.cancel(ref, force=force, recursive=recursive)


def kill(actor: Any) -> None:
    """Stop an actor now: its pending calls fail with ActorDiedError; it is not restarted."""
    from tessera._remote import ActorHandle

    if not isinstance(actor, ActorHandle):
        raise TypeError(f"tessera.kill takes an actor handle, got {type(actor).__name__}")
    st = state()
    st.core._send(pb.ClientFrame(kill_actor=[actor.actor_id]))


def get_actor(name: str, *, namespace: str = "") -> Any:
    """The handle of the live actor registered as ``name``.

    Raises:
        ValueError: no actor has that name.
    """
    from tessera._remote import ActorHandle

    if not isinstance(name, str) or not name:
        raise ValueError("get_actor needs a non-empty name")
    st = state()
    try:
        info = st.control_store().GetActor(cpb.GetActorRequest(name=name, namespace=namespace), timeout=10.0).actor
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise ValueError(f"no actor named {name!r} in namespace {namespace!r}") from None
        raise
    if info.state == cpb.ACTOR_STATE_DEAD:
        raise ValueError(f"the actor named {name!r} is dead: {info.death_cause}")
    return ActorHandle(info.actor_id, None, name)


def _check_id(oid: bytes) -> bytes:
    return ids.check_id("object_id", oid)


def free(refs: ObjectRef | Sequence[ObjectRef]) -> None:
    """Free objects now, every copy (``tessera.internal.free``, Ray's ``ray.internal.free``): a later get of one,
    anywhere, fails with ObjectFreedError. Freeing twice does nothing."""
    items, _ = _as_list(refs, "tessera.internal.free")
    if items:
        state().core.free_now([r.id for r in items])


# ---------------------------------------------------------------------- the runtime context, the cluster's nodes


class _HexId(str):
    """An id as its hex string (what Ray's ``get_*_id()`` return); ``.hex()`` too, as Ray's id objects have."""

    def hex(self) -> str:  # type: ignore[override]
        return str(self)


class RuntimeContext:
    """What this process runs as: its job, node, task and actor (Ray's ``ray.runtime_context.RuntimeContext``).

    In a driver, the task and actor ids are None; in a task, the actor id is None.
    """

    def __init__(self, st: _State) -> None:
        self._st = st

    @property
    def _in_worker(self) -> bool:
        return self._st.session is None

    def get_job_id(self) -> str:
        return self._st.core.job_id.hex()

    def get_node_id(self) -> str:
        return self._st.core.node_id.hex()

    def get_task_id(self) -> str | None:
        """The running task's id (in an actor: the running method's, or the constructor's); None in a driver."""
        if not self._in_worker:
            return None
        tid: bytes = getattr(self._st.core, "current_task", b"")
        return tid.hex() if tid else None

    def get_actor_id(self) -> str | None:
        """This actor's id, inside an actor; None elsewhere."""
        if not self._in_worker:
            return None
        return os.environ.get("TESSERA_WORKER_ACTOR") or None

    def get_worker_id(self) -> str:
        """This worker's id; in a driver, the id of its process (host and pid)."""
        return os.environ.get("TESSERA_WORKER_ID", "") if self._in_worker else self._st.core.refs_key.hex()

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        """The accelerators this worker holds, by kind, as strings (``{"GPU": ["0"]}``); none in a driver."""
        return {"GPU": [str(i) for i in get_gpu_ids()]}

    @property
    def job_id(self) -> _HexId:
        return _HexId(self.get_job_id())

    @property
    def node_id(self) -> _HexId:
        return _HexId(self.get_node_id())

    @property
    def task_id(self) -> _HexId | None:
        tid = self.get_task_id()
        return None if tid is None else _HexId(tid)

    @property
    def actor_id(self) -> _HexId | None:
        aid = self.get_actor_id()
        return None if aid is None else _HexId(aid)

    @property
    def current_actor(self) -> Any:
        """The handle of the actor this code runs in (RuntimeError outside an actor, as in Ray)."""
        from tessera._remote import ActorHandle

        aid = self.get_actor_id()
        if aid is None:
            raise RuntimeError("current_actor is only available inside an actor")
        return ActorHandle(bytes.fromhex(aid), None, "actor")

    @property
    def runtime_env(self) -> dict[str, Any]:
        """The runtime_env this process runs with (Ray's ``RuntimeContext.runtime_env``): in a driver, the job's;
        in a task or actor, its own, merged over the job's. ``working_dir`` and ``py_modules`` are package uris."""
        import copy

        return copy.deepcopy(self._st.runtime_env)

    def get(self) -> dict[str, Any]:
        """The ids as a dict (Ray's deprecated ``get()``)."""
        out: dict[str, Any] = {"job_id": self.job_id, "node_id": self.node_id}
        if self.task_id is not None:
            out["task_id"] = self.task_id
        if self.actor_id is not None:
            out["actor_id"] = self.actor_id
        return out


def get_runtime_context() -> RuntimeContext:
    """The ids of what this process runs as, in a driver (after ``init``), a task or an actor."""
    return RuntimeContext(state())


_warned_gpu_ids = False


def get_gpu_ids() -> list[int | str]:
    """The GPUs assigned to this task or actor (``num_gpus``), as in ``CUDA_VISIBLE_DEVICES`` (ints where they are
    numbers). A driver holds none: the empty list, as Ray's driver."""
    global _warned_gpu_ids
    st = state()
    if st.session is not None:
        if not _warned_gpu_ids:
            _warned_gpu_ids = True
            log.warning("tessera.get_gpu_ids() always returns [] in a driver: GPUs are assigned to tasks and actors")
        return []
    raw = os.environ.get("TESSERA_GPU_IDS", "")
    return [int(i) if i.isdigit() else i for i in raw.split(",") if i]


def _node_docs(cs: cpb_grpc.ControlStoreServiceStub) -> dict[str, dict[str, Any]]:
    """Each node agent's record of what its node offers (NODES_NAMESPACE), by node id in hex."""
    import json

    from tessera.common.names import NODES_NAMESPACE

    keys = cs.KvList(cpb.KvListRequest(namespace=NODES_NAMESPACE), timeout=10.0).keys
    calls = [(k, cs.KvGet.future(cpb.KvGetRequest(namespace=NODES_NAMESPACE, key=k), timeout=10.0)) for k in keys]
    out: dict[str, dict[str, Any]] = {}
    for key, call in calls:
        try:
            doc = json.loads(call.result().value)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                continue  # the agent stopped meanwhile
            raise
        except ValueError:
            log.warning("the resources record of node %s does not parse", key.decode(errors="replace"))
            continue
        if isinstance(doc, dict):
            out[key.decode()] = doc
    return out


def _fresh(doc: dict[str, Any] | None, now: float) -> bool:
    from tessera.common.names import NODES_HEARTBEAT_S

    return doc is not None and now - float(doc.get("time", 0)) <= float(doc.get("stale_s", 3 * NODES_HEARTBEAT_S))


def _amounts(raw: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def nodes() -> list[dict[str, Any]]:
    """The cluster's nodes, as Ray's ``ray.nodes()``: dicts with NodeID, Alive, NodeManagerAddress,
    NodeManagerHostname, NodeManagerPort, Resources (what the node offers: CPU, GPU, custom ones and its
    object store's memory; empty for a dead node) and Labels."""
    cs = control_store()
    records = cs.ListNodes(cpb.ListNodesRequest(), timeout=10.0).nodes
    docs = _node_docs(cs)
    now = time.time()
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n in records:
        nid = n.node_id.hex()
        seen.add(nid)
        doc = docs.get(nid)
        alive = n.state == cpb.NODE_STATE_ALIVE and (doc is None or _fresh(doc, now))
        resources = _amounts(doc.get("total")) if doc and _fresh(doc, now) else {}
        if "object_store_memory" in n.resources_total:
            resources["object_store_memory"] = n.resources_total["object_store_memory"]
        address = str(doc.get("address", "")) if doc else n.address
        out.append(_node_row(nid, alive, address, n.labels.get("hostname") or str((doc or {}).get("hostname", "")),
                             resources if alive else {}, dict(n.labels)))
    for nid, doc in docs.items():  # an agent whose node's object store never registered
        if nid not in seen:
            alive = _fresh(doc, now)
            out.append(_node_row(nid, alive, str(doc.get("address", "")), str(doc.get("hostname", "")),
                                 _amounts(doc.get("total")) if alive else {}, {}))
    return out


def _node_row(nid: str, alive: bool, address: str, hostname: str, resources: dict[str, float],
              labels: dict[str, str]) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"NodeID": nid, "Alive": alive, "alive": alive, "NodeManagerAddress": host or address,
            "NodeManagerHostname": hostname, "NodeManagerPort": int(port) if port.isdigit() else 0,
            "NodeName": host or address, "Resources": resources, "Labels": labels}


def cluster_resources() -> dict[str, float]:
    """What the cluster's alive nodes offer in all, by resource (Ray's ``ray.cluster_resources()``)."""
    total: dict[str, float] = {}
    for n in nodes():
        if n["Alive"]:
            for k, v in n["Resources"].items():
                total[k] = total.get(k, 0.0) + v
    return total


def available_resources() -> dict[str, float]:
    """What the cluster's alive nodes have free now, by resource, summed from each node agent's last record
    (twice a second at most, so it may lag by that): resources none is free of are left out, as in Ray."""
    cs = control_store()
    alive = {n.node_id.hex() for n in cs.ListNodes(cpb.ListNodesRequest(state=cpb.NODE_STATE_ALIVE),
                                                   timeout=10.0).nodes}
    now = time.time()
    free: dict[str, float] = {}
    for nid, doc in _node_docs(cs).items():
        if not _fresh(doc, now) or (alive and nid not in alive):
            continue
        for k, v in _amounts(doc.get("available")).items():
            free[k] = free.get(k, 0.0) + v
    return {k: v for k, v in free.items() if v > 1e-9}
