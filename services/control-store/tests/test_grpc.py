"""The control store as a process, over gRPC: status codes, Watch, health and reflection."""

from __future__ import annotations

import hashlib
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.api.control_store.v1 import control_store_pb2_grpc as pb_grpc
from tessera.common import ids
from tessera.common.registry import CONTROL_STORE_SERVICE, control_store_stub
from tessera.common.rpc import health_status, stream_channel
from tessera.control_store.store import MAX_BATCH


@pytest.fixture
def stub(control_store: str) -> Iterator[Any]:
    ch, s = control_store_stub(control_store, timeout=10)
    yield s
    ch.close()


def code_of(fn: Any, *args: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code(), e.value.details()  # type: ignore[attr-defined]


def job(stub: Any) -> bytes:
    jid = ids.new_id("job_id")
    stub.CreateJob(pb.CreateJobRequest(job=pb.JobInfo(job_id=jid)))
    return jid


def spec(jid: bytes, task_id: bytes | None = None, **kw: Any) -> pb.TaskSpec:
    return pb.TaskSpec(task_id=ids.new_id("task_id") if task_id is None else task_id, job_id=jid,
                       function_id=hashlib.sha256(b"f").digest(), **kw)


def ns() -> str:
    return "t" + uuid.uuid4().hex[:12]


# ------------------------------------------------------------------ health, reflection, registration


def test_health_and_reflection(control_store: str) -> None:
    assert health_status(control_store) == "SERVING"
    assert health_status(control_store, service=CONTROL_STORE_SERVICE) == "SERVING"
    with grpc.insecure_channel(control_store) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {CONTROL_STORE_SERVICE, "grpc.health.v1.Health"} <= names
        (resp,) = list(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=CONTROL_STORE_SERVICE)]), timeout=5))
        assert resp.file_descriptor_response.file_descriptor_proto


def test_the_control_store_registers_itself(stub: Any, control_store: str) -> None:
    (me,) = [i for i in stub.ListInstances(pb.ListInstancesRequest(service="control-store")).instances
             if i.instance_id == "cs-shared"]
    assert me.address == control_store and me.pid > 0


# ------------------------------------------------------------------ precise status codes; nothing changes


def test_wrong_id_length_names_the_field(stub: Any) -> None:
    jid = job(stub)
    good = spec(jid)
    bad = spec(jid, task_id=b"\x01" * 15)
    assert code_of(stub.CreateTasks, pb.CreateTasksRequest(specs=[good, bad])) == (
        grpc.StatusCode.INVALID_ARGUMENT, "spec.task_id must be 16 bytes, got 15 bytes")
    assert code_of(stub.GetTasks, pb.GetTasksRequest(task_ids=[good.task_id]))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.GetNode, pb.GetNodeRequest(node_id=b"abc")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "node_id must be 16 bytes, got 3 bytes")
    assert code_of(stub.CreateJob, pb.CreateJobRequest(job=pb.JobInfo(job_id=b"12345"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "job.job_id must be 4 bytes, got 5 bytes")
    assert code_of(stub.GetObjects, pb.GetObjectsRequest(object_ids=[b""])) == (
        grpc.StatusCode.INVALID_ARGUMENT, "object_id must be 20 bytes, got empty")
    t = ids.new_id("task_id").hex()
    assert code_of(stub.CreateTasks, pb.CreateTasksRequest(specs=[spec(jid, bytes.fromhex(t), arg_object_ids=[b"x"])])) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"task {t}: arg_object_ids must be 20 bytes, got 1 bytes")


def test_not_found(stub: Any) -> None:
    jid = ids.new_id("job_id")
    assert code_of(stub.GetJob, pb.GetJobRequest(job_id=jid)) == (grpc.StatusCode.NOT_FOUND, f"job {jid.hex()} not found")
    n = ns()
    assert code_of(stub.KvGet, pb.KvGetRequest(namespace=n, key=b"k")) == (
        grpc.StatusCode.NOT_FOUND, f"key b'k' not found in namespace '{n}'")
    a = ids.new_id("actor_id")
    assert code_of(stub.UpdateActor, pb.UpdateActorRequest(actor_id=a, state=pb.ACTOR_STATE_ALIVE)) == (
        grpc.StatusCode.NOT_FOUND, f"actor {a.hex()} not found")


def test_already_exists_changes_nothing(stub: Any) -> None:
    jid = job(stub)
    assert code_of(stub.CreateJob, pb.CreateJobRequest(job=pb.JobInfo(job_id=jid, entrypoint="again"))) == (
        grpc.StatusCode.ALREADY_EXISTS, f"job {jid.hex()} already exists")
    assert stub.GetJob(pb.GetJobRequest(job_id=jid)).job.entrypoint == ""
    existing = spec(jid)
    assert stub.CreateTasks(pb.CreateTasksRequest(specs=[existing])).created == 1
    fresh = [spec(jid) for _ in range(10)]
    assert code_of(stub.CreateTasks, pb.CreateTasksRequest(specs=[*fresh[:5], existing, *fresh[5:]])) == (
        grpc.StatusCode.ALREADY_EXISTS, f"task {existing.task_id.hex()} already exists")
    for s in fresh:
        assert code_of(stub.GetTasks, pb.GetTasksRequest(task_ids=[s.task_id]))[0] == grpc.StatusCode.NOT_FOUND
    n = ns()
    stub.KvPut(pb.KvPutRequest(namespace=n, key=b"k", value=b"1", overwrite=False))
    assert code_of(stub.KvPut, pb.KvPutRequest(namespace=n, key=b"k", value=b"2", overwrite=False))[0] == \
        grpc.StatusCode.ALREADY_EXISTS
    assert stub.KvGet(pb.KvGetRequest(namespace=n, key=b"k")).value == b"1"


def test_failed_precondition_changes_nothing(stub: Any) -> None:
    jid = job(stub)
    a, b = spec(jid), spec(jid)
    stub.CreateTasks(pb.CreateTasksRequest(specs=[a, b]))
    stub.UpdateTaskStates(pb.UpdateTaskStatesRequest(updates=[
        pb.TaskStateUpdate(task_id=b.task_id, state=pb.TASK_STATE_CANCELLED)]))
    code, details = code_of(stub.UpdateTaskStates, pb.UpdateTaskStatesRequest(updates=[
        pb.TaskStateUpdate(task_id=a.task_id, state=pb.TASK_STATE_RUNNING),
        pb.TaskStateUpdate(task_id=b.task_id, state=pb.TASK_STATE_RUNNING),
    ]))
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION,
                               f"task {b.task_id.hex()}: illegal transition TASK_STATE_CANCELLED -> TASK_STATE_RUNNING")
    got = stub.GetTasks(pb.GetTasksRequest(task_ids=[a.task_id, b.task_id])).tasks
    assert [t.state for t in got] == [pb.TASK_STATE_PENDING, pb.TASK_STATE_CANCELLED]
    put = ids.new_id("object_id")
    assert code_of(stub.GetLineage, pb.GetLineageRequest(object_id=put)) == (
        grpc.StatusCode.FAILED_PRECONDITION, f"object {put.hex()} was not produced by a task (it was put) and cannot be rebuilt")


def test_other_statuses(stub: Any) -> None:
    jid = job(stub)
    s = spec(jid)
    assert code_of(stub.CreateTasks, pb.CreateTasksRequest(specs=[s] * (MAX_BATCH + 1))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"CreateTasks: batch of {MAX_BATCH + 1} exceeds the limit of {MAX_BATCH}")
    assert code_of(stub.CreateTasks, pb.CreateTasksRequest()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "CreateTasks: the batch is empty")
    assert code_of(stub.RegisterInstance, pb.RegisterInstanceRequest(instance=pb.ServiceInstance(
        service="x", instance_id="y", address="a:1"), ttl_s=100_000))[0] == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ round trips


def test_task_round_trip(stub: Any) -> None:
    jid = job(stub)
    specs = [spec(jid, args=bytes([i]) * i, resources={"CPU": 1.0}) for i in range(200)]
    assert stub.CreateTasks(pb.CreateTasksRequest(specs=specs)).created == 200
    got = stub.GetTasks(pb.GetTasksRequest(task_ids=[s.task_id for s in specs])).tasks
    assert [t.spec for t in got] == specs and {t.state for t in got} == {pb.TASK_STATE_PENDING}
    nid = ids.new_id("node_id")
    upd = stub.UpdateTaskStates(pb.UpdateTaskStatesRequest(updates=[
        pb.TaskStateUpdate(task_id=s.task_id, state=pb.TASK_STATE_SCHEDULED, node_id=nid) for s in specs[:50]])).tasks
    assert [t.spec.task_id for t in upd] == [s.task_id for s in specs[:50]]
    assert {(t.state, t.node_id) for t in upd} == {(pb.TASK_STATE_SCHEDULED, nid)}
    again = stub.GetTasks(pb.GetTasksRequest(task_ids=[s.task_id for s in specs[:50]])).tasks
    assert list(again) == list(upd)


def test_large_function_export(stub: Any) -> None:
    code = uuid.uuid4().bytes * (3 * 1024 * 1024 // 16)  # a large serialized class
    resp = stub.ExportFunction(pb.ExportFunctionRequest(name="big.Model", code=code))
    assert resp.function_id == hashlib.sha256(code).digest() and resp.created
    assert stub.GetFunction(pb.GetFunctionRequest(function_id=resp.function_id)).function.code == code
    assert not stub.ExportFunction(pb.ExportFunctionRequest(name="big.Model", code=code)).created


# ------------------------------------------------------------------ Watch


class Watcher:
    """A Watch stream read by a thread; ``ready`` once the server has subscribed."""

    def __init__(self, address: str, req: pb.WatchRequest) -> None:
        self.channel = stream_channel(address)
        self.call = pb_grpc.ControlStoreServiceStub(self.channel).Watch(req, timeout=30)
        self.events: queue.Queue[pb.ChangeEvent | grpc.RpcError] = queue.Queue()
        self.call.initial_metadata()  # the subscription is in place
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.events.put(resp.event)
        except grpc.RpcError as e:
            self.events.put(e)

    def next(self, timeout: float = 5.0) -> pb.ChangeEvent:
        item = self.events.get(timeout=timeout)
        assert isinstance(item, pb.ChangeEvent), item
        return item

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def test_watch_a_kv_namespace(stub: Any, control_store: str) -> None:
    mine, other = ns(), ns()
    w = Watcher(control_store, pb.WatchRequest(table="kv", namespace=mine))
    try:
        stub.KvPut(pb.KvPutRequest(namespace=other, key=b"x", value=b"not mine", overwrite=True))
        stub.KvPut(pb.KvPutRequest(namespace=mine, key=b"a", value=b"1", overwrite=True))
        stub.KvPut(pb.KvPutRequest(namespace=mine, key=b"a", value=b"2", overwrite=True))
        stub.KvDelete(pb.KvDeleteRequest(namespace=mine, key=b"a"))
        got = [w.next() for _ in range(3)]
        assert [(e.table, e.namespace, e.op) for e in got] == [
            ("kv", mine, pb.CHANGE_OP_CREATED), ("kv", mine, pb.CHANGE_OP_UPDATED), ("kv", mine, pb.CHANGE_OP_DELETED)]
        assert [(c.key, c.value) for e in got for c in e.changes] == [(b"a", b"1"), (b"a", b"2"), (b"a", b"")]
        with pytest.raises(queue.Empty):
            w.events.get(timeout=0.3)  # nothing from the other namespace
    finally:
        w.close()


def test_watch_a_table(stub: Any, control_store: str) -> None:
    w = Watcher(control_store, pb.WatchRequest(table="jobs"))
    try:
        jid = job(stub)
        stub.UpdateJobState(pb.UpdateJobStateRequest(job_id=jid, state=pb.JOB_STATE_STOPPED))
        seen: list[tuple[int, int]] = []
        while len(seen) < 2:  # other tests may create jobs at the same time: pick ours
            ev = w.next()
            for c in ev.changes:
                if c.key == jid:
                    seen.append((ev.op, pb.JobInfo.FromString(c.value).state))
        assert seen == [(pb.CHANGE_OP_CREATED, pb.JOB_STATE_RUNNING), (pb.CHANGE_OP_UPDATED, pb.JOB_STATE_STOPPED)]
    finally:
        w.close()


@pytest.mark.parametrize(("req", "details"), [
    (pb.WatchRequest(table="widgets"),
     "table must be one of nodes, jobs, functions, tasks, objects, actors, instances, kv, got 'widgets'"),
    (pb.WatchRequest(table=""), "table must be one of"),
    (pb.WatchRequest(table="tasks", namespace="x"), "namespace applies to the kv table only"),
    (pb.WatchRequest(table="kv", namespace="bad.ns"), "namespace 'bad.ns' must be 1-64 characters"),
    (pb.WatchRequest(table="kv", namespace="ns\n"), "namespace 'ns\\n' must be 1-64 characters"),
])
def test_watch_rejects_bad_requests(control_store: str, req: pb.WatchRequest, details: str) -> None:
    with stream_channel(control_store) as ch:
        call = pb_grpc.ControlStoreServiceStub(ch).Watch(req, timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            call.initial_metadata()
            list(call)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert e.value.details().startswith(details)  # type: ignore[attr-defined]
