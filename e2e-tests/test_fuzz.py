"""Fuzzing every public gRPC method of a whole stack (`tessera up --nodes 1 --gpus-per-node 1`).

Methods come from the generated descriptors (:func:`fuzzing.methods`); each gets generic requests and
nearly valid ones built from real objects made first (a job, a function, a task, objects, an actor,
a KV key, a session, a compiled artifact, a GPU job, a serving pipeline). For every call:

* the status is one the API documents (never UNKNOWN, INTERNAL or UNAVAILABLE), and every call
  has a deadline (DEADLINE_EXCEEDED only for the calls that wait by design);
* a rejected call changes nothing: the Redis shards (every key but the heartbeat-refreshed ones)
  and the object store's and serving replica's counters are the same before and after it;
* no process of the stack dies or restarts.

Then random bytes go to every live NATS subject the services decode, and the stack must still
serve a real request. The number of requests per method goes to a JSON report
(``TESSERA_FUZZ_REPORT``, default ``<pytest tmp>/fuzz-report.json``) and a table at the end.

The default run draws a few dozen requests per method; ``-m fuzz_long`` draws far more.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzzing
import grpc
import pytest
import stacks
from crc32c import crc32c
from hypothesis import HealthCheck, Phase, assume, example, given, settings

from tessera.api.compiler.v1 import compiler_pb2 as comp_pb
from tessera.api.control_store.v1 import control_store_pb2 as cs_pb
from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as gpu_pb
from tessera.api.object_store.v1 import object_store_pb2 as os_pb
from tessera.api.serving.v1 import serving_pb2 as sv_pb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as ts_pb
from tessera.common.rpc import MAX_MESSAGE_BYTES, health_status

Method, World = fuzzing.Method, fuzzing.World

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "30"))
LONG_EXAMPLES = int(os.environ.get("TESSERA_FUZZ_LONG_EXAMPLES", "2000"))
UNARY_TIMEOUT_S = 20.0
BLOCKING_TIMEOUT_S = 1.5
#: Keys rewritten by heartbeats and reports on their own: only their presence is compared.
VOLATILE = (b"instance:", b"node:", b"kv:gpu-agents:", b"kv:gpu-jobs:", b"kv-index:gpu-",
            # heartbeat records: what each node offers, and each process's reference table
            b"kv:nodes:", b"kv-index:nodes", b"kv:refs:", b"kv-index:refs")
#: Processes that write to the control store after they reply (a rejected call is compared once that is done).
ASYNC_WRITERS = {"object-store", "task-scheduler", "compiler"}
#: Methods that remove what others use: fuzzed last.
DESTRUCTIVE = {"DeleteObjects", "DeregisterInstance", "KvDelete", "Unregister", "KillJob", "AbortObject",
               "UpdateActor", "UpdateJobState", "FreeObjects"}
METHODS = sorted(fuzzing.methods(), key=lambda m: (m.desc.name in DESTRUCTIVE, m.full_name))


# ---------------------------------------------------------------------- the stack


class FuzzStack(stacks.Cluster):
    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        super().__init__(run_dir, env)
        self.channels: dict[str, grpc.Channel] = {}
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.last: dict[str, str] = {}  # method -> code of its last call
        self.material: Any = None  # future of _material()
        self._redis: list[Any] = []

    def channel(self, process: str) -> grpc.Channel:
        if process not in self.channels:
            self.channels[process] = grpc.insecure_channel(self.record(process)["address"], options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        return self.channels[process]

    def redis(self) -> list[Any]:
        if not self._redis:
            import redis

            self._redis = [redis.Redis.from_url(u) for u in self.info()["redis_urls"]]
        return self._redis

    def liveness(self) -> dict[str, tuple[int, int]]:
        """pid and restart count of every process, as the supervisor records them."""
        return {p["name"]: (p["pid"], p["restarts"]) for p in self.info()["procs"]}


@pytest.fixture(scope="module")
def fstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    material = pool.submit(_material)
    try:
        with stacks.running(tmp_path_factory, "fuzzrun", "--nodes", "1", "--gpus-per-node", "1", cls=FuzzStack,
                            timeout=180) as s:
            s.material = material
            assert s.status()["healthy"], s.status()
            try:
                yield s
                after = s.status()
                bad = [(p["name"], p["health"], p["restarts"], p["last_exit"]) for p in after["processes"]
                       if p["restarts"] or p["health"] not in ("UP", "SERVING")]
                assert after["healthy"] and not bad, f"after fuzzing: {bad}"
            finally:
                for c in s.channels.values():
                    c.close()
    finally:
        pool.shutdown(wait=True)


# ---------------------------------------------------------------------- real objects


def _call(s: FuzzStack, process: str, method: str, request: Any, timeout: float = 60.0) -> Any:
    m = next(x for x in METHODS if x.process == process and x.desc.name == method)
    return s.channel(process).unary_unary(m.path, request_serializer=m.request_class.SerializeToString,
                                          response_deserializer=m.response_class.FromString)(request, timeout=timeout)


class _Session:
    """An object-store session held open (in a thread) while the fuzzer runs."""

    def __init__(self, channel: grpc.Channel) -> None:
        call = channel.unary_stream("/tessera.object_store.v1.ObjectStoreService/OpenSession",
                                    request_serializer=os_pb.OpenSessionRequest.SerializeToString,
                                    response_deserializer=os_pb.OpenSessionResponse.FromString)
        self.it = call(os_pb.OpenSessionRequest(client_name="fuzz"))
        self.first = next(self.it)
        self.id = self.first.session_id

    def close(self) -> None:
        self.it.cancel()


def _model_bytes() -> bytes:
    import torch

    from tessera.compiler.frontend import from_torch
    from tessera.compiler.serialize import dump_graph

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    return dump_graph(from_torch(model, [torch.randn(2, 4)]))


def _material() -> tuple[bytes, Any]:
    """What the seeds need that takes long to import (torch, scikit-learn): made while the stack starts."""
    return _model_bytes(), _serving_seed()


def _compile_seed(s: FuzzStack, graph: bytes) -> tuple[bytes, str]:
    info = _call(s, "compiler", "Compile", comp_pb.CompileRequest(model=graph, format=comp_pb.MODEL_FORMAT_TESSERA_GRAPH,
                                                                  wait=True), timeout=300).artifact
    assert info.state == comp_pb.ARTIFACT_STATE_READY, info
    return graph, info.artifact_id


def _serving_seed() -> Any:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from tessera.serving.client import to_ir

    docs = ["good food", "great staff", "awful room", "bad view", "tasty food", "rude staff"]
    return to_ir(make_pipeline(CountVectorizer(), LogisticRegression()).fit(docs, [1, 1, 0, 0, 1, 0]))


@pytest.fixture(scope="module")
def world(fstack: FuzzStack) -> Iterator[World]:
    s = fstack
    w = World()
    cluster = s.info()
    node_id = bytes.fromhex(s.record("object-store")["node_id"])
    job_id, task_id, actor_id, other_node = os.urandom(4), os.urandom(16), os.urandom(16), os.urandom(16)
    code = b"fuzz: not a real function"
    fid = hashlib.sha256(code).digest()
    lineage_oid = task_id + (1).to_bytes(4, "big")

    # control store
    _call(s, "control-store", "CreateJob", cs_pb.CreateJobRequest(job=cs_pb.JobInfo(job_id=job_id, entrypoint="fuzz")))
    _call(s, "control-store", "ExportFunction", cs_pb.ExportFunctionRequest(job_id=job_id, name="fuzz.f", code=code))
    spec = cs_pb.TaskSpec(task_id=task_id, job_id=job_id, function_id=fid, function_name="fuzz.f", num_returns=1,
                          resources={"CPU": 1.0})
    _call(s, "control-store", "CreateTasks", cs_pb.CreateTasksRequest(specs=[spec]))
    _call(s, "control-store", "AddObjectLocations", cs_pb.AddObjectLocationsRequest(
        locations=[cs_pb.ObjectLocation(object_id=lineage_oid, node_id=node_id, size=5, owner="fuzz")]))
    actor = cs_pb.ActorInfo(actor_id=actor_id, job_id=job_id, name="fuzz-actor", namespace="fuzz",
                            class_function_id=fid, max_restarts=2)
    _call(s, "control-store", "CreateActor", cs_pb.CreateActorRequest(actor=actor))
    _call(s, "control-store", "KvPut", cs_pb.KvPutRequest(namespace="fuzz", key=b"key", value=b"value", overwrite=True))
    instances = _call(s, "control-store", "ListInstances", cs_pb.ListInstancesRequest()).instances

    # object store: a session, a sealed object and one being written
    session = _Session(s.channel("object-store"))
    put_oid, open_oid = os.urandom(20), os.urandom(20)
    _call(s, "object-store", "PutObject", os_pb.PutObjectRequest(session_id=session.id, object_id=put_oid,
                                                                 data=b"hello fuzz", owner="fuzz", pin=True))
    _call(s, "object-store", "CreateObject", os_pb.CreateObjectRequest(session_id=session.id, object_id=open_oid,
                                                                       size=4096, owner="fuzz"))

    # compiler, GPU scheduler, serving
    graph, pipe = s.material.result(timeout=600)
    model, artifact = _compile_seed(s, graph)
    gpu_spec = gpu_pb.JobSpec(name="fuzz-train", entry_point="tessera.gpu_scheduler.examples:train",
                              args=["100000", "0", "", "0.05"], gpus=1)
    gpu_job = _call(s, "gpu-scheduler", "SubmitJob", gpu_pb.SubmitJobRequest(spec=gpu_spec)).job_id
    failing_spec = gpu_pb.JobSpec(name="fuzz-fail", entry_point="tessera_fuzz_absent:main", gpus=1, time_limit_s=5)
    tensors = [sv_pb.Tensor(hash=h, dtype=a.dtype.str, shape=list(a.shape), data=a.tobytes()) for h, a in pipe.params.items()]
    _call(s, "serving", "UploadParameters", sv_pb.UploadParametersRequest(tensors=tensors))
    pipeline = sv_pb.PipelineSpec(name="fuzz-pipe", graph_json=pipe.graph.to_json())
    _call(s, "serving", "Register", sv_pb.RegisterRequest(pipeline=pipeline, replace=True))
    record = sv_pb.Record(fields={"text": sv_pb.Value(text="good food")})

    gpu_node = next(p["node_id"] for p in cluster["procs"] if p["name"].startswith("gpu-agent"))
    for name, values in {
        "node_id": [node_id, gpu_node, other_node], "requester_node_id": [node_id],
        "job_id": [job_id, gpu_job], "task_id": [task_id], "parent_task_id": [task_id],
        "object_id": [put_oid, open_oid, lineage_oid], "arg_object_id": [lineage_oid], "actor_id": [actor_id],
        "function_id": [fid], "class_function_id": [fid], "expected_function_id": [fid],
        "session_id": [session.id], "artifact_id": [artifact], "namespace": ["fuzz", "default"],
        "name": ["fuzz-actor", "fuzz-pipe"], "pipeline": ["fuzz-pipe"], "key": [b"key"], "prefix": [b"k"],
        "hash": list(pipe.params), "service": sorted({i.service for i in instances}),
        "instance_id": [i.instance_id for i in instances], "table": ["kv", "tasks", "objects"],
        "entry_point": ["tessera_fuzz_absent:main"], "model": [model],
    }.items():
        w.add(name, *values)

    P = "tessera."
    cs, ob, ts, co, gp, sv = (P + "control_store.v1.ControlStoreService/", P + "object_store.v1.ObjectStoreService/",
                              P + "task_scheduler.v1.TaskSchedulerService/", P + "compiler.v1.CompilerService/",
                              P + "gpu_scheduler.v1.GpuSchedulerService/", P + "serving.v1.ServingService/")
    loc = cs_pb.ObjectLocation(object_id=lineage_oid, node_id=node_id, size=5, owner="fuzz")
    w.seeds = {
        cs + "RegisterNode": [cs_pb.RegisterNodeRequest(node=cs_pb.NodeInfo(
            node_id=other_node, address="127.0.0.1:1", resources_total={"CPU": 1.0}, labels={"fuzz": "1"}))],
        cs + "NodeHeartbeat": [cs_pb.NodeHeartbeatRequest(node_id=other_node, resources_available={"CPU": 1.0})],
        cs + "GetNode": [cs_pb.GetNodeRequest(node_id=node_id)],
        cs + "ListNodes": [cs_pb.ListNodesRequest(state=cs_pb.NODE_STATE_ALIVE)],
        cs + "CreateJob": [cs_pb.CreateJobRequest(job=cs_pb.JobInfo(job_id=os.urandom(4), entrypoint="fuzz"))],
        cs + "GetJob": [cs_pb.GetJobRequest(job_id=job_id)],
        cs + "UpdateJobState": [cs_pb.UpdateJobStateRequest(job_id=job_id, state=cs_pb.JOB_STATE_RUNNING, message="m")],
        cs + "ExportFunction": [cs_pb.ExportFunctionRequest(job_id=job_id, name="fuzz.g", code=b"other code",
                                                            expected_function_id=hashlib.sha256(b"other code").digest())],
        cs + "GetFunction": [cs_pb.GetFunctionRequest(function_id=fid)],
        cs + "CreateTasks": [cs_pb.CreateTasksRequest(specs=[cs_pb.TaskSpec(
            task_id=os.urandom(16), job_id=job_id, function_id=fid, num_returns=1, arg_object_ids=[lineage_oid],
            parent_task_id=task_id)], state=cs_pb.TASK_STATE_PENDING, replace=True, node_id=node_id)],
        cs + "GetTasks": [cs_pb.GetTasksRequest(task_ids=[task_id])],
        cs + "ListTasks": [cs_pb.ListTasksRequest(job_id=job_id, state=cs_pb.TASK_STATE_PENDING, limit=5)],
        cs + "UpdateTaskStates": [cs_pb.UpdateTaskStatesRequest(updates=[cs_pb.TaskStateUpdate(
            task_id=task_id, state=cs_pb.TASK_STATE_SCHEDULED, node_id=node_id)])],
        cs + "GetLineage": [cs_pb.GetLineageRequest(object_id=lineage_oid, max_depth=3)],
        cs + "AddObjectLocations": [cs_pb.AddObjectLocationsRequest(locations=[loc])],
        cs + "RemoveObjectLocations": [cs_pb.RemoveObjectLocationsRequest(locations=[loc])],
        cs + "GetObjects": [cs_pb.GetObjectsRequest(object_ids=[lineage_oid, put_oid])],
        cs + "DeleteObjects": [cs_pb.DeleteObjectsRequest(object_ids=[os.urandom(20)])],
        cs + "FreeObjects": [cs_pb.FreeObjectsRequest(object_ids=[os.urandom(20)], task_ids=[os.urandom(16)],
                                                      reason="fuzz", remember=True)],
        cs + "CreateActor": [cs_pb.CreateActorRequest(actor=cs_pb.ActorInfo(
            actor_id=os.urandom(16), job_id=job_id, name="fuzz-actor-2", namespace="fuzz", class_function_id=fid))],
        cs + "GetActor": [cs_pb.GetActorRequest(actor_id=actor_id), cs_pb.GetActorRequest(name="fuzz-actor", namespace="fuzz")],
        cs + "ListActors": [cs_pb.ListActorsRequest(state=cs_pb.ACTOR_STATE_PENDING)],
        cs + "UpdateActor": [cs_pb.UpdateActorRequest(actor_id=actor_id, state=cs_pb.ACTOR_STATE_ALIVE, node_id=node_id,
                                                      address="127.0.0.1:2")],
        cs + "KvPut": [cs_pb.KvPutRequest(namespace="fuzz", key=b"key", value=b"v2", overwrite=True)],
        cs + "KvGet": [cs_pb.KvGetRequest(namespace="fuzz", key=b"key")],
        cs + "KvDelete": [cs_pb.KvDeleteRequest(namespace="fuzz", key=b"other")],
        cs + "KvList": [cs_pb.KvListRequest(namespace="fuzz", prefix=b"k")],
        cs + "RegisterInstance": [cs_pb.RegisterInstanceRequest(instance=cs_pb.ServiceInstance(
            service="fuzz", instance_id="fuzz-1", address="127.0.0.1:3", pid=1), ttl_s=5)],
        cs + "DeregisterInstance": [cs_pb.DeregisterInstanceRequest(service="fuzz", instance_id="fuzz-1")],
        cs + "ListInstances": [cs_pb.ListInstancesRequest(service="control-store")],
        cs + "Watch": [cs_pb.WatchRequest(table="kv", namespace="fuzz"), cs_pb.WatchRequest(table="tasks")],
        ob + "OpenSession": [os_pb.OpenSessionRequest(client_name="fuzz")],
        ob + "PutObject": [os_pb.PutObjectRequest(session_id=session.id, object_id=os.urandom(20), data=b"x", owner="fuzz")],
        ob + "PutObjects": [os_pb.PutObjectsRequest(session_id=session.id, objects=[
            os_pb.InlineObject(object_id=os.urandom(20), data=b"y", owner="fuzz")])],
        ob + "CreateObject": [os_pb.CreateObjectRequest(session_id=session.id, object_id=os.urandom(20), size=128)],
        ob + "SealObject": [os_pb.SealObjectRequest(session_id=session.id, object_id=open_oid)],
        ob + "AbortObject": [os_pb.AbortObjectRequest(session_id=session.id, object_id=open_oid)],
        ob + "GetObjects": [os_pb.GetObjectsRequest(session_id=session.id, object_ids=[put_oid], timeout_ms=100)],
        ob + "ReleaseObjects": [os_pb.ReleaseObjectsRequest(session_id=session.id, object_ids=[put_oid])],
        ob + "DeleteObjects": [os_pb.DeleteObjectsRequest(object_ids=[os.urandom(20)])],
        ob + "FreeObjects": [os_pb.FreeObjectsRequest(session_id=session.id, object_ids=[os.urandom(20)],
                                                      task_ids=[os.urandom(16)], reason="fuzz")],
        ob + "WriteObject": [[os_pb.WriteObjectRequest(header=os_pb.WriteObjectHeader(object_id=os.urandom(20), size=4)),
                              os_pb.WriteObjectRequest(chunk=os_pb.WriteObjectChunk(offset=0, data=b"abcd",
                                                                                     crc32c=crc32c(b"abcd")))]],
        ob + "ReadObject": [os_pb.ReadObjectRequest(object_id=put_oid, timeout_ms=100, chunk_size=4)],
        ob + "ContainsObjects": [os_pb.ContainsObjectsRequest(object_ids=[put_oid, open_oid])],
        ob + "PullObject": [os_pb.PullObjectRequest(object_id=put_oid, requester_node_id=other_node, chunk_size=4)],
        ts + "Session": [[ts_pb.ClientFrame(hello=ts_pb.Hello(job_id=job_id, name="fuzz")),
                          ts_pb.ClientFrame(submit=[ts_pb.TaskSpec(
                              task_id=os.urandom(16), job_id=job_id, kind=ts_pb.TASK_KIND_NORMAL, function_id=fid,
                              name="fuzz.f", num_returns=1, resources={"CPU": 1.0},
                              args=[ts_pb.Arg(value=b"\x00"), ts_pb.Arg(object_id=put_oid)])]),
                          ts_pb.ClientFrame(cancel=[task_id], kill_actor=[actor_id])]],
        ts + "GetWorkerLog": [ts_pb.GetWorkerLogRequest(actor_id=actor_id, offset=-100, max_bytes=1000),
                              ts_pb.GetWorkerLogRequest(worker_id=os.urandom(8), suffix="err")],
        co + "Compile": [comp_pb.CompileRequest(model=model, format=comp_pb.MODEL_FORMAT_TESSERA_GRAPH, target="c")],
        co + "Run": [comp_pb.RunRequest(artifact_id=artifact, inputs=[comp_pb.Tensor(
            shape=[2, 4], dtype="float32", data=bytes(32))])],
        co + "GetArtifact": [comp_pb.GetArtifactRequest(artifact_id=artifact, include_bundle=True)],
        gp + "SubmitJob": [gpu_pb.SubmitJobRequest(spec=failing_spec)],
        gp + "GetJob": [gpu_pb.GetJobRequest(job_id=gpu_job)],
        gp + "ListJobs": [gpu_pb.ListJobsRequest(group_id="")],
        gp + "KillJob": [gpu_pb.KillJobRequest(job_id=gpu_job)],
        gp + "SuspendJob": [gpu_pb.SuspendJobRequest(job_id=gpu_job)],
        gp + "ResumeJob": [gpu_pb.ResumeJobRequest(job_id=gpu_job)],
        gp + "MigrateJob": [gpu_pb.MigrateJobRequest(job_id=gpu_job, node_id=gpu_node)],
        sv + "FindMissingParameters": [sv_pb.FindMissingParametersRequest(hashes=list(pipe.params))],
        sv + "UploadParameters": [sv_pb.UploadParametersRequest(tensors=tensors[:1])],
        sv + "Register": [sv_pb.RegisterRequest(pipeline=sv_pb.PipelineSpec(
            name="fuzz-pipe-2", graph_json=pipe.graph.to_json(), latency_budget_ms=1.0), replace=True)],
        sv + "Unregister": [sv_pb.UnregisterRequest(name="fuzz-pipe-2")],
        sv + "Predict": [sv_pb.PredictRequest(pipeline="fuzz-pipe", records=[record])],
        sv + "PredictBatch": [sv_pb.PredictBatchRequest(requests=[sv_pb.PredictRequest(pipeline="fuzz-pipe",
                                                                                        records=[record])])],
    }
    try:
        yield w
    finally:
        session.close()


# ---------------------------------------------------------------------- state


def snapshot(s: FuzzStack, method: Method) -> dict[str, Any]:
    """What a rejected call must leave as it was: a digest of every Redis key's value (only the
    presence of the keys that heartbeats rewrite), and the object store's and serving's counters.

    Object records are left out for the services that do not write them: the running GPU job's
    checkpoints come and go on their own."""
    state: dict[str, Any] = {}
    skip = () if method.process in ("control-store", "object-store") else (b"object:", b"object-locations:")
    for i, r in enumerate(s.redis()):
        keys = sorted(k for k in r.scan_iter(count=10_000) if not k.startswith(skip))
        stable = [k for k in keys if not k.startswith(VOLATILE)]
        digests = r.execute_command("DEBUG", "DIGEST-VALUE", *stable) if stable else []
        state.update({f"redis-{i}:{k!r}": d for k, d in zip(stable, digests, strict=True)})
        state.update({f"redis-{i}:{k!r}": "present" for k in keys if k.startswith(VOLATILE)})
    if method.process == "object-store":
        st_ = _call(s, "object-store", "GetStats", os_pb.GetStatsRequest(), timeout=10)
        state["object-store"] = (st_.objects, st_.used, st_.pinned, st_.spilled_objects)
    if method.process == "serving":
        st_ = _call(s, "serving", "GetStats", sv_pb.GetStatsRequest(), timeout=10)
        state["serving"] = (st_.pipelines, st_.param_arrays, st_.param_bytes)
    return state


def settled(s: FuzzStack, method: Method) -> dict[str, Any]:
    """A snapshot once the asynchronous writes of earlier accepted calls are done (two equal in a row)."""
    last = snapshot(s, method)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = snapshot(s, method)
        if now == last:
            break
        last = now
    return last


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Changes from ``a`` to ``b``. A heartbeat-refreshed key comes and goes on its own (its TTL runs out
    while its owner is busy, and the next heartbeat writes it again), so it counts in neither direction."""
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and "present" not in (a.get(k), b.get(k))]


def _short(request: Any) -> str:
    text = str(request)
    return text if len(text) < 600 else text[:600] + f"... ({len(text)} chars)"


def check(s: FuzzStack, method: Method, request: Any) -> None:
    size = sum(m.ByteSize() for m in request) if isinstance(request, list) else request.ByteSize()
    assume(size < MAX_MESSAGE_BYTES // 2)
    # the object store records locations, the node agent lineage and the compiler its builds after replying
    after_ok = s.last.get(method.full_name) == "OK" and method.process in ASYNC_WRITERS
    before = settled(s, method) if after_ok else snapshot(s, method)
    timeout = BLOCKING_TIMEOUT_S if method.blocking else UNARY_TIMEOUT_S
    started = time.monotonic()
    out = fuzzing.invoke(s.channel(method.process), method, request, timeout=timeout)
    s.counts[method.full_name][out.code.name] += 1
    s.last[method.full_name] = out.code.name
    assert out.code in fuzzing.allowed_codes(method), (
        f"{method}: {out.code.name} ({out.details}) after {time.monotonic() - started:.2f}s for\n{_short(request)}")
    if out.code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
        changed = _diff(before, snapshot(s, method))
        assert not changed, f"{method}: rejected with {out.code.name} ({out.details}) but changed {changed}\n{_short(request)}"


#: Requests that once broke a service, kept as explicit examples (method name -> requests).
REGRESSIONS: dict[str, list[Any]] = {
    # an unknown enum value was named in the error message: INTERNAL (ValueError) instead of INVALID_ARGUMENT
    "tessera.control_store.v1.ControlStoreService/CreateJob": [
        cs_pb.CreateJobRequest(job=cs_pb.JobInfo(job_id=b"\xcf3\xb5\xe1", state=-(2**31), entrypoint="fuzz"))],  # type: ignore[arg-type]
    # the element count of a huge shape wrapped around to 0 in numpy: INTERNAL (ValueError from reshape)
    "tessera.serving.v1.ServingService/UploadParameters": [
        sv_pb.UploadParametersRequest(tensors=[sv_pb.Tensor(hash="h", dtype="<f8", shape=[2**62, 4], data=b"")])],
}


def fuzz(s: FuzzStack, w: World, method: Method, examples: int) -> None:
    before = s.liveness()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(request=fuzzing.requests(method, w))
    def run(request: Any) -> None:
        check(s, method, request)

    for reg in REGRESSIONS.get(method.full_name, []):
        run = example(request=reg)(run)
    run()
    after = s.liveness()
    assert after == before, f"{method}: processes died or restarted: {before} -> {after}"
    health = health_status(s.record(method.process)["address"], timeout=5.0)
    assert health == "SERVING", f"{method}: {method.process} is {health} after fuzzing"


# ---------------------------------------------------------------------- tests


def test_every_method_has_nearly_valid_requests(world: World) -> None:
    """A method whose request has fields needs real examples, or the fuzzer stops at the first check."""
    missing = fuzzing.missing_seeds(world.seeds, METHODS)
    assert not missing, f"no nearly valid requests for {missing}: add seeds to the world fixture"
    unknown = set(world.seeds) - {m.full_name for m in METHODS}
    assert not unknown, f"seeds for methods that do not exist: {unknown}"


#: Bytes no protobuf message parses from (field 31 with the unused wire type 7).
UNPARSABLE = b"\xff\xff\xff\xff"


def test_requests_that_do_not_parse(fstack: FuzzStack) -> None:
    """Bytes that are no message at all are the caller's error (INVALID_ARGUMENT), for every method,
    and nobody dies of them."""
    before = fstack.liveness()
    wrong = {}
    for method in METHODS:
        request = [UNPARSABLE] if method.desc.client_streaming else UNPARSABLE
        out = fuzzing.invoke(fstack.channel(method.process), method, request, timeout=UNARY_TIMEOUT_S, raw=True)
        if out.code != grpc.StatusCode.INVALID_ARGUMENT or "not a valid message" not in out.details:
            wrong[method.full_name] = f"{out.code.name}: {out.details}"
    assert not wrong, wrong
    assert fstack.liveness() == before


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_fuzz(fstack: FuzzStack, world: World, method: Method) -> None:
    fuzz(fstack, world, method, EXAMPLES)


@pytest.mark.fuzz_long
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_fuzz_long(fstack: FuzzStack, world: World, method: Method) -> None:
    fuzz(fstack, world, method, LONG_EXAMPLES)


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    s: FuzzStack | None = getattr(request.module, "_stack_for_report", None)
    if s is None:
        return
    path = Path(os.environ.get("TESSERA_FUZZ_REPORT") or tmp_path_factory.getbasetemp() / "fuzz-report.json")
    rows = {name: {"requests": sum(c.values()), "codes": dict(sorted(c.items()))} for name, c in sorted(s.counts.items())}
    path.write_text(json.dumps({"methods": rows, "total": sum(r["requests"] for r in rows.values())}, indent=2))
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # a table at the end, not captured output of the last test
        tr.write_line("")
        tr.write_line(f"fuzzed requests per method (report: {path})")
        for name, row in rows.items():
            codes = ", ".join(f"{k} {v}" for k, v in row["codes"].items())
            tr.write_line(f"  {name.split('.v1.')[-1]:<55} {row['requests']:>6}  {codes}")
        tr.write_line(f"  {'total':<55} {sum(r['requests'] for r in rows.values()):>6}")


@pytest.fixture(autouse=True)
def _remember_stack(request: pytest.FixtureRequest) -> None:
    if "fstack" in request.fixturenames:
        request.module._stack_for_report = request.getfixturevalue("fstack")


# ---------------------------------------------------------------------- NATS


def nats_subjects(s: FuzzStack) -> dict[str, Any]:
    """Every subject a service of the stack decodes, with what it expects there (a message type, or "json")."""
    from tessera.compiler.server import SUBJECT as COMPILE_JOBS
    from tessera.gpu_scheduler.server import agent_subject
    from tessera.serving.cluster import PIPELINES
    from tessera.serving.server import PREDICT_SUBJECT
    from tessera.task_scheduler.scheduler import LOAD_SUBJECT, SPILL_SUBJECT, node_subject

    node = bytes.fromhex(s.record("task-scheduler")["node_id"])
    gpu_node = next(p["node_id"] for p in s.info()["procs"] if p["name"].startswith("gpu-agent"))
    subjects: dict[str, Any] = {
        SPILL_SUBJECT: ts_pb.TaskBatch, LOAD_SUBJECT: ts_pb.NodeLoad,
        node_subject(node, "tasks"): ts_pb.TaskBatch, node_subject(node, "results"): ts_pb.ResultBatch,
        node_subject(node, "control"): ts_pb.Control, node_subject(node, "assigned"): ts_pb.TaskBatch,
        "tessera.events.objects.sealed": cs_pb.ChangeEvent,
        f"tessera.events.kv.{PIPELINES}.created": cs_pb.ChangeEvent,
        f"tessera.events.kv.{PIPELINES}.updated": cs_pb.ChangeEvent,
        f"tessera.events.kv.{PIPELINES}.deleted": cs_pb.ChangeEvent,
        "tessera.events.kv.fuzz.created": cs_pb.ChangeEvent,  # what the control store's Watch streams relay
        "tessera.events.tasks.updated": cs_pb.ChangeEvent,
        PREDICT_SUBJECT: "json", agent_subject(gpu_node): "json",
        COMPILE_JOBS: comp_pb.CompileJob,  # JetStream: published with an ack
    }
    return subjects


def _json_values() -> Any:
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20))
    anything = st.recursive(leaf, lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=8), x, max_size=3),
                            max_leaves=8)
    # commands the GPU node agent takes (never "start": that would launch a process) and predict requests
    command = st.fixed_dictionaries({"op": st.sampled_from(["suspend", "resume", "stop", "checkpoint", "kill", "forget",
                                                            "nope", 3])}, optional={"job_id": anything})
    predict = st.fixed_dictionaries({"pipeline": st.one_of(st.just("fuzz-pipe"), anything)},
                                    optional={"records": anything})
    return st.one_of(anything, command, predict).map(lambda v: json.dumps(v).encode())


def _payloads(kind: Any, w: World) -> Any:
    from hypothesis import strategies as st

    raw = st.one_of(st.binary(max_size=256), st.sampled_from([b"", b"\x00", b"{", b"\xff" * 64, b"null", b"[]"]))
    if kind == "json":
        return st.one_of(raw, _json_values())
    return st.one_of(raw, fuzzing.message_values(kind.DESCRIPTOR, w, small=True).map(lambda m: m.SerializeToString()))


def test_nats_random_bytes(fstack: FuzzStack, world: World) -> None:
    """Random bytes and fuzzed messages on every subject the services decode; then the stack still
    serves: no process restarted, every service SERVING, a Watch opened before still delivers, and a
    real prediction, compile, task session and KV round trip succeed."""
    from hypothesis import given

    s = fstack
    seed = world.seeds["tessera.serving.v1.ServingService/Register"][0]  # the fuzzed Unregister may have removed it
    _call(s, "serving", "Register", sv_pb.RegisterRequest(
        pipeline=sv_pb.PipelineSpec(name="fuzz-pipe", graph_json=seed.pipeline.graph_json), replace=True))
    before = s.liveness()
    subjects = nats_subjects(s)
    url = s.info()["nats_url"]
    watch = s.channel("control-store").unary_stream(
        "/tessera.control_store.v1.ControlStoreService/Watch", request_serializer=cs_pb.WatchRequest.SerializeToString,
        response_deserializer=cs_pb.WatchResponse.FromString)(cs_pb.WatchRequest(table="kv", namespace="fuzz"), timeout=600)
    events: list[Any] = []
    errors: list[grpc.RpcError] = []

    def read_watch() -> None:
        try:
            for ev in watch:
                events.append(ev)
        except grpc.RpcError as e:
            errors.append(e)

    reader = threading.Thread(target=read_watch, daemon=True)
    reader.start()
    loop = asyncio.new_event_loop()
    import nats

    nc = loop.run_until_complete(nats.connect(url))
    js = nc.jetstream()
    published: collections.Counter[str] = collections.Counter()
    try:
        def flood(subject: str, kind: Any) -> None:
            @settings(max_examples=max(EXAMPLES, 20), deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(data=_payloads(kind, world))
            def publish(data: bytes) -> None:
                if subject.startswith("tessera.compiler."):
                    loop.run_until_complete(js.publish(subject, data, timeout=10))
                else:
                    loop.run_until_complete(nc.publish(subject, data, reply="_INBOX.fuzz.ignored"))
                published[subject] += 1

            publish()

        for subject, kind in subjects.items():
            flood(subject, kind)
        loop.run_until_complete(nc.flush(timeout=10))
        time.sleep(2.0)  # let the services work through it
        s.counts["nats"] = collections.Counter({subj: n for subj, n in published.items()})

        assert s.liveness() == before, f"processes died or restarted: {before} -> {s.liveness()}"
        for p in s.info()["procs"]:
            if p["kind"] == "service":
                assert health_status(p["address"], timeout=5.0) == "SERVING", p["name"]
        # the Watch opened before the flood still delivers
        n = len(events)
        _call(s, "control-store", "KvPut", cs_pb.KvPutRequest(namespace="fuzz", key=b"after-nats", value=b"1",
                                                             overwrite=True))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not errors and not any(
                c.key == b"after-nats" for e in events[n:] for c in e.event.changes):
            time.sleep(0.05)
        assert not errors, f"the Watch stream ended: {errors[0].code()} {errors[0].details()}"  # type: ignore[attr-defined]
        assert any(c.key == b"after-nats" for e in events[n:] for c in e.event.changes), "the Watch missed a real event"
        # real requests of every kind of work
        record = sv_pb.Record(fields={"text": sv_pb.Value(text="good food")})
        preds = _call(s, "serving", "Predict", sv_pb.PredictRequest(pipeline="fuzz-pipe", records=[record])).predictions
        assert len(preds) == 1
        out = _call(s, "compiler", "Run", world.seeds["tessera.compiler.v1.CompilerService/Run"][0]).outputs
        assert [list(o.shape) for o in out] == [[2, 3]]
        hello = world.seeds["tessera.task_scheduler.v1.TaskSchedulerService/Session"][0][0]
        m = next(x for x in METHODS if x.desc.name == "Session")
        got = fuzzing.invoke(s.channel("task-scheduler"), m, [hello], timeout=10, max_responses=1, linger_s=5)
        assert got.responses and got.responses[0].HasField("welcome"), got
        assert _call(s, "control-store", "KvGet", cs_pb.KvGetRequest(namespace="fuzz", key=b"after-nats")).value == b"1"
    finally:
        watch.cancel()
        loop.run_until_complete(nc.close())
        loop.close()
