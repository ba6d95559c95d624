"""``tessera.serving.Client``: register pipelines and get predictions from the serving replicas.

The client converts a pipeline to the IR here (a fitted scikit-learn pipeline is imported
by :func:`~tessera.serving.sklearn_import.import_sklearn`; a Flour graph is already IR),
uploads only the parameters the cluster lacks, and registers the graph. Calls go to one
replica and move on to the next when a replica is unreachable, so a replica that goes
away under load costs a retry, not a failure.
"""

from __future__ import annotations

import builtins
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tessera.api.serving.v1 import serving_pb2 as pb
from tessera.api.serving.v1 import serving_pb2_grpc as pb_grpc
from tessera.common import rpc
from tessera.serving.compact import with_head_dtype
from tessera.serving.ir import Pipeline

SERVICE = "tessera.serving.v1.ServingService"
IDEMPOTENT = ("FindMissingParameters", "UploadParameters", "List", "Predict", "PredictBatch", "GetStats")
UPLOAD_BYTES = 32 * 1024 * 1024  # parameters per UploadParameters call
DOWN_S = 5.0  # how long a replica that answered UNAVAILABLE is tried last


@dataclass
class Prediction:
    """A prediction: ``label`` and ``class_index`` for classifiers, ``value`` for regressors;
    ``scores``: class probabilities (or decision values)."""

    label: Any = None
    class_index: int = -1
    value: float = 0.0
    scores: list[float] = field(default_factory=list)


@dataclass
class PipelineInfo:
    name: str
    source: str
    inputs: list[tuple[str, str]]
    classes: list[Any]
    rules: list[str]
    stages: list[str]
    param_bytes: int
    latency_budget_ms: float
    outputs: list[str] = field(default_factory=list)  # beside predict: "predict_proba", "decision_function"
    opaque_steps: list[str] = field(default_factory=list)  # steps run as opaque stages (in a worker process)
    latency_critical: bool = False


def _value(v: pb.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "number":
        x = v.number
        return int(x) if x.is_integer() else x
    return v.text if kind == "text" else None


def _to_value(x: Any) -> pb.Value:
    if isinstance(x, str):
        return pb.Value(text=x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            import numpy as np

            if isinstance(x, np.generic) and not isinstance(x, np.bool_):
                return pb.Value(number=float(x))
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"record values must be text or numbers, got {type(x).__name__}")
    return pb.Value(number=float(x))


def _record(r: Any) -> pb.Record:
    if isinstance(r, dict):
        return pb.Record(fields={str(k): _to_value(v) for k, v in r.items()})
    if isinstance(r, (list, tuple)) or (hasattr(r, "tolist") and not isinstance(r, str)):
        vals = r.tolist() if hasattr(r, "tolist") else r
        if not isinstance(vals, list):
            vals = [vals]
        return pb.Record(values=[_to_value(v) for v in vals])
    return pb.Record(values=[_to_value(r)])


def _preds(resp: pb.PredictResponse) -> list[Prediction]:
    out = []
    for p in resp.predictions:
        if p.class_index >= 0:
            out.append(Prediction(label=_value(p.label), class_index=p.class_index, scores=list(p.scores)))
        else:
            out.append(Prediction(value=p.value, scores=list(p.scores)))
    return out


def _info(i: pb.PipelineInfo) -> PipelineInfo:
    return PipelineInfo(i.name, i.source, list(zip(i.input_names, i.input_kinds, strict=True)),
                        [_value(c) for c in i.classes], list(i.rules), list(i.stages), i.param_bytes,
                        i.latency_budget_ms, list(i.outputs), list(i.opaque_steps), i.latency_critical)


OUTPUTS = {"": pb.OUTPUT_DEFAULT, "predict_proba": pb.OUTPUT_PREDICT_PROBA,
           "decision_function": pb.OUTPUT_DECISION_FUNCTION}


def _output(output: str) -> pb.Output.ValueType:
    try:
        return OUTPUTS[output]
    except KeyError:
        raise ValueError(f"output must be '', 'predict_proba' or 'decision_function', got {output!r}") from None


def to_ir(pipeline: Any, *, strict: bool = False) -> Pipeline:
    """A Flour graph, an IR pipeline or a fitted scikit-learn estimator, as IR. A scikit-learn
    step the IR cannot express becomes an opaque stage (with a warning); ``strict=True``
    refuses it instead (:class:`~tessera.serving.sklearn_import.UnsupportedEstimatorError`)."""
    if isinstance(pipeline, Pipeline):
        return pipeline
    build = getattr(pipeline, "build", None)
    if callable(build):
        out = build()
        if isinstance(out, Pipeline):
            return out
    if type(pipeline).__module__.startswith("sklearn."):
        from tessera.serving.sklearn_import import import_sklearn

        return import_sklearn(pipeline, strict=strict)
    raise TypeError(f"cannot serve a {type(pipeline).__name__}: give a Flour pipeline or a fitted scikit-learn one")


def serving_addresses(address: str | None = None) -> list[str]:
    """The serving replicas registered in the cluster (``tessera up`` run dir or TESSERA_ADDRESS)."""
    from tessera.api.control_store.v1 import control_store_pb2 as cpb
    from tessera.client._discovery import find_cluster
    from tessera.common.registry import control_store_stub

    cluster = find_cluster(address)
    ch, stub = control_store_stub(cluster.control_store_address)
    with ch:
        inst = stub.ListInstances(cpb.ListInstancesRequest(service="serving"), timeout=10.0).instances
    addrs = sorted({i.address for i in inst})
    if not addrs:
        raise ConnectionError("no serving replica is registered in the cluster")
    return addrs


class Client:
    """A blocking, thread-safe client of the serving replicas.

    Args:
        addresses: host:port of one or more replicas; default: every replica registered in
            the cluster found by ``tessera up`` (or ``TESSERA_ADDRESS``).
        timeout: deadline in seconds of each call.
    """

    def __init__(self, addresses: str | Sequence[str] | None = None, *, timeout: float = 30.0,
                 cluster_address: str | None = None) -> None:
        if addresses is None:
            addrs = serving_addresses(cluster_address)
        elif isinstance(addresses, str):
            addrs = [addresses]
        else:
            addrs = list(addresses)
        self.addresses = addrs
        self.timeout = timeout
        self._channels = [rpc.channel(a, service=SERVICE, idempotent_methods=IDEMPOTENT, default_timeout=timeout)
                          for a in addrs]
        self._stubs = [pb_grpc.ServingServiceStub(c) for c in self._channels]
        self._next = itertools.count()
        self._down: dict[int, float] = {}  # replica index -> until when it is tried last
        self._lock = threading.Lock()

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, *, failover: bool = True) -> Any:
        """Call one replica (round robin); on UNAVAILABLE try the others in turn."""
        with self._lock:
            start = next(self._next) % len(self._stubs)
        now = time.monotonic()
        order = [(start + i) % len(self._stubs) for i in range(len(self._stubs))]
        # replicas that just failed go last (for DOWN_S), so one that went away costs one retry
        order.sort(key=lambda i: self._down.get(i, 0.0) > now)
        last: grpc.RpcError | None = None
        for i in order if failover else order[:1]:
            try:
                return getattr(self._stubs[i], method)(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise
                self._down[i] = time.monotonic() + DOWN_S
                last = e
        assert last is not None
        raise last

    # ------------------------------------------------------------------ pipelines
    def register(self, name: str, pipeline: Any, *, latency_budget_ms: float = 0.0, replace: bool = True,
                 strict: bool = False, head_dtype: str = "float64", latency_critical: bool = False) -> PipelineInfo:
        """Serve ``pipeline`` (Flour or a fitted scikit-learn pipeline) as ``name``.

        Only parameters the cluster does not hold yet are sent; a pipeline that shares a
        vocabulary with one already registered uploads only its own weights.
        ``latency_budget_ms``: how long its requests may wait to be batched (0: the default).
        A scikit-learn step the IR cannot express runs as an opaque stage (its pickle, in a
        worker process of the server) with an ``OpaqueStepWarning``; ``strict=True`` refuses
        it instead, naming the step.
        ``head_dtype``: "float32" stores linear heads' weights in half the bytes, predictions equal within
        :data:`~tessera.serving.compact.FLOAT32_RTOL` (see :mod:`tessera.serving.compact`).
        ``latency_critical``: the replicas' reserved executors serve it too, so a flood of
        requests to other pipelines does not delay it.
        """
        ir = with_head_dtype(to_ir(pipeline, strict=strict), head_dtype)
        missing = list(self._call("FindMissingParameters", pb.FindMissingParametersRequest(hashes=list(ir.params))).missing)
        batch: list[pb.Tensor] = []
        size = 0
        for h in missing:
            a = ir.params[h]
            batch.append(pb.Tensor(hash=h, dtype=a.dtype.str, shape=list(a.shape), data=a.tobytes()))
            size += a.nbytes
            if size >= UPLOAD_BYTES:
                self._call("UploadParameters", pb.UploadParametersRequest(tensors=batch))
                batch, size = [], 0
        if batch:
            self._call("UploadParameters", pb.UploadParametersRequest(tensors=batch))
        spec = pb.PipelineSpec(name=name, graph_json=ir.graph.to_json(), latency_budget_ms=latency_budget_ms,
                               latency_critical=latency_critical)
        resp = self._call("Register", pb.RegisterRequest(pipeline=spec, replace=replace), failover=False)
        return _info(resp.info)

    def unregister(self, name: str) -> None:
        self._call("Unregister", pb.UnregisterRequest(name=name), failover=False)

    def list(self) -> builtins.list[PipelineInfo]:
        return [_info(i) for i in self._call("List", pb.ListRequest()).pipelines]

    # ------------------------------------------------------------------ predictions
    def predict(self, name: str, records: Sequence[Any], *, output: str = "") -> builtins.list[Prediction]:
        """Predictions of pipeline ``name`` for ``records`` (dicts of fields, lists of values,
        or bare values for single-input pipelines such as text ones).

        ``output``: what a classifier's ``scores`` hold: ``"predict_proba"``,
        ``"decision_function"``, or by default the probabilities when the model has them, else
        its decision values. A model without that output is INVALID_ARGUMENT
        (``PipelineInfo.outputs`` lists those it has)."""
        req = pb.PredictRequest(pipeline=name, records=[_record(r) for r in records], output=_output(output))
        return _preds(self._call("Predict", req))

    def predict_batch(self, requests: Sequence[tuple[str, Sequence[Any]]], *,
                      output: str = "") -> builtins.list[builtins.list[Prediction]]:
        """Several (pipeline, records) requests in one call, run together on one replica:
        a featurizer that pipelines share runs once per distinct input."""
        out = _output(output)
        req = pb.PredictBatchRequest(requests=[pb.PredictRequest(pipeline=n, records=[_record(r) for r in recs],
                                                                 output=out)
                                               for n, recs in requests])
        return [_preds(r) for r in self._call("PredictBatch", req).responses]

    def stats(self, replica: int = 0) -> pb.GetStatsResponse:
        """Memory and scheduler figures of one replica."""
        resp: pb.GetStatsResponse = self._stubs[replica].GetStats(pb.GetStatsRequest(), timeout=self.timeout)
        return resp
