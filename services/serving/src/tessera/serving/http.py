"""The HTTP front end of a serving replica (Starlette on uvicorn, in the replica's event loop), beside gRPC.

Tessera's own JSON routes:

- ``POST /v1/pipelines/<name>:predict`` with ``{"records": [...]}`` -> ``{"predictions": [...]}``
- ``GET /v1/pipelines`` -> ``{"pipelines": [names]}``
- ``GET /healthz`` -> ``ok``

Their errors are ``{"error": {"code": "NOT_FOUND", "message": ...}}`` with the matching HTTP status.

The KServe v2 inference protocol (the Open Inference Protocol's REST binding, JSON tensors only):

- ``GET /v2``: server metadata; ``GET /v2/health/live``, ``GET /v2/health/ready``;
- ``GET /v2/models/<name>[/versions/<v>]``: a pipeline's metadata, its inputs and outputs as tensors;
- ``GET /v2/models/<name>[/versions/<v>]/ready``;
- ``POST /v2/models/<name>[/versions/<v>]/infer``.

A pipeline's input fields are its KServe inputs, one 1-D tensor each (shape ``[batch]`` or ``[batch, 1]``): a
text field is ``BYTES``, a number ``FP64`` (any FP or INT datatype is taken), a category ``BYTES`` (or a number).
A classifier answers ``label`` (its classes' type: ``BYTES``, ``INT64``, ``FP64`` or ``BOOL``) and ``scores``
(``FP64``, ``[batch, k]``: probabilities when the model has them, else decision values); a regressor ``value``
(``FP64``). Errors are ``{"error": message}``, with 400 for a malformed request, 404 for an unknown model.

``GET /openapi.json`` describes every route.

Every request is one trace: a W3C ``traceparent`` header is the parent of the request's server span, and the
replica's work for it (the prediction, and loading the pipeline when this replica has not yet) are its children.

With a token configured (as for gRPC: ``TESSERA_AUTH_TOKEN``/``TESSERA_AUTH_TOKEN_FILE``, which ``tessera up
--auth`` sets), every request but the health probes (:data:`OPEN_PATHS`) must carry ``Authorization: Bearer
<token>``, checked by :func:`tessera.common.auth.check` exactly as gRPC calls are; one without it gets 401 with
``WWW-Authenticate: Bearer realm="tessera"`` before it is routed or its body read. A body longer than the limit
is refused with 413: at once when its ``Content-Length`` says so (an ``Expect: 100-continue`` client is not asked
for it), else as soon as the bytes read pass the limit.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from tessera.common import auth
from tessera.common.errors import InvalidArgumentError, TesseraError
from tessera.common.web import WebServer
from tessera.serving.engine import Prediction, Registered

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("tessera.serving.http")

MAX_BODY = 16 * 1024 * 1024
#: HTTP status of each error code (RESOURCE_EXHAUSTED: too many records or characters in one request).
STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 413,
          "FAILED_PRECONDITION": 412, "UNAUTHENTICATED": 401, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}

Predict = Callable[[str, list[Any]], Awaitable[list[Prediction]]]
Names = Callable[[], Awaitable[list[str]]]
Model = Callable[[str], Awaitable[Registered]]
Ready = Callable[[], bool]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Paths served without the token: the probes (like gRPC's health service, they tell nothing about the
#: pipelines and must answer callers that hold no secret).
OPEN_PATHS = frozenset({"/healthz", "/v2/health/live", "/v2/health/ready"})
#: Sent with every 401 (RFC 6750): the scheme the client must use.
CHALLENGE = 'Bearer realm="tessera"'
#: The ``platform`` of every model's KServe metadata.
PLATFORM = "tessera"

# KServe datatypes a pipeline field takes, by the field's kind
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
_INTS = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
DATATYPES = _FLOATS | _INTS | {"BOOL", "BYTES"}
ACCEPTED = {"text": frozenset({"BYTES"}), "number": _FLOATS | _INTS, "category": _FLOATS | _INTS | {"BYTES"}}
DECLARED = {"text": "BYTES", "number": "FP64", "category": "BYTES"}


def _package_version() -> str:
    try:
        return version("tessera-serving")
    except PackageNotFoundError:  # pragma: no cover - only without package metadata
        return "0"


class Refused(Exception):
    """A request refused by the HTTP layer itself (no domain error): its status and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


# ---------------------------------------------------------------------- responses


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")).encode(), status, headers,
                    media_type="application/json")


def _is_kserve(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error in the form of the protocol ``path`` belongs to: KServe's ``{"error": message}`` under /v2,
    else ``{"error": {"code", "message"}}``."""
    body: Any = {"error": message} if _is_kserve(path) else {"error": {"code": code, "message": message}}
    return _json(body, status, headers)


def _failure(path: str, e: Exception) -> Response:
    if isinstance(e, Refused):
        return error_response(path, e.status, e.code, str(e))
    if isinstance(e, TesseraError):
        return error_response(path, STATUS.get(e.code, 500), e.code, str(e))
    log.exception("HTTP %s", path)
    return error_response(path, 500, "INTERNAL", f"{type(e).__name__}: {e}")


def _endpoint(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """``fn`` with its errors answered as responses of its protocol."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except Exception as e:
            return _failure(request.url.path, e)

    endpoint.__name__ = fn.__name__
    return endpoint


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 as soon as it passes ``limit`` bytes (a chunked body has no
    length to check beforehand)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, "RESOURCE_EXHAUSTED", f"request body of more than {limit} bytes; at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body or b"{}")
    except (ValueError, RecursionError) as e:
        raise InvalidArgumentError(f"body is not JSON: {e}") from None


# ---------------------------------------------------------------------- KServe v2 tensors


def _classes_datatype(classes: list[Any]) -> str:
    if all(isinstance(c, bool) for c in classes):
        return "BOOL"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "INT64"
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in classes):
        return "FP64"
    return "BYTES"


def classes_of(reg: Registered) -> list[Any] | None:
    """A classifier's classes (None: a regressor)."""
    graph = reg.plan.graph
    classes = graph.node(graph.output).attrs.get("classes")
    return list(classes) if classes else None


def signature(reg: Registered) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A pipeline's KServe inputs and outputs: ``{"name", "datatype", "shape"}`` each (-1: any size)."""
    inputs = [{"name": f.name, "datatype": DECLARED[f.kind], "shape": [-1]} for f in reg.plan.graph.inputs]
    classes = classes_of(reg)
    if classes is None:
        return inputs, [{"name": "value", "datatype": "FP64", "shape": [-1]}]
    return inputs, [{"name": "label", "datatype": _classes_datatype(classes), "shape": [-1]},
                    {"name": "scores", "datatype": "FP64", "shape": [-1, -1]}]


def model_metadata(name: str, reg: Registered) -> dict[str, Any]:
    inputs, outputs = signature(reg)
    return {"name": name, "versions": [str(reg.version)], "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


def _flatten(data: Any, where: str) -> list[Any]:
    """A tensor's ``data``: flat, or nested lists in row-major order."""
    if not isinstance(data, list):
        raise InvalidArgumentError(f"{where}: 'data' must be a list")
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                if len(stack) > 32:
                    raise InvalidArgumentError(f"{where}: 'data' is nested too deep")
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _check_values(values: list[Any], datatype: str, where: str) -> None:
    if datatype == "BYTES":
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        what = "a string"
    elif datatype in _INTS:
        bad = next((i for i, v in enumerate(values) if not isinstance(v, int) or isinstance(v, bool)
                    or (datatype.startswith("U") and v < 0)), None)
        what = "a non-negative integer" if datatype.startswith("U") else "an integer"
    else:
        bad = next((i for i, v in enumerate(values) if not isinstance(v, (int, float)) or isinstance(v, bool)), None)
        what = "a number"
    if bad is not None:
        raise InvalidArgumentError(f"{where}: element {bad} is {json.dumps(values[bad])[:40]}, not {what} as "
                                   f"{datatype} requires")


def records_from_inputs(reg: Registered, inputs: Any) -> list[dict[str, Any]]:
    """KServe request ``inputs`` as the pipeline's records, every tensor checked against its field."""
    fields = {f.name: f for f in reg.plan.graph.inputs}
    expected = ", ".join(f"{f.name} ({DECLARED[f.kind]})" for f in reg.plan.graph.inputs)
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgumentError(f"'inputs' must be a non-empty list of tensors; this model takes {expected}")
    columns: dict[str, list[Any]] = {}
    batch: int | None = None
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise InvalidArgumentError(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = t.get("name")
        if not isinstance(name, str):
            raise InvalidArgumentError(f"inputs[{i}]: 'name' must be a string")
        where = f"input {name!r}"
        f = fields.get(name)
        if f is None:
            raise InvalidArgumentError(f"{where}: no such input; this model takes {expected}")
        if name in columns:
            raise InvalidArgumentError(f"{where} is given twice")
        datatype = t.get("datatype")
        if datatype not in DATATYPES:
            raise InvalidArgumentError(f"{where}: datatype {datatype!r} is not a KServe datatype "
                                       f"({', '.join(sorted(DATATYPES))})")
        if datatype not in ACCEPTED[f.kind]:
            raise InvalidArgumentError(f"{where}: datatype {datatype} does not fit a {f.kind} field; "
                                       f"send {DECLARED[f.kind]}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise InvalidArgumentError(f"{where}: 'shape' must be a list of non-negative integers")
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1) or shape[0] == 0:
            raise InvalidArgumentError(f"{where}: shape {shape}; a field is one value a record: [batch] or "
                                       "[batch, 1] with batch >= 1")
        values = _flatten(t.get("data"), where)
        if len(values) != math.prod(shape):
            raise InvalidArgumentError(f"{where}: {len(values)} elements in 'data' for shape {shape}")
        _check_values(values, datatype, where)
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise InvalidArgumentError(f"{where}: batch of {shape[0]}, but another input has {batch}")
        columns[name] = values
    missing = [n for n in fields if n not in columns]
    if missing:
        raise InvalidArgumentError(f"missing input(s) {', '.join(map(repr, missing))}; this model takes {expected}")
    assert batch is not None
    return [{n: columns[n][j] for n in fields} for j in range(batch)]


def _label(x: Any, datatype: str) -> Any:
    if datatype == "BYTES":
        return x if isinstance(x, str) else json.dumps(x)
    return x


def outputs_of(reg: Registered, preds: list[Prediction], wanted: list[str] | None) -> list[dict[str, Any]]:
    """Predictions as KServe output tensors (``wanted``: their names, in order; None: all)."""
    _, declared = signature(reg)
    n = len(preds)
    out: dict[str, dict[str, Any]] = {}
    for d in declared:
        name, datatype = d["name"], d["datatype"]
        if wanted is not None and name not in wanted:
            continue
        if name == "value":
            out[name] = {"name": name, "datatype": datatype, "shape": [n], "data": [p.value for p in preds]}
        elif name == "label":
            out[name] = {"name": name, "datatype": datatype, "shape": [n],
                         "data": [_label(p.label, datatype) for p in preds]}
        else:
            k = len(preds[0].scores) if preds else 0
            out[name] = {"name": name, "datatype": datatype, "shape": [n, k],
                         "data": [s for p in preds for s in p.scores]}
    return [out[w] for w in (wanted if wanted is not None else list(out))]


def requested_outputs(reg: Registered, outputs: Any) -> list[str] | None:
    if outputs is None:
        return None
    _, declared = signature(reg)
    names = [d["name"] for d in declared]
    if not isinstance(outputs, list):
        raise InvalidArgumentError("'outputs' must be a list of {\"name\": ...}")
    wanted: list[str] = []
    for i, o in enumerate(outputs):
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str):
            raise InvalidArgumentError(f"outputs[{i}]: 'name' must be a string")
        if name not in names:
            raise InvalidArgumentError(f"outputs[{i}]: no output {name!r}; this model gives {', '.join(names)}")
        params = o.get("parameters")
        if isinstance(params, dict) and params.get("binary_data"):
            raise InvalidArgumentError(f"output {name!r}: binary data is not supported; ask for JSON")
        if name not in wanted:
            wanted.append(name)
    return wanted


# ---------------------------------------------------------------------- OpenAPI


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route :class:`HttpFrontEnd` serves."""
    err_v1 = {"$ref": "#/components/schemas/Error"}
    err_v2 = {"$ref": "#/components/schemas/InferenceError"}

    def resp(description: str, schema: dict[str, Any] | None = None, ctype: str = "application/json") -> dict[str, Any]:
        r: dict[str, Any] = {"description": description}
        if schema is not None:
            r["content"] = {ctype: {"schema": schema}}
        return r

    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "the pipeline's name"}
    ver = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "the pipeline's version (the time it was registered, in ms)"}
    open_: dict[str, Any] = {"security": []}
    v2_errors = {"400": resp("malformed request", err_v2), "401": resp("no or another bearer token", err_v2),
                 "404": resp("no such model (or version)", err_v2), "413": resp("body too large", err_v2)}
    metadata = {"summary": "A pipeline's metadata: its inputs and outputs as KServe tensors",
                "responses": {"200": resp("model metadata", {"$ref": "#/components/schemas/ModelMetadata"}),
                              **v2_errors}}
    ready = {"summary": "Whether a pipeline is ready (loaded in this replica)",
             "responses": {"200": resp("ready", {"type": "object", "properties": {
                 "name": {"type": "string"}, "ready": {"type": "boolean"}}}), **v2_errors}}
    infer = {"summary": "Predict with a pipeline (KServe v2 inference request)",
             "requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/InferenceRequest"}}}},
             "responses": {"200": resp("predictions", {"$ref": "#/components/schemas/InferenceResponse"}),
                           **v2_errors}}
    tensor_meta: dict[str, Any] = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string", "enum": sorted(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer"}}}}
    tensor = {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
        **tensor_meta["properties"], "parameters": {"type": "object"}, "data": {"type": "array"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tessera serving", "version": _package_version(),
                 "description": "A serving replica's HTTP front end: Tessera's JSON routes and the KServe v2 "
                                "inference protocol (JSON tensors)."},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", **open_,
                                 "responses": {"200": resp("alive", {"type": "string"}, "text/plain")}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": resp("OpenAPI 3.1")}}},
            "/v1/pipelines": {"get": {
                "summary": "The registered pipelines' names",
                "responses": {"200": resp("names", {"type": "object", "properties": {
                    "pipelines": {"type": "array", "items": {"type": "string"}}}}),
                    "401": resp("no or another bearer token", err_v1)}}},
            "/v1/pipelines/{name}:predict": {"post": {
                "summary": "Predict records with a pipeline", "parameters": [name],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["records"], "properties": {"records": {
                        "type": "array", "description": "each an object of the pipeline's fields, a list of "
                        "their values in order, or the value of a one-field pipeline"}}}}}},
                "responses": {"200": resp("one prediction a record", {"type": "object", "properties": {
                    "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}}}),
                    "400": resp("malformed request", err_v1), "401": resp("no or another bearer token", err_v1),
                    "404": resp("no such pipeline", err_v1),
                    "413": resp("body, records or text too large", err_v1)}}},
            "/v2": {"get": {"summary": "Server metadata", "responses": {"200": resp("server metadata", {
                "type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                 "extensions": {"type": "array", "items": {"type": "string"}}}})}}},
            "/v2/health/live": {"get": {"summary": "Liveness", **open_, "responses": {
                "200": resp("alive", {"type": "object", "properties": {"live": {"type": "boolean"}}})}}},
            "/v2/health/ready": {"get": {"summary": "Readiness", **open_, "responses": {
                "200": resp("ready", {"type": "object", "properties": {"ready": {"type": "boolean"}}}),
                "503": resp("not ready", {"type": "object", "properties": {"ready": {"type": "boolean"}}})}}},
            "/v2/models/{name}": {"get": {**metadata, "parameters": [name]}},
            "/v2/models/{name}/versions/{version}": {"get": {**metadata, "parameters": [name, ver]}},
            "/v2/models/{name}/ready": {"get": {**ready, "parameters": [name]}},
            "/v2/models/{name}/versions/{version}/ready": {"get": {**ready, "parameters": [name, ver]}},
            "/v2/models/{name}/infer": {"post": {**infer, "parameters": [name]}},
            "/v2/models/{name}/versions/{version}/infer": {"post": {**infer, "parameters": [name, ver]}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "required when the cluster runs with a token"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}}}}},
                "InferenceError": {"type": "object", "properties": {"error": {"type": "string"}}},
                "Prediction": {"type": "object", "properties": {
                    "label": {}, "class_index": {"type": "integer"}, "value": {"type": "number"},
                    "scores": {"type": "array", "items": {"type": "number"}}}},
                "ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs", "outputs"],
                                  "properties": {"name": {"type": "string"},
                                                 "versions": {"type": "array", "items": {"type": "string"}},
                                                 "platform": {"type": "string"},
                                                 "inputs": {"type": "array", "items": tensor_meta},
                                                 "outputs": {"type": "array", "items": tensor_meta}}},
                "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"}, "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": tensor},
                    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                        "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
                "InferenceResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
                    "model_name": {"type": "string"}, "model_version": {"type": "string"},
                    "id": {"type": "string"}, "outputs": {"type": "array", "items": tensor}}},
            },
        },
    }


# ---------------------------------------------------------------------- the front end


class _AsgiHeaders(Getter[list[tuple[bytes, bytes]]]):
    """Reads trace context from ASGI headers (lowercased names, bytes)."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        k = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for n, v in carrier if n == k]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [n.decode("latin-1") for n, _ in carrier]


_HEADERS = _AsgiHeaders()


class HttpFrontEnd:
    """The routes of the module doc over a replica's ``predict``, ``names`` and ``model`` (a pipeline's
    registration, loaded into the replica if need be)."""

    def __init__(self, predict: Predict, names: Names, model: Model, *, token: str = "", max_body: int = MAX_BODY,
                 ready: Ready = lambda: True) -> None:
        """``token``: the bearer token every request but :data:`OPEN_PATHS` must carry; empty: none.
        ``ready``: whether the replica takes requests (``/v2/health/ready``)."""
        self.predict = predict
        self.names = names
        self.model = model
        self.ready = ready
        self.max_body = max_body
        self._token = token
        self._openapi = json.dumps(openapi(), separators=(",", ":")).encode()
        routes = [
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/openapi.json", self._openapi_json, methods=["GET"]),
            Route("/v1/pipelines", _endpoint(self._list), methods=["GET"]),
            Route("/v1/pipelines/{name}:predict", _endpoint(self._predict), methods=["POST"]),
            Route("/v2", self._server_metadata, methods=["GET"]),
            Route("/v2/health/live", self._live, methods=["GET"]),
            Route("/v2/health/ready", self._ready, methods=["GET"]),
            Route("/v2/models/{name}", _endpoint(self._metadata), methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}", _endpoint(self._metadata), methods=["GET"]),
            Route("/v2/models/{name}/ready", _endpoint(self._model_ready), methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}/ready", _endpoint(self._model_ready), methods=["GET"]),
            Route("/v2/models/{name}/infer", _endpoint(self._infer), methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", _endpoint(self._infer), methods=["POST"]),
        ]
        self.routes = routes
        self._app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception})
        self._server: WebServer | None = None
        self.port = 0

    # ------------------------------------------------------------------ serving
    async def start(self, host: str, port: int) -> int:
        self._server = WebServer(self)
        self.port = await self._server.start(host, port, what="serving", setting="TESSERA_SERVING_HTTP_PORT")
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application: one server span per request (child of its ``traceparent``), the token checked
        and an announced oversized body refused before routing."""
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        ctx = propagate.extract(scope["headers"], getter=_HEADERS)
        with _tracer.start_as_current_span(method, context=ctx, kind=SpanKind.SERVER, attributes={
                "http.request.method": method, "url.path": path, "url.scheme": scope.get("scheme", "http"),
                "network.protocol.version": scope.get("http_version", "1.1")}) as span:
            status = 0

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_status)
            else:
                await self._app(scope, receive, send_status)
            if span.is_recording():
                route = self._route_of(scope)
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))

    def _refusal(self, scope: Scope) -> Response | None:
        """The response that ends the request before routing (no or another token; a body announced larger
        than the limit), or None: a caller without the token learns nothing, not even which paths exist."""
        path = scope["path"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if self._token and path not in OPEN_PATHS:
            why = auth.check(headers, self._token, carrier="header")
            if why is not None:
                return error_response(path, 401, "UNAUTHENTICATED", why, {"WWW-Authenticate": CHALLENGE})
        length = next((v for k, v in headers if k == "content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return error_response(path, 413, "RESOURCE_EXHAUSTED",
                                  f"request body of {length} bytes; at most {self.max_body}")
        return None

    def _route_of(self, scope: Scope) -> str:
        for r in self.routes:
            if r.matches(scope)[0] is not Match.NONE:
                return r.path
        return ""

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        """404 and 405 of the router, in the form of the path's protocol."""
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 405:
            return error_response(path, 405, "INVALID_ARGUMENT", f"{request.method} is not allowed on {path}",
                                  dict(exc.headers or {}))
        return error_response(path, exc.status_code, "NOT_FOUND", f"no route {request.method} {path}")

    # ------------------------------------------------------------------ Tessera's routes
    async def _healthz(self, request: Request) -> Response:
        return Response(b"ok", media_type="text/plain")

    async def _openapi_json(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    async def _list(self, request: Request) -> Response:
        return _json({"pipelines": await self.names()})

    async def _predict(self, request: Request) -> Response:
        name = request.path_params["name"]
        req = await read_json(request, self.max_body)
        recs = req.get("records") if isinstance(req, dict) else None
        if not isinstance(recs, list):
            raise InvalidArgumentError('body must be {"records": [...]}')
        preds = await self._run(name, recs)
        return _json({"predictions": [vars(p) for p in preds]})  # its fields (asdict's deep copy costs 10 us each)

    async def _run(self, name: str, records: list[Any]) -> list[Prediction]:
        with _tracer.start_as_current_span("serving predict", attributes={
                "tessera.pipeline": name, "tessera.serving.records": len(records)}):
            return await self.predict(name, records)

    # ------------------------------------------------------------------ KServe v2
    async def _server_metadata(self, request: Request) -> Response:
        return _json({"name": "tessera-serving", "version": _package_version(), "extensions": []})

    async def _live(self, request: Request) -> Response:
        return _json({"live": True})

    async def _ready(self, request: Request) -> Response:
        ok = self.ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def _registration(self, request: Request) -> Registered:
        name = request.path_params["name"]
        reg = await self.model(name)
        wanted = request.path_params.get("version")
        if wanted is not None and wanted != str(reg.version):
            raise Refused(404, "NOT_FOUND", f"model {name!r} has no version {wanted!r} (it has {reg.version})")
        return reg

    async def _metadata(self, request: Request) -> Response:
        reg = await self._registration(request)
        return _json(model_metadata(request.path_params["name"], reg))

    async def _model_ready(self, request: Request) -> Response:
        await self._registration(request)
        return _json({"name": request.path_params["name"], "ready": True})

    async def _infer(self, request: Request) -> Response:
        if "inference-header-content-length" in request.headers:
            raise InvalidArgumentError("the binary tensor extension is not supported: send the tensors as JSON")
        body = await read_json(request, self.max_body)
        if not isinstance(body, dict):
            raise InvalidArgumentError('body must be an object: {"inputs": [...]}')
        reg = await self._registration(request)
        name = request.path_params["name"]
        records = records_from_inputs(reg, body.get("inputs"))
        wanted = requested_outputs(reg, body.get("outputs"))
        rid = body.get("id")
        if rid is not None and not isinstance(rid, str):
            raise InvalidArgumentError("'id' must be a string")
        preds = await self._run(name, records)
        out: dict[str, Any] = {"model_name": name, "model_version": str(reg.version)}
        if rid is not None:
            out["id"] = rid
        out["outputs"] = outputs_of(reg, preds, wanted)
        return _json(out)
