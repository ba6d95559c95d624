"""A worker process: runs the tasks its node agent leases to it (one at a time), or an actor's calls.

Started by the agent (``python -m tessera.task_scheduler.worker``) with the agent's
Unix socket in ``TESSERA_WORKER_SOCKET``. The same connection carries the tasks
to run and, because tasks may submit tasks, this worker's own submissions and
their results. A worker started for an actor holds that actor's instance for life.

Actors run their calls as Ray's do. A plain actor runs one at a time, in the order
they came. ``max_concurrency=N`` runs up to N at once in a pool of threads (a
threaded actor). An actor with an ``async def`` method is an async actor: its calls
run as coroutines on one event loop in a thread of their own, up to max_concurrency
(1000 unless set) at once; its plain ``def`` methods run on that loop's thread too,
blocking it while they run (as in Ray). ``concurrency_groups`` give each named group
its own limit (a pool, or a semaphore on the loop); the rest share max_concurrency.

Cancelling a running task raises KeyboardInterrupt in the thread that runs it (the
main thread: a SIGINT sent to it wakes it from a blocking call), as Ray does; a running call of an async actor has its coroutine cancelled, and a call
already running in a plain or threaded actor runs on (calls not started yet are
dropped). Either way its result is TaskCancelledError.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cloudpickle
import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from tessera import _api
from tessera._core import Core
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.client.objects import ObjectRef
from tessera.common import auth, ids
from tessera.common.config import Settings
from tessera.common.errors import TesseraError
from tessera.common.serialization import deserialize, serialize
from tessera.common.telemetry import context_from_traceparent, flush_tracing, setup_tracing, shutdown_tracing
from tessera.task_scheduler import runtime_env, worker_logs
from tessera.task_scheduler.frames import FrameError, SocketConnection

log = logging.getLogger("tessera.worker")
_tracer = trace.get_tracer("tessera.task_scheduler.worker")
#: Calls an async actor runs at once unless max_concurrency says otherwise (Ray's default).
ASYNC_MAX_CONCURRENCY = 1000
#: Where ``@tessera.method`` keeps a method's options (tessera._remote.METHOD_OPTIONS_ATTR).
METHOD_OPTIONS_ATTR = "__tessera_method_options__"
#: TaskSpec.generator of a dynamic generator task (1: streaming).
GENERATOR_DYNAMIC = 2
#: How long a task waits for the control store (its function's code) or the node's object store (its large
#: return value) to come back from a restart, or for an earlier attempt's half-written return value to be aborted.
STORE_RETRY_S = 60.0


@dataclass
class _Running:
    """How to interrupt a task that runs now."""

    thread: int
    interruptible: bool  # a task, in the main thread (not an actor's call: those run on, as in Ray)
    task: asyncio.Task[Any] | None = None  # an async actor's call
    loop: asyncio.AbstractEventLoop | None = None
    interrupted: bool = False


class Worker:
    def __init__(self, conn: SocketConnection, settings: Settings, worker_id: bytes, actor_id: bytes) -> None:
        self.conn = conn
        self.settings = settings
        self.worker_id = worker_id
        self.actor_id = actor_id
        self.inbox: queue.SimpleQueue[pb.TaskSpec | None] = queue.SimpleQueue()
        self.functions: dict[bytes, Any] = {}
        self.instance: Any = None
        self.core = Core(job_id=b"\0" * ids.JOB_ID_LEN, objects=_api.object_client, control_store=_api.control_store,
                         worker=True, stale_s=settings.refs_stale_s)
        self.core.transport = conn
        self.lock = threading.Lock()  # guards received, cancelled and running
        self.received: set[bytes] = set()  # tasks sent here, not finished
        self.cancelled: set[bytes] = set()  # of those, the ones cancelled
        self.running: dict[bytes, _Running] = {}
        self.actor: ActorRunner | None = None
        # a cancel asks the main thread to raise KeyboardInterrupt: a SIGINT sent to that thread wakes it from
        # a blocking call (a sleep, a wait), which an exception set from another thread would not
        self.interrupt_pending = False
        #: Why this worker's runtime_env could not be set up: every task given to it fails with it.
        self.setup_error: Exception | None = None

    # ------------------------------------------------------------------ connection

    def reader(self) -> None:
        try:
            while True:
                frame = self.conn.recv()
                if frame.results:
                    self.core.deliver(frame.results)
                if frame.execute:
                    with self.lock:
                        self.received.update(s.task_id for s in frame.execute)
                    for spec in frame.execute:
                        self.inbox.put(spec)
                if frame.cancel:
                    self.cancel(list(frame.cancel), force=frame.force, recursive=frame.recursive)
        except (FrameError, OSError):
            pass
        self.inbox.put(None)  # the agent is gone: so is this worker

    # ------------------------------------------------------------------ cancellation

    def cancel(self, task_ids: list[bytes], *, force: bool, recursive: bool) -> None:
        """The agent cancels tasks sent here: one not started is dropped when its turn comes; one running is
        interrupted. ``recursive``: what they submitted and is not finished is cancelled too. ``force``: the
        agent has already failed them and stops this worker; it exits once their children are cancelled."""
        for tid in task_ids:
            with self.lock:
                if tid not in self.received:
                    continue  # finished already: nothing to do
                self.cancelled.add(tid)
                r = self.running.get(tid)
                if r is not None and not force and not r.interrupted:
                    if r.task is not None and r.loop is not None:
                        r.interrupted = True
                        r.loop.call_soon_threadsafe(r.task.cancel)
                    elif r.interruptible:
                        r.interrupted = True
                        self.interrupt_pending = True
                        signal.pthread_kill(r.thread, signal.SIGINT)
            if recursive:
                try:
                    self.core.cancel_children(tid, force=force)
                except Exception as e:  # the agent is gone: so are the children's results
                    log.warning("could not cancel the tasks %s submitted: %s", tid.hex(), e)
        if force:
            sys.stdout.flush()
            os._exit(1)

    def _started(self, spec: pb.TaskSpec, running: _Running) -> bool:
        """Record that ``spec`` runs now; False if it was cancelled before it started."""
        with self.lock:
            if spec.task_id in self.cancelled:
                return False
            self.running[spec.task_id] = running
            return True

    def _ended(self, spec: pb.TaskSpec) -> bool:
        """``spec`` no longer runs: an interrupt not raised yet is withdrawn. Whether it was cancelled.
        Idempotent (an interrupt may land while it runs: then it runs again)."""
        tid = spec.task_id
        with self.lock:
            r = self.running.pop(tid, None)
            if r is not None and r.interruptible:
                self.interrupt_pending = False
            return tid in self.cancelled

    def on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT (in the main thread): the interrupt of a cancel, else ignored (the agent decides when a
        worker ends)."""
        if self.interrupt_pending:
            self.interrupt_pending = False
            raise KeyboardInterrupt

    def _forget(self, tid: bytes) -> None:
        with self.lock:
            self.received.discard(tid)
            self.cancelled.discard(tid)

    def cancelled_result(self, spec: pb.TaskSpec) -> pb.TaskResult:
        return pb.TaskResult(task_id=spec.task_id, error=pb.TaskError(kind=pb.ERROR_KIND_CANCELLED,
                                                                      message="cancelled while running"))

    def execute(self, spec: pb.TaskSpec, *, interruptible: bool) -> None:
        """Run ``spec`` in this thread (unless cancelled first) and send its result."""
        result: pb.TaskResult | None = None
        if self._started(spec, _Running(threading.get_ident(), interruptible)):
            try:
                try:
                    result = self.run(spec)
                finally:
                    cancelled = self._ended(spec)
            except KeyboardInterrupt:  # the interrupt of a cancel (it lands at most once)
                cancelled = self._ended(spec)
        else:
            cancelled = True
        self._forget(spec.task_id)
        if cancelled or result is None:
            result = self.cancelled_result(spec)
        self.send_result(result, spec)

    def send_result(self, result: pb.TaskResult, spec: pb.TaskSpec) -> None:
        self.report_borrows(result, spec.owner_refs_key)
        try:
            self.conn.send(pb.ClientFrame(done=[result]))
        except OSError:
            pass  # the agent is gone: the reader ends this worker

    # ------------------------------------------------------------------ execution

    def load(self, function_id: bytes) -> Any:
        fn = self.functions.get(function_id)
        if fn is None:
            stub = _api.control_store()
            deadline = time.monotonic() + STORE_RETRY_S
            while True:
                try:
                    info = stub.GetFunction(cpb.GetFunctionRequest(function_id=function_id), timeout=30.0).function
                    break
                except grpc.RpcError as e:
                    code = e.code()  # type: ignore[attr-defined]
                    if code == grpc.StatusCode.NOT_FOUND:
                        raise LookupError(f"function {function_id.hex()} is not exported in this cluster") from None
                    if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                time.sleep(0.5)  # the control store is restarting: the task waits for it rather than failing
            fn = self.functions[function_id] = cloudpickle.loads(info.code)
        return fn

    def arguments(self, spec: pb.TaskSpec) -> tuple[list[Any], dict[str, Any]]:
        refs = [ObjectRef(a.object_id) for a in spec.args if a.WhichOneof("kind") == "object_id"]
        fetched = iter(self.core.get(refs, None)) if refs else iter(())
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for a in spec.args:
            v = deserialize(a.value) if a.WhichOneof("kind") == "value" else next(fetched)
            if a.keyword:
                kwargs[a.keyword] = v
            else:
                args.append(v)
        return args, kwargs

    def run(self, spec: pb.TaskSpec) -> pb.TaskResult:
        """Run ``spec`` here, in its trace if it has one."""
        parent = context_from_traceparent(spec.traceparent)
        if parent is None:
            return self._run(spec)
        try:
            with _tracer.start_as_current_span(f"task {spec.name}", context=parent, kind=SpanKind.CONSUMER,
                                               attributes={"tessera.task.id": spec.task_id.hex()}):
                return self._run(spec)
        finally:
            flush_tracing()  # an actor's worker dies when the actor is killed: its spans leave now

    def _run(self, spec: pb.TaskSpec) -> pb.TaskResult:
        start = time.time()
        result = self._run_timed(spec)
        return self.stamp(result, start)

    def stamp(self, result: pb.TaskResult, start: float) -> pb.TaskResult:
        """When and where the task ran (``tessera.timeline``)."""
        result.start_us = int(start * 1e6)
        result.end_us = max(result.start_us + 1, int(time.time() * 1e6))
        result.worker_id = self.worker_id
        return result

    def _run_timed(self, spec: pb.TaskSpec) -> pb.TaskResult:
        self.core.job_id = spec.job_id
        self.core.current_task = spec.task_id
        try:
            if self.setup_error is not None:
                raise self.setup_error
            args, kwargs = self.arguments(spec)
            if spec.kind == pb.TASK_KIND_ACTOR_CREATE:
                cls = self.load(spec.function_id)
                self.instance = cls(*args, **kwargs)
                self.actor = ActorRunner(self, cls, spec)
                values: list[Any] = [None]
            else:
                if spec.kind == pb.TASK_KIND_ACTOR_METHOD:
                    if self.instance is None:
                        raise RuntimeError("the actor was not constructed")
                    fn = getattr(self.instance, spec.method)
                else:
                    fn = self.load(spec.function_id)
                out = fn(*args, **kwargs)
                if spec.generator:
                    return self.stream(spec, out)
                values = self.values(spec, out)
            return pb.TaskResult(task_id=spec.task_id, returns=[self.store(spec, i + 1, v) for i, v in enumerate(values)])
        except Exception as e:
            return self.failure(spec, e)
        finally:
            self.core.current_task = b""

    def stream(self, spec: pb.TaskSpec, out: Any) -> pb.TaskResult:
        """A generator task: each value it yields goes to the owner at once (a partial result), so the owner
        reads item 1 while the task still runs. An exception mid-stream ends it: the owner raises it at the
        next item."""
        items = _iterator(spec, out)
        n = 0
        try:
            for v in items:
                n += 1
                self.send_item(spec, n, v)
        except Exception as e:
            return self.stream_end(self.failure(spec, e), n)
        return self.stream_end(pb.TaskResult(task_id=spec.task_id), n)

    def send_item(self, spec: pb.TaskSpec, n: int, value: Any) -> None:
        """Item ``n`` (from 1) of a generator task: return index n, or n + 1 for a dynamic one (return 1 is
        then the list of the items' refs, made by the owner when the task ends)."""
        rv = self.store(spec, n + (1 if spec.generator == GENERATOR_DYNAMIC else 0), value)
        self.conn.send(pb.ClientFrame(done=[pb.TaskResult(task_id=spec.task_id, returns=[rv], partial=True)]))

    @staticmethod
    def stream_end(result: pb.TaskResult, n: int) -> pb.TaskResult:
        result.stream_items = n
        return result

    def values(self, spec: pb.TaskSpec, out: Any) -> list[Any]:
        """A call's return value as its ``num_returns`` values."""
        if spec.num_returns == 1:
            return [out]
        if spec.num_returns == 0:
            return []
        values = list(out)
        if len(values) != spec.num_returns:
            raise ValueError(f"{spec.name} returned {len(values)} values; num_returns is {spec.num_returns}")
        return values

    def store(self, spec: pb.TaskSpec, index: int, value: Any) -> pb.ReturnValue:
        oid = ids.object_id(spec.task_id, index)
        refs = self.core.refs
        with refs.capture() as nested:
            ser = serialize(value)
        if nested:  # lent to the submitter, which holds them while the value lives
            refs.lend(nested, spec.owner_refs_key if spec.owner_refs_key != self.core.refs_key.decode() else "")
        if ser.size <= self.settings.object_store_inline_threshold:
            return pb.ReturnValue(object_id=oid, value=ser.to_bytes(), size=ser.size, contained_ids=nested)
        store = _api.object_client()
        deadline = time.monotonic() + STORE_RETRY_S
        while True:
            try:
                store.put_serialized(oid, ser, owner=spec.owner)
                break
            except (grpc.RpcError, TesseraError, ConnectionError) as e:
                code = _status(e)  # (gRPC and the store's local socket say the same in their own words)
                if code == "UNAVAILABLE" and time.monotonic() < deadline:
                    time.sleep(0.2)  # the node's store is restarting: the value goes in once it is back
                    continue
                if code != "ALREADY_EXISTS":
                    raise
            # an earlier attempt of this task, whose worker died, stored it (done) or was writing it when it
            # died (aborted once the store notices the dead session): then this attempt writes it again
            if store.contains([oid])[0]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"return value {oid.hex()} is still being written by an earlier attempt")
            time.sleep(0.1)
        return pb.ReturnValue(object_id=oid, stored=True, size=ser.size, contained_ids=nested)

    def failure(self, spec: pb.TaskSpec, e: Exception) -> pb.TaskResult:
        frames = e.__traceback__
        while frames is not None and frames.tb_frame.f_code.co_filename == __file__:
            frames = frames.tb_next  # start at the user's code, not the worker's
        tb = "".join(traceback.format_exception(type(e), e, frames))
        try:
            blob = cloudpickle.dumps(e)
            pickled = blob if len(blob) < 1 << 20 else b""
        except Exception:
            pickled = b""
        err = pb.TaskError(kind=pb.ERROR_KIND_TASK, message=str(e), traceback=tb, exception=pickled,
                           type_name=type(e).__name__)
        return pb.TaskResult(task_id=spec.task_id, error=err)

    def serve(self) -> None:
        threading.Thread(target=self.reader, name="tessera-worker-reader", daemon=True).start()
        while True:
            spec = self.inbox.get()
            if spec is None:
                return
            actor = self.actor
            if spec.kind == pb.TASK_KIND_ACTOR_METHOD and actor is not None:
                actor.submit(spec)  # here (a plain actor), or alongside others (a threaded or async actor)
                continue
            # a task (interrupted by a cancel), or a plain actor's call (runs on, as in Ray)
            self.execute(spec, interruptible=spec.kind == pb.TASK_KIND_NORMAL)

    def report_borrows(self, result: pb.TaskResult, to: str) -> None:
        """Refs it still holds (a global, an actor's state, a task it lent them to) or passed on: their owners
        keep those objects while this worker's reference table lists them. The table is published before the
        result leaves, so that an owner reading it after the result never misses them. ``to``: the submitter's
        table, which lists the refs nested in the returned values."""
        borrowed = self.core.refs.borrowed_report(to)
        if not borrowed:
            return
        result.borrowed_object_ids.extend(borrowed)
        try:
            self.core.publish_refs(force=True)
        except Exception as e:  # no table to follow: the owners keep them (an actor's: until it dies)
            log.warning("could not publish this worker's reference table: %s", e)
            return
        result.borrower = self.core.refs_key.decode()


class ActorRunner:
    """How an actor's calls run: in this thread one at a time, in pools of threads (a threaded actor), or as
    coroutines on an event loop of its own (an async actor); a limit per concurrency group."""

    def __init__(self, worker: Worker, cls: type, spec: pb.TaskSpec) -> None:
        self.worker = worker
        self.cls = cls
        self.is_async = any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
                            for _, f in inspect.getmembers(cls, callable))
        default = int(spec.max_concurrency) or (ASYNC_MAX_CONCURRENCY if self.is_async else 1)
        self.limits: dict[str, int] = {"": default, **{g: int(n) for g, n in spec.concurrency_groups.items()}}
        self.inline = not self.is_async and len(self.limits) == 1 and default == 1
        self.pools: dict[str, ThreadPoolExecutor] = {}
        self.semaphores: dict[str, asyncio.Semaphore] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        if self.is_async:
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="tessera-actor-loop", daemon=True).start()
        elif not self.inline:
            self.pools = {g: ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"tessera-actor-{g or 'default'}")
                          for g, n in self.limits.items()}

    def group(self, spec: pb.TaskSpec) -> str:
        """The call's concurrency group: its own option, else its method's, else the default ("")."""
        g = spec.concurrency_group
        if not g:
            fn = getattr(self.cls, spec.method, None)
            g = (getattr(fn, METHOD_OPTIONS_ATTR, None) or {}).get("concurrency_group") or ""
        if g not in self.limits:
            raise ValueError(f"{spec.name}: the actor has no concurrency group {g!r} "
                             f"(its groups: {', '.join(sorted(x for x in self.limits if x)) or 'none'})")
        return g

    def submit(self, spec: pb.TaskSpec) -> None:
        try:
            g = self.group(spec)
        except ValueError as e:
            self.worker._forget(spec.task_id)
            self.worker.send_result(self.worker.failure(spec, e), spec)
            return
        if self.inline:
            self.worker.execute(spec, interruptible=False)
        elif self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.call(spec, g), self.loop)
        else:
            self.pools[g].submit(self.worker.execute, spec, interruptible=False)

    async def call(self, spec: pb.TaskSpec, group: str) -> None:
        """One call of an async actor, once its group has room (calls take their turns in order). A cancel
        cancels its coroutine, whether it runs or still waits for room."""
        sem = self.semaphores.get(group)
        if sem is None:
            sem = self.semaphores[group] = asyncio.Semaphore(self.limits[group])
        w = self.worker
        result: pb.TaskResult | None = None
        if w._started(spec, _Running(threading.get_ident(), False, task=asyncio.current_task(), loop=self.loop)):
            try:
                async with sem:
                    parent = context_from_traceparent(spec.traceparent)
                    if parent is None:
                        result = await self._call(spec)
                    else:
                        with _tracer.start_as_current_span(f"task {spec.name}", context=parent, kind=SpanKind.CONSUMER,
                                                           attributes={"tessera.task.id": spec.task_id.hex()}):
                            result = await self._call(spec)
            except asyncio.CancelledError:
                result = None
            finally:
                w._ended(spec)
                if spec.traceparent:
                    flush_tracing()
        w._forget(spec.task_id)
        w.send_result(result if result is not None else w.cancelled_result(spec), spec)

    async def _call(self, spec: pb.TaskSpec) -> pb.TaskResult:
        start = time.time()
        return self.worker.stamp(await self._call_timed(spec), start)

    async def _call_timed(self, spec: pb.TaskSpec) -> pb.TaskResult:
        w = self.worker
        w.core.current_task = spec.task_id  # this coroutine's context only
        try:
            if any(a.WhichOneof("kind") == "object_id" for a in spec.args):
                args, kwargs = await asyncio.to_thread(w.arguments, spec)  # a get must not stall the loop
            else:
                args, kwargs = w.arguments(spec)
            out = getattr(w.instance, spec.method)(*args, **kwargs)  # a plain method runs on the loop's thread
            if spec.generator and inspect.isasyncgen(out):
                n = 0
                try:
                    async for v in out:
                        n += 1
                        w.send_item(spec, n, v)
                except Exception as e:
                    return w.stream_end(w.failure(spec, e), n)
                return w.stream_end(pb.TaskResult(task_id=spec.task_id), n)
            if spec.generator:
                return w.stream(spec, out)
            if inspect.isawaitable(out):
                out = await out
            values = w.values(spec, out)
            return pb.TaskResult(task_id=spec.task_id, returns=[w.store(spec, i + 1, v) for i, v in enumerate(values)])
        except Exception as e:
            return w.failure(spec, e)


def _iterator(spec: pb.TaskSpec, out: Any) -> Any:
    """The values a generator task yields (a generator, or any iterable it returned)."""
    try:
        return iter(out)
    except TypeError:
        raise TypeError(f"{spec.name} was called as a generator task (num_returns='streaming' or 'dynamic') but "
                        f"returned {type(out).__name__}, which is not iterable") from None


def _status(e: Exception) -> str:
    """The gRPC status name of an object-store error: an RpcError's code, a TesseraError's ``code``;
    a connection that broke (a store restarting) is UNAVAILABLE."""
    if isinstance(e, grpc.RpcError):
        return str(e.code().name)  # type: ignore[attr-defined]
    if isinstance(e, TesseraError):
        return e.code
    return "UNAVAILABLE"


def _setup_runtime_env(settings: Settings) -> Exception | None:
    """This worker's runtime_env (``TESSERA_RUNTIME_ENV``) set up, its packages read from the control store's KV
    into this node's cache; what went wrong, as the RuntimeEnvSetupError its tasks then fail with."""
    text = os.environ.get(runtime_env.ENV_VAR, "")
    if not text:
        return None
    from tessera.common import packages
    from tessera.common.names import RUNTIME_RESOURCES_DIR
    from tessera.common.registry import control_store_stub
    from tessera.exceptions import RuntimeEnvSetupError

    channels: list[grpc.Channel] = []

    def fetch(uri: str) -> bytes:
        ch, stub = control_store_stub(settings.control_store_address)
        channels.append(ch)
        try:
            return bytes(stub.KvGet(cpb.KvGetRequest(namespace=packages.NAMESPACE, key=packages.key_of(uri)),
                                    timeout=60.0).value)
        except grpc.RpcError as e:
            raise RuntimeEnvSetupError(f"package {uri} could not be read from the control store: "
                                       f"{e.code().name} {e.details()}") from None  # type: ignore[attr-defined]

    cache = settings.run_dir / RUNTIME_RESOURCES_DIR / os.environ.get("TESSERA_NODE_ID", "node")[:16]
    try:
        runtime_env.setup(text, cache, fetch)
        return None
    except RuntimeEnvSetupError as e:
        return e
    except Exception as e:
        return RuntimeEnvSetupError(f"the runtime_env could not be set up: {type(e).__name__}: {e}")
    finally:
        for ch in channels:
            ch.close()


def main() -> None:
    prefix = os.environ.get("TESSERA_WORKER_LOG", "")
    if prefix:  # its own stdout and stderr files, before anything is written
        try:
            worker_logs.redirect(prefix)
        except OSError as e:
            print(f"worker: could not open its log files {prefix}.*: {e}", file=sys.stderr)
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when a worker ends
    worker_id = bytes.fromhex(os.environ["TESSERA_WORKER_ID"])
    actor_id = bytes.fromhex(os.environ.get("TESSERA_WORKER_ACTOR", ""))
    conn = SocketConnection(os.environ["TESSERA_WORKER_SOCKET"])
    conn.send(pb.ClientFrame(hello=pb.Hello(worker=True, worker_id=worker_id, name=actor_id.hex(),
                                            token=auth.client_token(settings))))
    welcome = conn.recv().welcome
    w = Worker(conn, settings, worker_id, actor_id)
    w.setup_error = _setup_runtime_env(settings)
    signal.signal(signal.SIGINT, w.on_sigint)
    w.core.node_id = welcome.node_id
    if prefix:  # each task's output starts with a line naming it (tessera logs --task)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stdout = worker_logs.MarkedStream(sys.stdout, w.core._current.get)  # type: ignore[arg-type,assignment]
        sys.stderr = worker_logs.MarkedStream(sys.stderr, w.core._current.get)  # type: ignore[arg-type,assignment]
    _api.attach_worker(w.core, object_store_address=welcome.object_store_address,
                       control_store_address=settings.control_store_address)
    setup_tracing("task-scheduler")  # tasks submitted under a span run in its trace
    try:
        w.serve()
    finally:
        try:
            w.core.unpublish_refs()  # what it borrowed is released now, not once its table goes stale
        except Exception as e:
            log.debug("could not remove this worker's reference table: %s", e)
        conn.close()
        shutdown_tracing()
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: the agent is waiting for nothing more


if __name__ == "__main__":
    main()
