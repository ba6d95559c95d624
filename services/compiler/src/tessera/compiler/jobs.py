"""The compiler service's domain: compile requests, jobs and artifacts (no gRPC, no NATS here).

    submit()   parse and check the model, name the artifact by content hash, and either
               return the existing artifact or store the model and queue a job
    run_job()  what a replica does with a job it took from the stream: build, store the
               bundle, record the metadata; raising makes the job go to another replica
    wait() / get() / run()

Records are ``ArtifactInfo`` messages kept by a :class:`MetadataStore` (the control store's KV);
bundles and models are kept by a :class:`BlobStore` (the object store).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np

from tessera.api.compiler.v1 import compiler_pb2 as pb
from tessera.common.errors import DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from tessera.compiler.api import compile_graph
from tessera.compiler.cache import graph_key
from tessera.compiler.ir import Graph
from tessera.compiler.runtime import CompiledModel, load_artifact, pack_artifact
from tessera.compiler.serialize import load_graph
from tessera.compiler.tune import TuningLog

log = logging.getLogger(__name__)

TARGETS = ("c",)
MAX_TUNING_BUDGET_S = 24 * 3600.0  # longer is a mistake (an inf or NaN budget once broke the job on the stream)
SECONDS_PER_TRIAL = 1.5  # a tuning budget in seconds buys about this many measured trials (build + timing)
DTYPES = {"float32": np.float32, "int64": np.int64}


class MetadataStore(Protocol):
    async def get(self, artifact_id: str) -> bytes | None: ...

    async def put(self, artifact_id: str, value: bytes) -> None: ...


class BlobStore(Protocol):
    async def put(self, data: bytes) -> bytes: ...

    async def get(self, object_id: bytes, timeout: float = 30.0) -> bytes: ...


#: How long a Compile that finds its artifact READY waits for the artifact's bundle before building anew.
CACHE_CHECK_S = 5.0

Enqueue = Callable[[bytes, str], Awaitable[None]]  # (job bytes, dedupe id)
Heartbeat = Callable[[], Awaitable[None]]


def parse_model(fmt: int, data: bytes, inputs: Sequence[pb.TensorSpec]) -> Graph:
    """The graph of a request's model; InvalidArgumentError says what is wrong with it."""
    if not data:
        raise InvalidArgumentError("model is empty")
    if fmt == pb.MODEL_FORMAT_TESSERA_GRAPH:
        graph = load_graph(data)
    elif fmt == pb.MODEL_FORMAT_EXPORTED_PROGRAM:
        graph = _from_exported(data, inputs)
    else:
        raise InvalidArgumentError(f"format must be MODEL_FORMAT_TESSERA_GRAPH or MODEL_FORMAT_EXPORTED_PROGRAM, got {fmt}")
    if inputs:
        have = [(list(graph.nodes[i].shape), graph.nodes[i].dtype) for i in graph.inputs]
        want = [(list(s.shape), s.dtype or "float32") for s in inputs]
        if have != want:
            raise InvalidArgumentError(f"input shapes {want} do not match the model's inputs {have}")
    return graph


def _from_exported(data: bytes, inputs: Sequence[pb.TensorSpec]) -> Graph:
    import torch

    from tessera.compiler.frontend import from_torch

    if not inputs:
        raise InvalidArgumentError("an exported program needs the input shapes")
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise InvalidArgumentError(f"the model bytes are not a torch.export program ({type(e).__name__}: {e})") from None
    examples = []
    for s in inputs:
        if s.dtype not in ("", "float32", "int64") or any(d <= 0 for d in s.shape):
            raise InvalidArgumentError(f"bad input spec: shape {list(s.shape)}, dtype {s.dtype!r}")
        dt = torch.int64 if s.dtype == "int64" else torch.float32
        examples.append(torch.zeros(tuple(s.shape), dtype=dt))
    try:
        return from_torch(ep.module(), examples)
    except InvalidArgumentError:
        raise
    except Exception as e:  # shapes that do not fit the program, among others
        raise InvalidArgumentError(f"cannot trace the exported program with inputs {[list(s.shape) for s in inputs]}: "
                                   f"{type(e).__name__}: {e}") from None


def artifact_id(graph: Graph, target: str) -> str:
    return graph_key(graph, target)[:32]


def spec(shape: Sequence[int], dtype: str) -> pb.TensorSpec:
    return pb.TensorSpec(shape=list(shape), dtype=dtype)


def to_array(t: pb.Tensor, shape: Sequence[int], dtype: str, i: int) -> np.ndarray:
    if list(t.shape) != list(shape) or (t.dtype or "float32") != dtype:
        raise InvalidArgumentError(f"input {i} is {list(t.shape)} {t.dtype or 'float32'}, the artifact takes {list(shape)} {dtype}")
    want = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
    if len(t.data) != want:
        raise InvalidArgumentError(f"input {i} has {len(t.data)} bytes, {want} expected for {list(shape)} {dtype}")
    return np.frombuffer(t.data, DTYPES[dtype]).reshape(shape)


class Compiler:
    def __init__(self, meta: MetadataStore, blobs: BlobStore, enqueue: Enqueue, *, instance: str,
                 cache_dir: str | None = None, loaded_max: int = 8, heartbeat_s: float = 2.0,
                 tuning_log: TuningLog | None = None) -> None:
        self.meta, self.blobs, self.enqueue = meta, blobs, enqueue
        self.instance = instance
        self.cache_dir = cache_dir
        self.heartbeat_s = heartbeat_s  # well under the stream's ack wait
        self.tuning_log = tuning_log
        self._loaded: OrderedDict[str, CompiledModel] = OrderedDict()
        self._loaded_max = loaded_max
        self._load_lock = asyncio.Lock()

    async def info(self, aid: str) -> pb.ArtifactInfo | None:
        raw = await self.meta.get(aid)
        return pb.ArtifactInfo.FromString(raw) if raw is not None else None

    async def submit(self, req: pb.CompileRequest) -> tuple[pb.ArtifactInfo, bool]:
        target = req.target or "c"
        if target not in TARGETS:
            raise InvalidArgumentError(f"unknown target {target!r}: this build has {list(TARGETS)}")
        if not 0 <= req.tuning_budget_s <= MAX_TUNING_BUDGET_S:  # NaN fails both
            raise InvalidArgumentError(f"tuning_budget_s must be between 0 and {MAX_TUNING_BUDGET_S:g}, "
                                       f"got {req.tuning_budget_s}")
        graph = await asyncio.to_thread(parse_model, req.format, req.model, list(req.inputs))
        aid = artifact_id(graph, target)
        existing = await self.info(aid)
        if existing is not None and existing.state == pb.ARTIFACT_STATE_READY and aid not in self._loaded:
            try:  # READY in the control store, but its bundle may have been lost with a node since
                await self._model(aid, timeout=CACHE_CHECK_S)
            except FailedPreconditionError:
                existing = await self.info(aid)  # now FAILED: built again below
        if existing is not None and existing.state != pb.ARTIFACT_STATE_FAILED:
            return existing, True
        model_oid = await self.blobs.put(req.model)
        info = pb.ArtifactInfo(artifact_id=aid, state=pb.ARTIFACT_STATE_QUEUED, target=target,
                               inputs=[spec(graph.nodes[i].shape, graph.nodes[i].dtype) for i in graph.inputs])
        await self.meta.put(aid, info.SerializeToString())
        job = pb.CompileJob(artifact_id=aid, model_object_id=model_oid, format=req.format, inputs=list(req.inputs),
                            target=target, tuning_budget_s=req.tuning_budget_s)
        dedupe = aid if existing is None else f"{aid}-{time.time_ns()}"
        await self.enqueue(job.SerializeToString(), dedupe)
        return info, False

    async def run_job(self, job: pb.CompileJob, attempt: int, heartbeat: Heartbeat) -> None:
        """Build one job. Returns when the artifact is recorded (or the model is bad: FAILED);
        raises when the job should be retried by some replica."""
        current = await self.info(job.artifact_id)
        if current is not None and current.state == pb.ARTIFACT_STATE_READY:
            return  # a replica that died after recording it; nothing left to do
        info = pb.ArtifactInfo(artifact_id=job.artifact_id, state=pb.ARTIFACT_STATE_COMPILING, target=job.target,
                               compiled_by=self.instance, attempts=attempt)
        if current is not None:
            info.inputs.extend(current.inputs)
        await self.meta.put(job.artifact_id, info.SerializeToString())
        model = await self.blobs.get(job.model_object_id)
        t0 = time.perf_counter()
        try:
            graph = await asyncio.to_thread(parse_model, job.format, model, list(job.inputs))
            budget = job.tuning_budget_s if 0 <= job.tuning_budget_s <= MAX_TUNING_BUDGET_S else 0.0  # a forged job's
            trials = int(budget / SECONDS_PER_TRIAL)
            build = asyncio.create_task(asyncio.to_thread(compile_graph, graph, target=job.target, cache_dir=self.cache_dir,
                                                          tuning_log=self.tuning_log, tune_trials=trials))
            while not build.done():  # keep the job ours while gcc runs
                await asyncio.wait({build}, timeout=self.heartbeat_s)
                if not build.done():
                    await heartbeat()
            compiled = build.result()
        except InvalidArgumentError as e:
            info.state, info.error = pb.ARTIFACT_STATE_FAILED, str(e)
            await self.meta.put(job.artifact_id, info.SerializeToString())
            return
        bundle = await asyncio.to_thread(pack_artifact, compiled)
        oid = await self.blobs.put(bundle)
        p = compiled.program
        info = pb.ArtifactInfo(
            artifact_id=job.artifact_id, state=pb.ARTIFACT_STATE_READY, target=job.target,
            inputs=[spec(s, d) for s, d in zip(p.input_shapes, p.input_dtypes, strict=True)],
            outputs=[spec(s, "float32") for s in p.output_shapes], fused_graph=compiled.graph.format(),
            kernels=[pb.KernelInfo(label=c.label, flops=c.flops) for c in p.calls],
            compile_seconds=time.perf_counter() - t0, library_cache_hit=compiled.cache_hit, object_id=oid,
            size_bytes=len(bundle), compiled_by=self.instance, attempts=attempt)
        await self.meta.put(job.artifact_id, info.SerializeToString())
        log.info("artifact %s ready (%d kernels, %.1fs, attempt %d)", job.artifact_id, len(p.calls),
                 info.compile_seconds, attempt)

    async def wait(self, aid: str, timeout: float) -> pb.ArtifactInfo:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            info = await self.info(aid)
            if info is not None and info.state == pb.ARTIFACT_STATE_READY:
                return info
            if info is not None and info.state == pb.ARTIFACT_STATE_FAILED:
                raise InvalidArgumentError(f"compiling {aid} failed: {info.error}")
            if time.monotonic() + delay > deadline:
                raise DeadlineExceededError(f"artifact {aid} is not ready yet (state "
                                            f"{pb.ArtifactState.Name(info.state) if info else 'unknown'}); poll GetArtifact")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def get(self, aid: str, include_bundle: bool) -> tuple[pb.ArtifactInfo, bytes]:
        info = await self.info(aid)
        if info is None:
            raise NotFoundError(f"no artifact {aid!r}")
        bundle = b""
        if include_bundle:
            if info.state != pb.ARTIFACT_STATE_READY:
                raise FailedPreconditionError(f"artifact {aid} is {pb.ArtifactState.Name(info.state)}, not READY")
            bundle = await self._bundle(info)
        return info, bundle

    async def _bundle(self, info: pb.ArtifactInfo, timeout: float = 30.0) -> bytes:
        """The compiled bundle of a READY artifact. One that cannot be had (its object store lost it) turns
        the artifact FAILED, so that compiling the model again builds it anew instead of finding it READY."""
        try:
            return await self.blobs.get(info.object_id, timeout=timeout)
        except TimeoutError as e:
            lost = pb.ArtifactInfo()
            lost.CopyFrom(info)
            lost.state, lost.error = pb.ARTIFACT_STATE_FAILED, f"its compiled bundle is lost ({e}); compile it again"
            await self.meta.put(info.artifact_id, lost.SerializeToString())
            log.warning("artifact %s: bundle %s lost: %s", info.artifact_id, info.object_id.hex(), e)
            raise FailedPreconditionError(f"artifact {info.artifact_id}: {lost.error}") from None

    async def _model(self, aid: str, timeout: float = 30.0) -> tuple[pb.ArtifactInfo, CompiledModel]:
        async with self._load_lock:
            info = await self.info(aid)
            if info is None:
                raise NotFoundError(f"no artifact {aid!r}")
            if info.state != pb.ARTIFACT_STATE_READY:
                raise FailedPreconditionError(f"artifact {aid} is {pb.ArtifactState.Name(info.state)}, not READY")
            if aid not in self._loaded:
                bundle = await self._bundle(info, timeout)
                self._loaded[aid] = await asyncio.to_thread(load_artifact, bundle, self.cache_dir)
                while len(self._loaded) > self._loaded_max:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(aid)
            return info, self._loaded[aid]

    async def run(self, aid: str, tensors: Sequence[pb.Tensor]) -> tuple[list[np.ndarray], float]:
        info, model = await self._model(aid)
        if len(tensors) != len(info.inputs):
            raise InvalidArgumentError(f"artifact {aid} takes {len(info.inputs)} inputs, got {len(tensors)}")
        arrays = [to_array(t, s.shape, s.dtype, i) for i, (t, s) in enumerate(zip(tensors, info.inputs, strict=True))]
        outs = [np.empty(tuple(s.shape), np.float32) for s in info.outputs]

        def call() -> float:
            t0 = time.perf_counter()
            model.run(arrays, outs)
            return time.perf_counter() - t0
        seconds = await asyncio.to_thread(call)
        return outs, seconds
