"""The control store process keeps no state: Redis does. Kill it, restart it, stop it."""

from __future__ import annotations

import hashlib
import signal
import time
from typing import Any

import grpc
import pytest
import redis

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids
from tessera.common.rpc import health_status


def _write_everything(stub: Any) -> dict[str, Any]:
    jid, nid, aid = ids.new_id("job_id"), ids.new_id("node_id"), ids.new_id("actor_id")
    stub.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(node_id=nid, address="n:1", resources_total={"CPU": 4})))
    stub.CreateJob(pb.CreateJobRequest(job=pb.JobInfo(job_id=jid, entrypoint="main.py")))
    fid = stub.ExportFunction(pb.ExportFunctionRequest(job_id=jid, name="m.f", code=b"code")).function_id
    specs = [pb.TaskSpec(task_id=ids.new_id("task_id"), job_id=jid, function_id=fid) for _ in range(100)]
    stub.CreateTasks(pb.CreateTasksRequest(specs=specs))
    stub.UpdateTaskStates(pb.UpdateTaskStatesRequest(updates=[
        pb.TaskStateUpdate(task_id=s.task_id, state=pb.TASK_STATE_RUNNING, node_id=nid) for s in specs[:10]]))
    oid = ids.object_id(specs[0].task_id, 1)
    stub.AddObjectLocations(pb.AddObjectLocationsRequest(locations=[pb.ObjectLocation(object_id=oid, node_id=nid, size=9)]))
    stub.CreateActor(pb.CreateActorRequest(actor=pb.ActorInfo(actor_id=aid, job_id=jid, class_function_id=fid, name="keeper")))
    for i in range(20):
        stub.KvPut(pb.KvPutRequest(namespace="durable", key=f"k{i:02d}".encode(), value=bytes([i]) * 100, overwrite=True))
    return dict(jid=jid, nid=nid, aid=aid, fid=fid, specs=specs, oid=oid)


def _read_everything(stub: Any, w: dict[str, Any]) -> dict[str, Any]:
    return dict(
        node=stub.GetNode(pb.GetNodeRequest(node_id=w["nid"])).node,
        job=stub.GetJob(pb.GetJobRequest(job_id=w["jid"])).job,
        function=stub.GetFunction(pb.GetFunctionRequest(function_id=w["fid"])).function,
        tasks=list(stub.GetTasks(pb.GetTasksRequest(task_ids=[s.task_id for s in w["specs"]])).tasks),
        objects=list(stub.GetObjects(pb.GetObjectsRequest(object_ids=[w["oid"]])).objects),
        actor=stub.GetActor(pb.GetActorRequest(name="keeper")).actor,
        kv_keys=list(stub.KvList(pb.KvListRequest(namespace="durable")).keys),
        kv=[stub.KvGet(pb.KvGetRequest(namespace="durable", key=f"k{i:02d}".encode())).value for i in range(20)],
    )


def test_records_survive_kill_9(launcher) -> None:  # type: ignore[no-untyped-def]
    first = launcher.start("cs-first")
    ch, stub = first.stub()
    written = _write_everything(stub)
    before = _read_everything(stub, written)
    ch.close()
    assert before["function"].function_id == hashlib.sha256(b"code").digest()
    assert len(before["tasks"]) == 100 and before["kv_keys"] == [f"k{i:02d}".encode() for i in range(20)]

    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(10) == -signal.SIGKILL
    assert health_status(first.address, timeout=0.5) == "UNREACHABLE"

    second = launcher.start("cs-second")
    ch, stub = second.stub()
    try:
        assert _read_everything(stub, written) == before
        # and it goes on writing where the first left off
        again = pb.CreateJobRequest(job=pb.JobInfo(job_id=written["jid"]))
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateJob(again)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    finally:
        ch.close()


def test_sigterm_stops_cleanly_and_deregisters(launcher, own_redis) -> None:  # type: ignore[no-untyped-def]
    cs = launcher.start("cs-term")
    member = b"control-store/cs-term"
    ch, stub = cs.stub()
    try:
        listed = [i.instance_id for i in stub.ListInstances(pb.ListInstancesRequest(service="control-store")).instances]
    finally:
        ch.close()
    assert listed == ["cs-term"]
    with redis.Redis.from_url(own_redis.url) as r:
        assert r.exists(b"instance:" + member) and r.zscore(b"instance:index", member) is not None
        cs.proc.send_signal(signal.SIGTERM)
        assert cs.proc.wait(15) == 0, cs.log()[-3000:]
        assert not r.exists(b"instance:" + member)
        assert r.zscore(b"instance:index", member) is None
    log = cs.log()
    assert "control-store stopped" in log and "Traceback" not in log, log[-3000:]


def test_redis_outage_is_unavailable_then_recovers(launcher, own_redis) -> None:  # type: ignore[no-untyped-def]
    cs = launcher.start("cs-outage")
    ch, stub = cs.stub(timeout=10)
    try:
        stub.KvPut(pb.KvPutRequest(namespace="o", key=b"before", value=b"1", overwrite=True))
        own_redis.kill()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.KvPut(pb.KvPutRequest(namespace="o", key=b"during", value=b"2", overwrite=True))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()  # type: ignore[attr-defined]
        assert "Redis unavailable" in e.value.details()  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 8
        own_redis.restart()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert stub.KvGet(pb.KvGetRequest(namespace="o", key=b"before")).value == b"1"
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline  # type: ignore[attr-defined]
                time.sleep(0.1)
        stub.KvPut(pb.KvPutRequest(namespace="o", key=b"after", value=b"3", overwrite=True))
        assert list(stub.KvList(pb.KvListRequest(namespace="o")).keys) == [b"after", b"before"]
        assert cs.proc.poll() is None
    finally:
        ch.close()
