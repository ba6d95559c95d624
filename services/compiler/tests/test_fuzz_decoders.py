"""What a compiler replica decodes from the JetStream stream, fuzzed: CompileJob messages.

Anyone connected to NATS can publish on ``tessera.compiler.jobs``. A job that decodes is run
against the replica's stores (here in memory, through the domain's own ports): a bad model ends
as a FAILED artifact, a missing one raises NotFoundError (the job is redelivered, then dropped),
and nothing else escapes. A Compile request with a NaN, infinite or huge tuning budget is refused
up front (NaN once passed the ``< 0`` check).
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ports import Meta

from tessera.api.compiler.v1 import compiler_pb2 as pb
from tessera.common.errors import InvalidArgumentError, NotFoundError
from tessera.compiler.jobs import MAX_TUNING_BUDGET_S, Compiler

MODEL = b"the bytes of a model"  # not a graph: a job for it must end FAILED, not raise


class Blobs:
    def __init__(self) -> None:
        self.objects = {b"m" * 20: MODEL}

    async def put(self, data: bytes) -> bytes:
        oid = bytes(20)
        self.objects[oid] = data
        return oid

    async def get(self, object_id: bytes, timeout: float = 30.0) -> bytes:
        if object_id not in self.objects:
            raise NotFoundError(f"no object {object_id.hex()}")
        return self.objects[object_id]


async def _enqueue(job: bytes, dedupe: str) -> None:
    raise AssertionError("running a job queues nothing")


async def _heartbeat() -> None:
    return None


budgets = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e308, MAX_TUNING_BUDGET_S]))
jobs = st.builds(pb.CompileJob, artifact_id=st.text(max_size=34), model_object_id=st.sampled_from([b"m" * 20, b"", b"x" * 20]),
                 format=st.integers(-1, 3), inputs=st.lists(st.builds(pb.TensorSpec, shape=st.lists(st.integers(-2, 9), max_size=3),
                                                                        dtype=st.sampled_from(["", "float32", "int64", "x"])), max_size=2),
                 target=st.sampled_from(["", "c", "cuda"]), tuning_budget_s=budgets)


@settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=200), jobs.map(lambda j: j.SerializeToString())))
def test_jobs_from_the_stream_fail_cleanly(data: bytes) -> None:
    try:
        job = pb.CompileJob.FromString(data)
    except DecodeError:
        return
    meta = Meta()
    compiler = Compiler(meta, Blobs(), _enqueue, instance="fuzz", heartbeat_s=0.05)
    try:
        asyncio.run(compiler.run_job(job, 1, _heartbeat))
    except NotFoundError:
        assert job.model_object_id not in (b"m" * 20,)
        return
    info = pb.ArtifactInfo.FromString(meta.records[job.artifact_id])
    assert info.state == pb.ARTIFACT_STATE_FAILED and info.error, info


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(budget=budgets)
def test_a_compile_request_names_a_bad_tuning_budget(budget: float) -> None:
    compiler = Compiler(Meta(), Blobs(), _enqueue, instance="fuzz")
    req = pb.CompileRequest(model=MODEL, format=pb.MODEL_FORMAT_TESSERA_GRAPH, tuning_budget_s=budget)
    try:
        asyncio.run(compiler.submit(req))
    except InvalidArgumentError as e:
        assert ("tuning_budget_s" in str(e)) != (0 <= budget <= MAX_TUNING_BUDGET_S), (budget, e)
