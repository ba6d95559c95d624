"""gRPC <-> domain: ServingService over :class:`~tessera.serving.replica.Replica`."""

from __future__ import annotations

import json
from typing import Any, TypeAlias

import grpc.aio

from tessera.api.serving.v1 import serving_pb2 as pb
from tessera.common.errors import InvalidArgumentError
from tessera.serving.engine import Prediction, Registered
from tessera.serving.ir import Graph
from tessera.serving.replica import Replica

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def value_to_py(v: pb.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None:
        raise InvalidArgumentError("a record value is empty (set text or number)")
    return v.text if kind == "text" else v.number


def py_to_value(x: Any) -> pb.Value:
    if isinstance(x, str):
        return pb.Value(text=x)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return pb.Value(number=float(x))
    return pb.Value(text=json.dumps(x))


def records_from_proto(records: Any) -> list[Any]:
    out: list[Any] = []
    for r in records:
        if r.fields:
            out.append({k: value_to_py(v) for k, v in r.fields.items()})
        else:
            out.append([value_to_py(v) for v in r.values])
    return out


OUTPUTS = {pb.OUTPUT_DEFAULT: "", pb.OUTPUT_PREDICT_PROBA: "predict_proba",
           pb.OUTPUT_DECISION_FUNCTION: "decision_function"}


def output_name(output: pb.Output.ValueType) -> str:
    if output not in OUTPUTS:
        raise InvalidArgumentError(f"unknown output {output} (OUTPUT_DEFAULT, OUTPUT_PREDICT_PROBA, "
                                   "OUTPUT_DECISION_FUNCTION)")
    return OUTPUTS[output]


def check_output(reg: Registered, output: str) -> None:
    """``output`` (a name from :data:`OUTPUTS`) is one the pipeline's model gives."""
    if output and output not in reg.outputs:
        has = ", ".join(["predict", *reg.outputs])
        raise InvalidArgumentError(f"pipeline {reg.name!r} has no {output} output (it has: {has})")


def predictions_to_proto(preds: list[Prediction], output: str = "") -> pb.PredictResponse:
    out = []
    for p in preds:
        if p.class_index >= 0:
            scores = p.decision if output == "decision_function" and p.decision is not None else p.scores
            out.append(pb.Prediction(label=py_to_value(p.label), class_index=p.class_index, scores=scores))
        else:
            out.append(pb.Prediction(class_index=-1, value=p.value, scores=p.scores))
    return pb.PredictResponse(predictions=out)


def info_of(spec: Any, reg: Registered | None, graph: Graph, replica: Replica) -> pb.PipelineInfo:
    head = graph.node(graph.output)
    classes = head.attrs.get("classes") or []
    info = pb.PipelineInfo(name=spec.name, source=graph.source, input_names=[f.name for f in graph.inputs],
                           input_kinds=[f.kind for f in graph.inputs], classes=[py_to_value(c) for c in classes],
                           latency_budget_ms=spec.latency_budget_ms, latency_critical=spec.latency_critical)
    info.opaque_steps.extend(str(n.attrs.get("estimator", "?")) for n in graph.nodes if n.op == "blackbox")
    if reg is not None:
        info.outputs.extend(reg.outputs)
        info.rules.extend(reg.plan.rules)
        info.stages.extend(s.kind for s in reg.plan.stages)
        info.param_bytes = sum(replica.engine.store.get(h).nbytes for h in reg.params if replica.engine.store.has(h))
    return info


class ServingServicer:
    def __init__(self, replica: Replica, *, http_address: str = "") -> None:
        self.replica = replica
        self.http_address = http_address

    async def FindMissingParameters(self, request: pb.FindMissingParametersRequest, context: Ctx) -> pb.FindMissingParametersResponse:
        return pb.FindMissingParametersResponse(missing=await self.replica.missing(list(request.hashes)))

    async def UploadParameters(self, request: pb.UploadParametersRequest, context: Ctx) -> pb.UploadParametersResponse:
        tensors = [(t.hash, t.dtype, list(t.shape), t.data) for t in request.tensors]
        n, size = await self.replica.upload(tensors)
        return pb.UploadParametersResponse(stored=n, stored_bytes=size)

    async def Register(self, request: pb.RegisterRequest, context: Ctx) -> pb.RegisterResponse:
        spec = pb.PipelineSpec()
        spec.CopyFrom(request.pipeline)
        reg = await self.replica.register(spec, replace=request.replace)
        return pb.RegisterResponse(info=info_of(spec, reg, reg.plan.graph, self.replica))

    async def Unregister(self, request: pb.UnregisterRequest, context: Ctx) -> pb.UnregisterResponse:
        await self.replica.unregister(request.name)
        return pb.UnregisterResponse()

    async def List(self, request: pb.ListRequest, context: Ctx) -> pb.ListResponse:
        infos = [info_of(s, r, g, self.replica) for s, r, g in await self.replica.infos()]
        return pb.ListResponse(pipelines=sorted(infos, key=lambda i: i.name))

    async def Predict(self, request: pb.PredictRequest, context: Ctx) -> pb.PredictResponse:
        output = output_name(request.output)
        if output:
            check_output(await self.replica.ensure(request.pipeline), output)
        preds = await self.replica.predict(request.pipeline, records_from_proto(request.records))
        return predictions_to_proto(preds, output)

    async def PredictBatch(self, request: pb.PredictBatchRequest, context: Ctx) -> pb.PredictBatchResponse:
        outputs = [output_name(r.output) for r in request.requests]
        for r, output in zip(request.requests, outputs, strict=True):
            if output:
                check_output(await self.replica.ensure(r.pipeline), output)
        reqs = [(r.pipeline, records_from_proto(r.records)) for r in request.requests]
        results = await self.replica.predict_many(reqs)
        return pb.PredictBatchResponse(responses=[predictions_to_proto(p, o)
                                                  for p, o in zip(results, outputs, strict=True)])

    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        e = self.replica.engine
        m = e.memory()
        c = e.cache.stats()
        sched = self.replica.scheduler.stats()
        return pb.GetStatsResponse(instance_id=self.replica.instance_id, pipelines=len(e.pipelines),
                                   param_arrays=m["arrays"], param_bytes=m["array_bytes"], table_bytes=m["table_bytes"],
                                   plan_bytes=m["plan_bytes"], batches=sched["batches"],
                                   rows_computed=e.rows_computed, rows_reused=e.rows_reused,
                                   http_address=self.http_address,
                                   cache_hits=int(c["hits"]), cache_misses=int(c["misses"]), cache_hit_rate=c["hit_rate"],
                                   cache_entries=int(c["entries"]), cache_bytes=int(c["bytes"]),
                                   cache_capacity_bytes=int(c["capacity_bytes"]), cache_evictions=int(c["evictions"]),
                                   executors=sched["executors"], reserved_executors=sched["reserved_executors"],
                                   stage_queues=sched["stage_queues"], stage_batches=sched["stage_batches"],
                                   reserved_batches=sched["reserved_runs"], queued_records=sched["queued"])
