"""gRPC plumbing shared by every service and client.

Server side: :func:`create_server` builds a ``grpc.aio`` server with OpenTelemetry
(health and reflection excluded from traces) and one mapping from
:mod:`tessera.common.errors` to status codes, so a bad request is never UNKNOWN.

Client side: :func:`aio_channel` / :func:`channel` give channels whose calls always
carry a deadline (the default when the caller sets none), are traced, and are
retried on UNAVAILABLE only for the idempotent methods named.

Authentication (:mod:`tessera.common.auth`): with a token configured, servers
refuse calls without it (health and reflection stay open) and every channel made
here sends it. Message sizes are bounded on both sides (``grpc_max_message_bytes``):
a bigger message fails with RESOURCE_EXHAUSTED.

Deadlines propagate: while a unary handler runs, the calls it makes through these
channels (directly, in tasks it starts, or in ``asyncio.to_thread``) get no more
time than the handler has left (:func:`inherited_deadline`); :func:`downstream_timeout`
does the same explicitly.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from opentelemetry import propagate
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    client_interceptor,
    filters,
    grpcext,
)

from tessera.common import auth, errors
from tessera.common import metrics as tmetrics
from tessera.common.config import Settings, current_settings

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

#: Largest message either side accepts by default (batched writes can be large); ``grpc_max_message_bytes``.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_CODES: dict[str, grpc.StatusCode] = {c.name: c for c in grpc.StatusCode}


def status_code(exc: errors.TesseraError) -> grpc.StatusCode:
    """The gRPC status of a domain error."""
    return _CODES.get(exc.code, grpc.StatusCode.INTERNAL)


# ---------------------------------------------------------------------- server


def _untraced() -> Any:
    excluded = [filters.service_name(HEALTH_SERVICE), *(filters.service_name(s) for s in REFLECTION_SERVICES)]
    return filters.negate(filters.any_of(*excluded))


#: Status codes of a failed call to another service that mean "not now" rather than "broken".
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE,)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.TesseraError):
        await context.abort(status_code(exc), errors.bounded(str(exc)))
    if isinstance(exc, grpc.RpcError) and exc.code() in _TRANSIENT:  # type: ignore[attr-defined]
        # a service this one calls is down or restarting: the caller may retry, as with this service down
        log.warning("%s: a dependency is unavailable: %s", method, exc.details())  # type: ignore[attr-defined]
        await context.abort(grpc.StatusCode.UNAVAILABLE, errors.bounded(
            f"a dependency of {method} is unavailable: {exc.details()}"))  # type: ignore[attr-defined]
    if isinstance(exc, ConnectionError):  # a dependency reached over a socket of its own (an object store's) is down
        log.warning("%s: a dependency is unreachable: %s", method, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, errors.bounded(
            f"a dependency of {method} is unavailable: {type(exc).__name__}: {exc}"))
    if isinstance(exc, TimeoutError):  # something this handler waited for (an object, a peer) did not come in time
        log.warning("%s: timed out waiting: %s", method, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, errors.bounded(
            f"{method} timed out waiting for a dependency: {type(exc).__name__}: {exc}"))
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, errors.bounded(f"internal error in {method}: {type(exc).__name__}: {exc}"))


class _Deadline:
    """The deadline of the handler running in this context; inactive once it returned."""

    __slots__ = ("at", "active")

    def __init__(self, at: float) -> None:
        self.at = at
        self.active = True


_handler_deadline: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar("tessera_handler_deadline",
                                                                                      default=None)


def inherited_deadline() -> float | None:
    """Seconds left to the unary handler this code runs for, or None (no handler, or one without a deadline)."""
    d = _handler_deadline.get()
    if d is None or not d.active:
        return None
    return d.at - time.monotonic()


def _capped(timeout: float) -> float:
    left = inherited_deadline()
    return timeout if left is None else max(0.001, min(timeout, left))


def _parser(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    """The request parser of a handler: a request that does not parse is the caller's error
    (INVALID_ARGUMENT), where gRPC's own deserialization would answer INTERNAL."""
    if deserializer is None:
        return lambda raw: raw

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, others their own
            raise errors.InvalidArgumentError(f"{method}: the request is not a valid message "
                                              f"({type(e).__name__}: {e})") from None
    return parse


async def _mapped(start: Callable[[], AsyncIterator[Any]], context: grpc.aio.ServicerContext,
                  method: str) -> AsyncIterator[Any]:
    """The responses of a server-streaming handler, its errors turned into statuses."""
    try:
        async for item in start():
            yield item
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except Exception as e:
        await _abort_for(e, context, method)


class _ErrorMapping(grpc.aio.ServerInterceptor):
    """Turns domain errors into their status codes and anything else into INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        parse = _parser(handler.request_deserializer, method)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def uu(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                remaining = context.time_remaining()
                deadline = _Deadline(time.monotonic() + remaining) if remaining is not None else None
                token = _handler_deadline.set(deadline)
                try:
                    return await inner_uu(parse(raw), context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as e:
                    await _abort_for(e, context, method)
                finally:
                    if deadline is not None:
                        deadline.active = False  # tasks it started and that outlive it are not bound by it
                    _handler_deadline.reset(token)

            return grpc.unary_unary_rpc_method_handler(uu, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def us(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in _mapped(lambda: inner_us(parse(raw), context), context, method):
                    yield item

            return grpc.unary_stream_rpc_method_handler(us, response_serializer=handler.response_serializer)
        async def parsed(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in requests:
                yield parse(raw)

        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def su(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_su(parsed(requests), context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as e:
                    await _abort_for(e, context, method)

            return grpc.stream_unary_rpc_method_handler(su, response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def ss(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in _mapped(lambda: inner_ss(parsed(requests), context), context, method):
                    yield item

            return grpc.stream_stream_rpc_method_handler(ss, response_serializer=handler.response_serializer)
        return handler


#: The handler constructor for each (request streaming, response streaming) kind of method.
HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def same_kind(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind, with its (de)serializers, that runs ``behaviour`` instead (for
    server interceptors that wrap or replace a method)."""
    make = HANDLER_FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def add_servicer(servicer: Any, server: grpc.aio.Server, service: Any, *, raw_responses: Iterable[str] = (),
                 raw_requests: Iterable[str] = ()) -> None:
    """Register ``servicer`` for ``service`` (a protobuf ServiceDescriptor), built from the descriptor.

    Does what the generated ``add_XServicer_to_server`` does, except that the
    methods named in ``raw_responses`` return already-encoded bytes, and those named
    in ``raw_requests`` receive their requests as bytes (for messages that carry bulk
    data and are encoded or decoded without an intermediate protobuf copy).
    """
    from google.protobuf import message_factory

    raw, raw_in = set(raw_responses), set(raw_requests)
    handlers = {}
    for m in service.methods:
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        serializer = (lambda b: b) if m.name in raw else resp.SerializeToString
        handlers[m.name] = HANDLER_FACTORIES[(m.client_streaming, m.server_streaming)](
            getattr(servicer, m.name), request_deserializer=None if m.name in raw_in else req.FromString,
            response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def server_credentials(settings: Settings | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials of this process's server (``tls_cert_file`` + ``tls_key_file``), or None (plain TCP)."""
    s = settings or current_settings()
    if s.tls_cert_file is None and s.tls_key_file is None:
        return None
    if s.tls_cert_file is None or s.tls_key_file is None:
        raise errors.FailedPreconditionError("TLS needs both tls_cert_file and tls_key_file")
    try:
        pair = (s.tls_key_file.read_bytes(), s.tls_cert_file.read_bytes())
    except OSError as e:
        raise errors.FailedPreconditionError(f"cannot read the TLS certificate or key: {e}") from None
    return grpc.ssl_server_credentials([pair])


def add_port(server: grpc.aio.Server, address: str, settings: Settings | None = None) -> int:
    """Listen on ``address`` (``host:port``), with TLS when it is configured; returns the port."""
    creds = server_credentials(settings)
    return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)


def _tls(options: list[tuple[str, Any]]) -> grpc.ChannelCredentials | None:
    """Client TLS credentials when ``tls_ca_file`` is set (adding the server-name override to ``options``)."""
    s = current_settings()
    if s.tls_ca_file is None:
        return None
    try:
        roots = s.tls_ca_file.read_bytes()
    except OSError as e:
        raise errors.FailedPreconditionError(f"cannot read tls_ca_file {s.tls_ca_file}: {e.strerror or e}") from None
    if s.tls_server_name:
        options.append(("grpc.ssl_target_name_override", s.tls_server_name))
    return grpc.ssl_channel_credentials(root_certificates=roots)


# ---------------------------------------------------------------------- gateway
#
# A process outside the cluster's network (the host of a compose stack) cannot resolve or reach the
# addresses replicas advertise (container hostnames). It reaches them through a gateway (tessera.gateway):
# every channel made here then connects to the gateway, and each call names the replica it is meant for
# in ROUTE_HEADER. Which gateway: use_gateway() (the SDK calls it when the address it was given answers
# as one), else the ``gateway`` setting (TESSERA_GATEWAY).

#: The metadata key naming the replica (``host:port``, as registered) a call through a gateway is for.
ROUTE_HEADER = "tessera-route"
#: The name under which a gateway reports SERVING through grpc.health.v1 (how clients recognise one).
GATEWAY_HEALTH_SERVICE = "tessera.gateway.v1.Gateway"

_gateway: str | None = None


def use_gateway(address: str | None) -> None:
    """Route every channel made from now on through the gateway at ``address`` (None: connect directly)."""
    global _gateway
    _gateway = address or None


def gateway_address() -> str:
    """The gateway this process routes through, or ""."""
    return _gateway if _gateway is not None else current_settings().gateway


def is_gateway(address: str, *, timeout: float = 3.0) -> bool:
    """Whether ``address`` is a gateway (it answers SERVING for GATEWAY_HEALTH_SERVICE)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _dial(address, []) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=GATEWAY_HEALTH_SERVICE),
                                                        timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def _routed(target: str) -> str:
    """The target to dial for ``target``: the gateway when one is in use (and ``target`` is not it)."""
    gw = gateway_address()
    return gw if gw and target != gw else ""


class _Route(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ROUTE_HEADER to every call of a blocking channel dialed to a gateway."""

    def __init__(self, target: str) -> None:
        self.header = (ROUTE_HEADER, target)

    def _details(self, d: Any) -> Any:
        return _SyncCallDetails(d.method, d.timeout, [*(d.metadata or ()), self.header], d.credentials,
                                getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _aio_route(target: str) -> list[Any]:
    """Interceptors adding ROUTE_HEADER to every call of an asyncio channel dialed to a gateway."""
    header = (ROUTE_HEADER, target)

    def details(d: Any) -> Any:
        md = grpc.aio.Metadata(*(d.metadata or ()))
        md.add(*header)
        return d._replace(metadata=md)

    class U(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, d: Any, request: Any) -> Any:
            return await continuation(details(d), request)

    class US(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, d: Any, request: Any) -> Any:
            return await continuation(details(d), request)

    class SU(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, d: Any, requests: Any) -> Any:
            return await continuation(details(d), requests)

    class SS(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, d: Any, requests: Any) -> Any:
            return await continuation(details(d), requests)

    return [U(), US(), SU(), SS()]


def raw_channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel with TLS when configured, nothing else (no token, deadline or tracing).

    Through the gateway in use, if any (see :func:`use_gateway`).
    """
    via = _routed(target)
    ch = _dial(via or target, options)
    return grpc.intercept_channel(ch, _Route(target)) if via else ch


def _dial(target: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    """A blocking channel straight to ``target``, with TLS when configured."""
    opts = list(options)
    creds = _tls(opts)
    return grpc.secure_channel(target, creds, options=opts) if creds is not None else grpc.insecure_channel(target, opts)


def raw_aio_channel(target: str, options: Sequence[tuple[str, Any]] = (), interceptors: Sequence[Any] | None = None,
                    ) -> grpc.aio.Channel:
    """An asyncio channel with TLS when configured and the ``interceptors`` given, nothing else.

    Through the gateway in use, if any (see :func:`use_gateway`).
    """
    opts = list(options)
    creds = _tls(opts)
    via = _routed(target)
    if via:
        interceptors = [*(interceptors or ()), *_aio_route(target)]
        target = via
    if creds is not None:
        return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


class ServerCallMetrics(grpc.aio.ServerInterceptor):
    """Records ``rpc.server.call.duration`` (seconds) per method and status code of every call it sees.

    Outermost of the server's interceptors, so a call refused for its token or its input counts too. The
    instrument is looked up at each call's handler, not made once, so a server built before
    :func:`tessera.common.metrics.setup_metrics` records into the provider installed later.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        hist = tmetrics.rpc_duration
        if handler is None or hist is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        def record(start: float, context: grpc.aio.ServicerContext, failed: bool) -> None:
            code = _code_of(context, failed)
            hist.record(time.perf_counter() - start, {**attrs, "rpc.grpc.status_code": code})

        if not handler.response_streaming:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start, failed = time.perf_counter(), True
                try:
                    out = await inner(request, context)
                    failed = False
                    return out
                finally:
                    record(start, context, failed)

            return same_kind(handler, unary)
        inner_s = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, failed = time.perf_counter(), True
            try:
                out = inner_s(request, context)
                if hasattr(out, "__aiter__"):
                    async for item in out:
                        yield item
                else:  # a handler that writes with context.write (or aborts) is a plain coroutine
                    await out
                failed = False
            finally:
                record(start, context, failed)

        return same_kind(handler, streaming)


def _code_of(context: grpc.aio.ServicerContext, failed: bool) -> int:
    """The numeric status code the call ended with (``rpc.grpc.status_code``)."""
    try:
        code = context.code()
    except Exception:  # an older grpcio without ServicerContext.code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    if isinstance(code, int):
        return code
    return grpc.StatusCode.UNKNOWN.value[0] if failed else 0


def create_server(
    *, traced: bool = True, token: str | None = None, max_message_bytes: int | None = None,
    settings: Settings | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with authentication (when a token is set), tracing and error mapping installed.

    ``token`` and ``max_message_bytes`` default to the settings (``auth_token``/``auth_token_file``,
    ``grpc_max_message_bytes``); an empty token turns authentication off.
    """
    s = settings or current_settings()
    token = auth.server_token(s) if token is None else token
    limit = max_message_bytes or s.grpc_max_message_bytes
    interceptors: list[grpc.aio.ServerInterceptor] = [ServerCallMetrics()]  # outermost: refused calls count too
    if token:
        interceptors.append(auth.ServerAuth(token))
    if traced:
        interceptors.append(aio_server_interceptor(filter_=_untraced()))
    interceptors.append(_ErrorMapping())
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            # accept the clients' keepalive pings (every 30 s, also on idle streams such as
            # sessions and watches) instead of answering them with GOAWAY "too_many_pings"
            # (the server-side name of GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS)
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )


# ---------------------------------------------------------------------- client


def service_config(service: str, idempotent_methods: Iterable[str]) -> str:
    """A service config that retries UNAVAILABLE, for the idempotent methods only."""
    names = [{"service": service, "method": m} for m in idempotent_methods]
    cfg: dict[str, Any] = {"methodConfig": []}
    if names:
        cfg["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(cfg)


def downstream_timeout(context: grpc.aio.ServicerContext, default: float, *, floor: float = 0.01) -> float:
    """The deadline for a call a handler makes: ``default``, cut to what remains of the handler's own.

    A caller that gave up is not kept waiting on work done for it downstream. Never
    below ``floor`` (the downstream call then fails at once with DEADLINE_EXCEEDED).
    """
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(floor, min(default, remaining))


def _client_token(token: str | None) -> str:
    return auth.client_token() if token is None else token


def _max_bytes(max_message_bytes: int | None) -> int:
    return max_message_bytes or current_settings().grpc_max_message_bytes


def _options(service: str | None, idempotent: Iterable[str], max_message_bytes: int | None = None) -> list[tuple[str, Any]]:
    limit = _max_bytes(max_message_bytes)
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        # A peer that is not up yet (services start together) or restarting is tried again after 0.1 s, then
        # less and less often, at least every 2 s: gRPC's defaults (1 s, then up to 120 s) left a service
        # waiting a second or more after the control store came up. (Not grpc.min_reconnect_backoff_ms: it
        # is also the time a connection attempt gets, 20 s by default, and a busy peer needs it.)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if service:
        opts.append(("grpc.service_config", service_config(service, idempotent)))
    return opts


class _AioDefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        timeout = _capped(self.timeout if details.timeout is None else details.timeout)
        if timeout != details.timeout:
            details = details._replace(timeout=timeout)
        return await continuation(details, request)


class _DefaultDeadline(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        timeout = _capped(self.timeout if details.timeout is None else details.timeout)
        if timeout != details.timeout:
            details = _SyncCallDetails(details.method, timeout, details.metadata, details.credentials,
                                       getattr(details, "wait_for_ready", None), getattr(details, "compression", None))
        return continuation(details, request)


class _SyncCallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float, metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def aio_channel(
    target: str,
    *,
    service: str | None = None,
    idempotent_methods: Sequence[str] = (),
    default_timeout: float = 10.0,
    token: str | None = None,
    max_message_bytes: int | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel: default deadline, tracing, retries for ``idempotent_methods`` of ``service``.

    Calls carry ``token`` (default: :func:`tessera.common.auth.client_token`; empty: none).
    """
    key = _client_token(token)
    interceptors: list[Any] = [*aio_client_interceptors(), _AioDefaultDeadline(default_timeout)]
    if key:
        interceptors = [*auth.aio_client_auth(key), *interceptors]
    return raw_aio_channel(target, _options(service, idempotent_methods, max_message_bytes), interceptors)


def trace_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata, for calls made on :func:`stream_channel`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def stream_channel(target: str, *, token: str | None = None, max_message_bytes: int | None = None) -> grpc.Channel:
    """A blocking channel for long-lived streams that the caller cancels (no default deadline).

    The OpenTelemetry client interceptor hides a stream's ``cancel()``, so streams
    carry trace context through :func:`trace_metadata` instead. Calls carry the token
    as :func:`aio_channel`'s do (that interceptor keeps ``cancel()``).
    """
    ch = raw_channel(target, _options(None, (), max_message_bytes))
    key = _client_token(token)
    return grpc.intercept_channel(ch, auth.ClientAuth(key)) if key else ch


def authorized(ch: grpc.Channel, *, token: str | None = None) -> grpc.Channel:
    """``ch`` (a blocking channel made by hand, e.g. with its own load-balancing options) sending the
    token on every call, as the helpers here do; ``ch`` itself when no token is configured."""
    key = _client_token(token)
    return grpc.intercept_channel(ch, auth.ClientAuth(key)) if key else ch


def channel(
    target: str,
    *,
    service: str | None = None,
    idempotent_methods: Sequence[str] = (),
    default_timeout: float = 10.0,
    token: str | None = None,
    max_message_bytes: int | None = None,
) -> grpc.Channel:
    """A blocking channel with the same guarantees as :func:`aio_channel`."""
    ch = raw_channel(target, _options(service, idempotent_methods, max_message_bytes))
    traced = grpcext.intercept_channel(ch, client_interceptor())
    key = _client_token(token)
    if key:
        return grpc.intercept_channel(traced, _DefaultDeadline(default_timeout), auth.ClientAuth(key))
    return grpc.intercept_channel(traced, _DefaultDeadline(default_timeout))


# ---------------------------------------------------------------------- health


def health_status(address: str, *, service: str = "", timeout: float = 1.0) -> str:
    """``grpc.health.v1`` status of ``service`` at ``address``: SERVING, NOT_SERVING, ... or UNREACHABLE."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with raw_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else e.code().name  # type: ignore[attr-defined]
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
