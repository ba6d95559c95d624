"""A worker process: runs the tasks its node agent leases to it, one at a time.

Started by the agent (``python -m tessera.task_scheduler.worker``) with the agent's
Unix socket in ``TESSERA_WORKER_SOCKET``. The same connection carries the tasks
to run and, because tasks may submit tasks, this worker's own submissions and
their results. A worker started for an actor holds that actor's instance for life.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
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
from tessera.task_scheduler.frames import FrameError, SocketConnection

log = logging.getLogger("tessera.worker")
_tracer = trace.get_tracer("tessera.task_scheduler.worker")
K = pb.TaskKind
E = pb.ErrorKind
#: How long a task waits for the control store (its function's code) or the node's object store (its large
#: return value) to come back from a restart, or for an earlier attempt's half-written return value to be aborted.
STORE_RETRY_S = 60.0


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

    # ------------------------------------------------------------------ connection

    def reader(self) -> None:
        try:
            while True:
                frame = self.conn.recv()
                if frame.results:
                    self.core.deliver(frame.results)
                for spec in frame.execute:
                    self.inbox.put(spec)
        except (FrameError, OSError):
            pass
        self.inbox.put(None)  # the agent is gone: so is this worker

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
        self.core.job_id = spec.job_id
        self.core.current_task = spec.task_id
        try:
            args, kwargs = self.arguments(spec)
            if spec.kind == K.TASK_KIND_ACTOR_CREATE:
                cls = self.load(spec.function_id)
                self.instance = cls(*args, **kwargs)
                values: list[Any] = [None]
            else:
                if spec.kind == K.TASK_KIND_ACTOR_METHOD:
                    if self.instance is None:
                        raise RuntimeError("the actor was not constructed")
                    fn = getattr(self.instance, spec.method)
                else:
                    fn = self.load(spec.function_id)
                out = fn(*args, **kwargs)
                if spec.num_returns == 1:
                    values = [out]
                elif spec.num_returns == 0:
                    values = []
                else:
                    values = list(out)
                    if len(values) != spec.num_returns:
                        raise ValueError(f"{spec.name} returned {len(values)} values; num_returns is {spec.num_returns}")
            return pb.TaskResult(task_id=spec.task_id, returns=[self.store(spec, i + 1, v) for i, v in enumerate(values)])
        except Exception as e:
            return self.failure(spec, e)
        finally:
            self.core.current_task = b""

    def store(self, spec: pb.TaskSpec, index: int, value: Any) -> pb.ReturnValue:
        oid = ids.object_id(spec.task_id, index)
        ser = serialize(value)
        if ser.size <= self.settings.object_store_inline_threshold:
            return pb.ReturnValue(object_id=oid, value=ser.to_bytes(), size=ser.size)
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
        return pb.ReturnValue(object_id=oid, stored=True, size=ser.size)

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
        err = pb.TaskError(kind=E.ERROR_KIND_TASK, message=str(e), traceback=tb, exception=pickled,
                           type_name=type(e).__name__)
        return pb.TaskResult(task_id=spec.task_id, error=err)

    def serve(self) -> None:
        threading.Thread(target=self.reader, name="tessera-worker-reader", daemon=True).start()
        while True:
            spec = self.inbox.get()
            if spec is None:
                return
            result = self.run(spec)
            self.report_borrows(result)
            try:
                self.conn.send(pb.ClientFrame(done=[result]))
            except OSError:
                return


    def report_borrows(self, result: pb.TaskResult) -> None:
        """Refs it still holds (a global, an actor's state, a task it lent them to) or passed on: their owners
        keep those objects while this worker's reference table lists them. The table is published before the
        result leaves, so that an owner reading it after the result never misses them."""
        borrowed = self.core.refs.borrowed_report()
        if not borrowed:
            return
        result.borrowed_object_ids.extend(borrowed)
        try:
            self.core.publish_refs(force=True)
        except Exception as e:  # no table to follow: the owners keep them (an actor's: until it dies)
            log.warning("could not publish this worker's reference table: %s", e)
            return
        result.borrower = self.core.refs_key.decode()


def _status(e: Exception) -> str:
    """The gRPC status name of an object-store error: an RpcError's code, a TesseraError's ``code``;
    a connection that broke (a store restarting) is UNAVAILABLE."""
    if isinstance(e, grpc.RpcError):
        return str(e.code().name)  # type: ignore[attr-defined]
    if isinstance(e, TesseraError):
        return e.code
    return "UNAVAILABLE"


def main() -> None:
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
    w.core.node_id = welcome.node_id
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
