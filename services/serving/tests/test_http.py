"""The HTTP front end on a real socket (uvicorn), over a real replica: engine, stage scheduler and the cluster
registry in a control-store process (over real NATS and Redis). Pipelines are scikit-learn's, put into the
registry as a registration does and loaded by the replica on first use.

Covered: Tessera's JSON routes, the KServe v2 protocol (metadata, readiness, inference, equal to scikit-learn),
the bearer token on every route but health, malformed KServe requests (400) and oversized bodies (413) that change
nothing, ``Expect: 100-continue``, the trace of a request under its ``traceparent``, and the OpenAPI document
against the routes served.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from tessera.api.serving.v1 import serving_pb2 as pb
from tessera.common import procs, telemetry
from tessera.common.config import Settings
from tessera.common.registry import control_store_aio_stub
from tessera.common.rpc import health_status
from tessera.serving.cluster import ClusterStore
from tessera.serving.engine import Engine
from tessera.serving.http import HttpFrontEnd
from tessera.serving.replica import Replica
from tessera.serving.scheduler import Scheduler
from tessera.serving.sklearn_import import import_sklearn
from tessera.testing import NatsServer, redis_server, track

TOKEN = "s3cret-token-of-this-front-end"
MAX_BODY = 64 * 1024
TOL = 1e-6


# ---------------------------------------------------------------------- a control store, pipelines, a replica


@pytest.fixture(scope="module")
def control_store(nats_srv: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a control-store process over real NATS and Redis."""
    with redis_server() as redis:
        port = procs.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
        env.update(TESSERA_NATS_URL=nats_srv.url, TESSERA_REDIS_URLS=redis.url, TESSERA_GRPC_HOST="127.0.0.1",
                   TESSERA_GRPC_PORT=str(port), TESSERA_CONTROL_STORE_ADDRESS=f"127.0.0.1:{port}",
                   OTEL_TRACES_SAMPLER="always_off")
        log = Path(tmp_path_factory.mktemp("serving-http")) / "control-store.log"
        proc = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=log, env=env)
        track(proc)
        address = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while health_status(address, timeout=0.5) != "SERVING":
                assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
                time.sleep(0.1)
            yield address
        finally:
            procs.stop(proc, timeout=10)


@dataclass
class Fitted:
    """scikit-learn pipelines: a text classifier and a tabular regressor with a categorical column."""

    reviews: Pipeline
    docs: list[str]
    tabular: Pipeline
    X: np.ndarray


@pytest.fixture(scope="module")
def fitted(texts: tuple[list[str], np.ndarray], tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Fitted:
    docs, labels = texts
    reviews = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(C=5.0)).fit(docs, labels)
    X, y, _ = tabular
    ct = ColumnTransformer([("num", StandardScaler(), [0, 1, 2, 3]), ("cat", OneHotEncoder(handle_unknown="ignore"),
                                                                        [4])])
    return Fitted(reviews, docs, Pipeline([("ct", ct), ("m", Ridge(alpha=1.0))]).fit(X, y), X)


_SPANS: list[tuple[TracerProvider, InMemorySpanExporter]] = []


def _finished_spans() -> list[ReadableSpan]:
    """Spans this process finished, through the global tracer provider (installed once per process)."""
    if not _SPANS:
        exporter = InMemorySpanExporter()
        provider = telemetry.setup_tracing("tessera-tests", exporter=exporter)
        _SPANS.append((provider, exporter))
    provider, exporter = _SPANS[0]
    assert provider.force_flush(5000)
    return list(exporter.get_finished_spans())


@dataclass
class Served:
    front: HttpFrontEnd
    engine: Engine
    scheduler: Scheduler
    cluster: ClusterStore
    versions: dict[str, int]
    up: list[bool]

    @property
    def port(self) -> int:
        return self.front.port

    def state(self) -> tuple[Any, ...]:
        """What a request may change: rows featurized, batches run, pipelines loaded."""
        return self.engine.rows_computed, self.scheduler.batches, sorted(self.engine.pipelines)


async def _serve(control_store: str, fitted: Fitted, token: str, prefix: str) -> AsyncIterator[Served]:
    """A replica whose registry holds ``<prefix>reviews`` and ``<prefix>tabular`` (parameters on this node,
    not loaded yet), behind the front end on a free port."""
    _finished_spans()  # the tracer provider is in place before any request
    channel, stub = control_store_aio_stub(Settings(control_store_address=control_store))
    cluster = ClusterStore(stub, timeout=10.0)
    engine = Engine(max_records=64)
    scheduler = Scheduler(engine, workers=1)
    replica = Replica(engine, scheduler, cluster)
    up = [True]
    front = HttpFrontEnd(replica.predict, cluster.pipeline_names, replica.ensure, token=token, max_body=MAX_BODY,
                         ready=lambda: up[0])
    versions = {}
    for name, sk in (("reviews", fitted.reviews), ("tabular", fitted.tabular)):
        ir = import_sklearn(sk)
        for h, arr in ir.params.items():
            engine.store.put(h, arr)
        spec = pb.PipelineSpec(name=prefix + name, graph_json=ir.graph.to_json(), latency_budget_ms=0.0,
                               registered_ms=int(time.time() * 1000))
        await cluster.put_pipeline(spec, replace=True)
        versions[prefix + name] = spec.registered_ms
    scheduler.start()
    await front.start("127.0.0.1", 0)
    try:
        yield Served(front, engine, scheduler, cluster, versions, up)
    finally:
        await front.stop()
        await scheduler.stop()
        for name in versions:
            await cluster.delete_pipeline(name)
        await channel.close()


@pytest.fixture
async def open_(control_store: str, fitted: Fitted) -> AsyncIterator[Served]:
    async for s in _serve(control_store, fitted, "", f"t{uuid.uuid4().hex[:8]}-"):
        yield s


@pytest.fixture
async def secured(control_store: str, fitted: Fitted) -> AsyncIterator[Served]:
    async for s in _serve(control_store, fitted, TOKEN, f"t{uuid.uuid4().hex[:8]}-"):
        yield s


# ---------------------------------------------------------------------- raw HTTP/1.1


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    got: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        got[k.strip().lower()] = v.strip()
    data = await asyncio.wait_for(reader.readexactly(int(got.get("content-length", "0"))), 10)
    return status, got, data


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                    body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on an open keep-alive connection: (status, headers with lowercased names, body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    return await _read_response(reader)


async def _request(port: int, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await _exchange(reader, writer, method, path, body, headers)
    finally:
        writer.close()


async def _json(port: int, method: str, path: str, payload: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body = json.dumps(payload).encode() if payload is not None else b""
    status, _, data = await _request(port, method, path, body, headers)
    return status, json.loads(data) if data else None


def _tensor(name: str, datatype: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape if shape is not None else [len(data)], "data": data}


def _tabular_inputs(X: np.ndarray) -> list[dict[str, Any]]:
    return [*(_tensor(f"x{j}", "FP64", [float(v) for v in X[:, j]]) for j in range(4)),
            _tensor("x4", "BYTES", [str(v) for v in X[:, 4]])]


# ---------------------------------------------------------------------- Tessera's JSON routes


async def test_v1_predict_and_list(open_: Served, fitted: Fitted) -> None:
    name = next(n for n in open_.versions if n.endswith("reviews"))
    status, body = await _json(open_.port, "POST", f"/v1/pipelines/{name}:predict", {"records": fitted.docs[:5]})
    assert status == 200, body
    assert [p["label"] for p in body["predictions"]] == fitted.reviews.predict(fitted.docs[:5]).tolist()
    np.testing.assert_allclose([p["scores"] for p in body["predictions"]],
                               fitted.reviews.predict_proba(fitted.docs[:5]), atol=TOL)
    status, body = await _json(open_.port, "GET", "/v1/pipelines")
    assert status == 200 and set(open_.versions) <= set(body["pipelines"])
    for path, payload, code, text in (("/v1/pipelines/nope:predict", {"records": ["x"]}, 404, "no pipeline named"),
                                      (f"/v1/pipelines/{name}:predict", {"rows": []}, 400, '{"records"'),
                                      (f"/v1/pipelines/{name}:predict", {"records": [{"text": 1}]}, 400, "must be text")):
        status, body = await _json(open_.port, "POST", path, payload)
        assert status == code and body["error"]["code"] in ("NOT_FOUND", "INVALID_ARGUMENT"), body
        assert text in body["error"]["message"], body
    status, _, data = await _request(open_.port, "GET", f"/v1/pipelines/{name}:predict")
    assert status == 405 and json.loads(data)["error"]["message"] == f"GET is not allowed on /v1/pipelines/{name}:predict"


# ---------------------------------------------------------------------- KServe v2


async def test_kserve_health_and_server_metadata(open_: Served) -> None:
    assert await _json(open_.port, "GET", "/v2/health/live") == (200, {"live": True})
    assert await _json(open_.port, "GET", "/v2/health/ready") == (200, {"ready": True})
    open_.up[0] = False  # the replica shutting down: not ready, still live
    assert await _json(open_.port, "GET", "/v2/health/ready") == (503, {"ready": False})
    assert await _json(open_.port, "GET", "/v2/health/live") == (200, {"live": True})
    status, meta = await _json(open_.port, "GET", "/v2")
    assert status == 200 and meta["name"] == "tessera-serving" and meta["version"]


async def test_kserve_model_metadata_and_readiness(open_: Served) -> None:
    reviews, tabular = (next(n for n in open_.versions if n.endswith(s)) for s in ("reviews", "tabular"))
    status, meta = await _json(open_.port, "GET", f"/v2/models/{reviews}")
    assert status == 200, meta
    assert meta == {"name": reviews, "versions": [str(open_.versions[reviews])], "platform": "tessera",
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                    "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                                {"name": "scores", "datatype": "FP64", "shape": [-1, -1]}]}
    status, meta = await _json(open_.port, "GET", f"/v2/models/{tabular}/versions/{open_.versions[tabular]}")
    assert status == 200, meta
    assert meta["inputs"] == [*({"name": f"x{j}", "datatype": "FP64", "shape": [-1]} for j in range(4)),
                              {"name": "x4", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "value", "datatype": "FP64", "shape": [-1]}]
    assert await _json(open_.port, "GET", f"/v2/models/{tabular}/ready") == (200, {"name": tabular, "ready": True})
    v = open_.versions[tabular]
    assert (await _json(open_.port, "GET", f"/v2/models/{tabular}/versions/{v}/ready"))[0] == 200
    for path, code, text in ((f"/v2/models/{tabular}/versions/{v + 1}", 404, "has no version"),
                             (f"/v2/models/{tabular}/versions/{v + 1}/ready", 404, "has no version"),
                             ("/v2/models/no-such-model", 404, "no pipeline named 'no-such-model'"),
                             ("/v2/models/no-such-model/ready", 404, "no pipeline named"),
                             ("/v2/models/bad%20name!", 400, "bad pipeline name"),
                             ("/v2/nowhere", 404, "no route GET /v2/nowhere")):
        status, body = await _json(open_.port, "GET", path)
        assert status == code and isinstance(body["error"], str) and text in body["error"], (path, body)


async def test_kserve_infer_equals_scikit_learn(open_: Served, fitted: Fitted) -> None:
    reviews, tabular = (next(n for n in open_.versions if n.endswith(s)) for s in ("reviews", "tabular"))
    docs = fitted.docs[:7]
    status, out = await _json(open_.port, "POST", f"/v2/models/{reviews}/infer",
                              {"id": "r-1", "inputs": [_tensor("text", "BYTES", docs)]})
    assert status == 200, out
    assert (out["model_name"], out["model_version"], out["id"]) == (reviews, str(open_.versions[reviews]), "r-1")
    label, scores = out["outputs"]
    assert label == {"name": "label", "datatype": "BYTES", "shape": [7], "data": fitted.reviews.predict(docs).tolist()}
    assert (scores["name"], scores["datatype"], scores["shape"]) == ("scores", "FP64", [7, 3])
    np.testing.assert_allclose(np.reshape(scores["data"], (7, 3)), fitted.reviews.predict_proba(docs), atol=TOL)
    # one output asked for; the text as a [batch, 1] tensor with nested data
    status, out = await _json(open_.port, "POST", f"/v2/models/{reviews}/versions/{open_.versions[reviews]}/infer",
                              {"inputs": [_tensor("text", "BYTES", [[d] for d in docs[:2]], [2, 1])],
                               "outputs": [{"name": "scores"}]})
    assert status == 200 and [o["name"] for o in out["outputs"]] == ["scores"] and "id" not in out, out
    # tabular: numbers as FP64, FP32 and INT64, the category as BYTES, in any order of inputs
    X = fitted.X[:5]
    inputs = _tabular_inputs(X)
    inputs[1] = _tensor("x1", "FP32", [float(np.float32(v)) for v in X[:, 1]])
    status, out = await _json(open_.port, "POST", f"/v2/models/{tabular}/infer", {"inputs": inputs[::-1]})
    assert status == 200, out
    (value,) = out["outputs"]
    assert (value["name"], value["datatype"], value["shape"]) == ("value", "FP64", [5])
    expect = fitted.tabular.predict(np.column_stack([X[:, 0], X[:, 1].astype(np.float32), X[:, 2:]]).astype(object))
    np.testing.assert_allclose(value["data"], expect, atol=TOL)
    ints = [_tensor(f"x{j}", "INT64", [3, -1]) for j in range(4)] + [_tensor("x4", "BYTES", ["red", "blue"])]
    status, out = await _json(open_.port, "POST", f"/v2/models/{tabular}/infer", {"inputs": ints})
    assert status == 200, out
    rows = np.array([[3.0, 3.0, 3.0, 3.0, "red"], [-1.0, -1.0, -1.0, -1.0, "blue"]], dtype=object)
    np.testing.assert_allclose(out["outputs"][0]["data"], fitted.tabular.predict(rows), atol=TOL)


def _bad_requests(X: np.ndarray) -> list[tuple[str, str, Any, str]]:
    """(id, model suffix, body, what the message says) of malformed inference requests."""
    tab = _tabular_inputs(X[:2])
    text = _tensor("text", "BYTES", ["good food", "bad"])
    return [
        ("unknown-input", "reviews", {"inputs": [_tensor("body", "BYTES", ["x"])]},
         "input 'body': no such input; this model takes text (BYTES)"),
        ("missing-input", "tabular", {"inputs": tab[:4]}, "missing input(s) 'x4'"),
        ("input-twice", "reviews", {"inputs": [text, text]}, "input 'text' is given twice"),
        ("text-as-fp32", "reviews", {"inputs": [_tensor("text", "FP32", [1.0])]},
         "input 'text': datatype FP32 does not fit a text field; send BYTES"),
        ("number-as-bytes", "tabular", {"inputs": [_tensor("x0", "BYTES", ["1", "2"]), *tab[1:]]},
         "input 'x0': datatype BYTES does not fit a number field; send FP64"),
        ("unknown-datatype", "reviews", {"inputs": [_tensor("text", "STRING", ["x"])]},
         "datatype 'STRING' is not a KServe datatype"),
        ("matrix-shape", "reviews", {"inputs": [_tensor("text", "BYTES", ["a", "b", "c", "d"], [2, 2])]},
         "input 'text': shape [2, 2]; a field is one value a record"),
        ("empty-batch", "reviews", {"inputs": [_tensor("text", "BYTES", [], [0])]}, "shape [0]"),
        ("shape-not-data", "reviews", {"inputs": [_tensor("text", "BYTES", ["a", "b"], [3])]},
         "input 'text': 2 elements in 'data' for shape [3]"),
        ("negative-shape", "reviews", {"inputs": [_tensor("text", "BYTES", ["a"], [-1])]},
         "'shape' must be a list of non-negative integers"),
        ("number-in-bytes", "reviews", {"inputs": [_tensor("text", "BYTES", ["a", 3])]},
         "input 'text': element 1 is 3, not a string as BYTES requires"),
        ("float-in-int", "tabular", {"inputs": [_tensor("x0", "INT32", [1, 2.5]), *tab[1:]]},
         "input 'x0': element 1 is 2.5, not an integer as INT32 requires"),
        ("bool-in-fp", "tabular", {"inputs": [_tensor("x0", "FP64", [True, 1.0]), *tab[1:]]},
         "element 0 is true, not a number"),
        ("batches-differ", "tabular", {"inputs": [_tensor("x0", "FP64", [1.0, 2.0, 3.0], [3]), *tab[1:]]},
         "batch of"),
        ("unknown-output", "reviews", {"inputs": [text], "outputs": [{"name": "proba"}]},
         "outputs[0]: no output 'proba'; this model gives label, scores"),
        ("binary-output", "reviews", {"inputs": [text], "outputs": [{"name": "label",
                                                                      "parameters": {"binary_data": True}}]},
         "binary data is not supported"),
        ("no-inputs", "reviews", {"outputs": []}, "'inputs' must be a non-empty list"),
        ("tensor-not-object", "reviews", {"inputs": ["text"]}, "inputs[0] must be an object"),
        ("id-not-string", "reviews", {"id": 3, "inputs": [text]}, "'id' must be a string"),
        ("body-a-list", "reviews", [text], "body must be an object"),
        ("not-json", "reviews", b"{inputs: nope", "body is not JSON"),
        ("unknown-model", "nope", {"inputs": [text]}, "no pipeline named"),
    ]


BAD_IDS = [c[0] for c in _bad_requests(np.zeros((2, 5), dtype=object))]


@pytest.mark.parametrize("case", BAD_IDS)
async def test_a_malformed_inference_request_is_400_and_changes_nothing(open_: Served, fitted: Fitted,
                                                                        case: str) -> None:
    _, model, body, text = next(c for c in _bad_requests(fitted.X) if c[0] == case)
    name = next((n for n in open_.versions if n.endswith(model)), "nope")
    # loaded first, so that "nothing changed" means no prediction ran (not merely that nothing was loaded)
    assert (await _json(open_.port, "GET", f"/v2/models/{name}/ready"))[0] == (404 if model == "nope" else 200)
    before = open_.state()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, headers, out = await _request(open_.port, "POST", f"/v2/models/{name}/infer", data,
                                          {"Content-Type": "application/json"})
    assert status == (404 if model == "nope" else 400), out
    assert headers["content-type"] == "application/json"
    error = json.loads(out)["error"]
    assert isinstance(error, str) and text in error, error
    assert open_.state() == before


async def test_the_binary_tensor_extension_is_refused(open_: Served) -> None:
    name = next(n for n in open_.versions if n.endswith("reviews"))
    status, _, out = await _request(open_.port, "POST", f"/v2/models/{name}/infer", b"{}\x00\x00\x00\x01a",
                                    {"Inference-Header-Content-Length": "2"})
    assert status == 400 and "binary tensor extension is not supported" in json.loads(out)["error"]


# ---------------------------------------------------------------------- body size, Expect: 100-continue


async def test_an_oversized_body_is_413_before_it_is_read_and_changes_nothing(open_: Served) -> None:
    name = next(n for n in open_.versions if n.endswith("reviews"))
    assert (await _json(open_.port, "GET", f"/v2/models/{name}/ready"))[0] == 200
    before = open_.state()
    big = json.dumps({"inputs": [_tensor("text", "BYTES", ["x" * 1000] * 100)]}).encode()
    assert len(big) > MAX_BODY
    status, _, out = await _request(open_.port, "POST", f"/v2/models/{name}/infer", big)
    assert status == 413 and json.loads(out)["error"] == f"request body of {len(big)} bytes; at most {MAX_BODY}"
    status, _, out = await _request(open_.port, "POST", f"/v1/pipelines/{name}:predict", big)
    assert status == 413 and json.loads(out)["error"]["code"] == "RESOURCE_EXHAUSTED"
    # announced with Expect: 100-continue: refused without asking for the body (none is sent)
    reader, writer = await asyncio.open_connection("127.0.0.1", open_.port)
    try:
        writer.write(f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(big)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        await writer.drain()
        status, _, out = await _read_response(reader)
        assert status == 413, out
    finally:
        writer.close()
    # chunked (no length to check first): refused once the bytes read pass the limit
    reader, writer = await asyncio.open_connection("127.0.0.1", open_.port)
    try:
        writer.write(f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for i in range(0, len(big), 8192):
            part = big[i:i + 8192]
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        status, _, out = await _read_response(reader)
        assert status == 413 and f"more than {MAX_BODY} bytes" in json.loads(out)["error"], out
    finally:
        writer.close()
    assert open_.state() == before


async def test_expect_100_continue(open_: Served, fitted: Fitted) -> None:
    name = next(n for n in open_.versions if n.endswith("reviews"))
    body = json.dumps({"inputs": [_tensor("text", "BYTES", fitted.docs[:1])]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", open_.port)
    try:
        writer.write(f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 100")
        assert await asyncio.wait_for(reader.readline(), 10) == b"\r\n"
        writer.write(body)
        await writer.drain()
        status, _, out = await _read_response(reader)
        assert status == 200 and json.loads(out)["outputs"][0]["data"] == fitted.reviews.predict(fitted.docs[:1]).tolist()
    finally:
        writer.close()


# ---------------------------------------------------------------------- the token


BAD_TOKENS = {
    "no token": {},
    "wrong token": {"Authorization": "Bearer not-the-token"},
    "another scheme": {"Authorization": f"Basic {TOKEN}"},
    "token without scheme": {"Authorization": TOKEN},
}
GUARDED = [("POST", "/v1/pipelines/{reviews}:predict", {"records": ["good food"]}),
           ("GET", "/v1/pipelines", None),
           ("GET", "/v2", None),
           ("GET", "/v2/models/{reviews}", None),
           ("GET", "/v2/models/{reviews}/ready", None),
           ("POST", "/v2/models/{reviews}/infer", {"inputs": [_tensor("text", "BYTES", ["good food"])]}),
           ("GET", "/openapi.json", None)]


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_every_route_but_health_refuses_a_request_without_the_token(secured: Served, case: str) -> None:
    reviews = next(n for n in secured.versions if n.endswith("reviews"))
    for method, template, payload in GUARDED:
        path = template.format(reviews=reviews)
        body = json.dumps(payload).encode() if payload is not None else b""
        status, headers, data = await _request(secured.port, method, path, body, BAD_TOKENS[case])
        assert status == 401, (case, path, status, data)
        assert headers["www-authenticate"] == 'Bearer realm="tessera"', headers
        assert headers["content-type"] == "application/json"
        error = json.loads(data)["error"]
        message = error if path.startswith("/v2") else error["message"]
        if not path.startswith("/v2"):
            assert error["code"] == "UNAUTHENTICATED"
        assert "authorization" in message or "token" in message, error
        assert TOKEN not in data.decode()
    assert secured.state() == (0, 0, [])  # refused before routing: nothing loaded, nothing predicted
    for path in ("/healthz", "/v2/health/live", "/v2/health/ready"):  # the probes stay open
        status, _, _ = await _request(secured.port, "GET", path, headers=BAD_TOKENS[case])
        assert status == 200, path


async def test_the_right_token_is_served(secured: Served) -> None:
    reviews = next(n for n in secured.versions if n.endswith("reviews"))
    ok = {"Authorization": f"Bearer {TOKEN}"}
    for method, template, payload in GUARDED:
        status, body = await _json(secured.port, method, template.format(reviews=reviews), payload, ok)
        assert status == 200, (template, body)
    status, _ = await _json(secured.port, "GET", "/v1/nowhere")
    assert status == 401  # without the token nobody learns which paths exist
    status, _ = await _json(secured.port, "GET", "/v1/nowhere", headers=ok)
    assert status == 404


async def test_a_refusal_keeps_the_connection_usable(secured: Served) -> None:
    """The refused request's body is consumed, so the next request on the same connection is parsed right."""
    reviews = next(n for n in secured.versions if n.endswith("reviews"))
    body = json.dumps({"records": ["good food", "rude staff"]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", secured.port)
    try:
        status, headers, _ = await _exchange(reader, writer, "POST", f"/v1/pipelines/{reviews}:predict", body)
        assert status == 401 and headers.get("connection", "keep-alive") == "keep-alive", headers
        status, _, data = await _exchange(reader, writer, "POST", f"/v1/pipelines/{reviews}:predict", body,
                                          {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and len(json.loads(data)["predictions"]) == 2, data
    finally:
        writer.close()


# ---------------------------------------------------------------------- traces, OpenAPI


async def test_one_request_is_one_trace_under_its_traceparent(open_: Served, fitted: Fitted) -> None:
    name = next(n for n in open_.versions if n.endswith("reviews"))
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = json.dumps({"inputs": [_tensor("text", "BYTES", fitted.docs[:2])]}).encode()
    _finished_spans()
    _SPANS[0][1].clear()
    status, _, out = await _request(open_.port, "POST", f"/v2/models/{name}/infer", body,
                                    {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert status == 200, out
    spans = [s for s in _finished_spans() if s.context is not None and f"{s.context.trace_id:032x}" == trace_id]
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    (server,) = [s for s in spans if s.name == "POST /v2/models/{name}/infer"]
    assert server.parent is not None and f"{server.parent.span_id:016x}" == parent_id
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v2/models/{name}/infer"

    def under_server(s: ReadableSpan) -> bool:
        while s.parent is not None and s.parent.span_id in by_id:
            s = by_id[s.parent.span_id]
            if s is server:
                return True
        return False

    (predict,) = [s for s in spans if s.name == "serving predict"]
    assert predict.attributes is not None and predict.attributes["tessera.pipeline"] == name
    assert predict.parent is not None and predict.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    # the replica loaded the pipeline for this request: its read of the registry is in the same trace
    registry = [s for s in spans if "KvGet" in s.name]
    assert registry and all(under_server(s) for s in registry), [s.name for s in spans]
    assert all(under_server(s) for s in spans if s is not server), [(s.name, s.parent) for s in spans]


async def test_the_openapi_document_describes_the_routes_served(open_: Served) -> None:
    status, doc = await _json(open_.port, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    served = {(r.path, m.lower()) for r in open_.front.routes for m in (r.methods or ()) if m != "HEAD"}
    described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert described == served
    refs = {v for ops in doc["paths"].values() for op in ops.values() for v in _refs(op)}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(doc["components"]["schemas"])
    open_paths = {p for p, ops in doc["paths"].items() for op in ops.values() if op.get("security") == []}
    assert open_paths == {"/healthz", "/v2/health/live", "/v2/health/ready"}


def _refs(x: Any) -> Iterator[str]:
    if isinstance(x, dict):
        for k, v in x.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(x, list):
        for v in x:
            yield from _refs(v)
