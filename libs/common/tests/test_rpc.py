from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from tessera.common import errors, healthcheck, rpc
from tessera.common.procs import free_port

SERVICE = "test.v1.Probe"


def _all_errors() -> list[type[errors.TesseraError]]:
    out: list[type[errors.TesseraError]] = []
    todo: list[type[errors.TesseraError]] = [errors.TesseraError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return sorted(out, key=lambda c: c.__name__)


class Probe:
    """Raw-bytes handlers: each shows one behaviour of the server plumbing."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.blocked = asyncio.Event()

    def _count(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"echo:" + request

    async def raise_domain(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        cls = next(c for c in _all_errors() if c.__name__ == request.decode())
        raise cls(f"{cls.__name__} says no")

    async def long(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.InvalidArgumentError(f"name {'s' * 70_000!r} is too long")

    async def timed_out(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise TimeoutError("object 52e9 not available within 30s")

    async def unreachable(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ConnectionError("no object store answered at 127.0.0.1:1 within 2s")

    async def boom(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("kaput")

    async def key_error(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        table: dict[str, bytes] = {}
        return table["missing"]

    async def downstream(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as ch:  # nobody listens there
            return bytes(await ch.unary_unary(f"/{SERVICE}/Echo")(b"", timeout=5))

    async def explicit_abort(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "go away")
        raise AssertionError("unreachable")

    async def block(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.blocked.set()
        await asyncio.sleep(30)
        return b"late"

    async def flaky(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        n = self._count(request.decode())
        if n < 3:
            raise errors.UnavailableError(f"not yet ({n})")
        return f"ok after {n}".encode()

    async def parsed_stream(self, request: health_pb2.HealthCheckRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield request.service.encode()

    async def parsed_bidi(self, requests: AsyncIterator[health_pb2.HealthCheckRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r.service.encode()

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        if request == b"domain":
            raise errors.NotFoundError("gone mid-stream")
        if request == b"boom":
            raise ZeroDivisionError("mid-stream")
        yield b"second"


def _handler(probe: Probe) -> grpc.GenericRpcHandler:
    uu = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": uu(probe.echo),
        "Raise": uu(probe.raise_domain),
        "Long": uu(probe.long),
        "Boom": uu(probe.boom),
        "TimedOut": uu(probe.timed_out),
        "Unreachable": uu(probe.unreachable),
        "KeyError": uu(probe.key_error),
        "Abort": uu(probe.explicit_abort),
        "Downstream": uu(probe.downstream),
        "Block": uu(probe.block),
        "Flaky": uu(probe.flaky),
        "FlakyWrite": uu(probe.flaky),
        "Stream": grpc.unary_stream_rpc_method_handler(probe.stream),
        "ParsedStream": grpc.unary_stream_rpc_method_handler(
            probe.parsed_stream, request_deserializer=health_pb2.HealthCheckRequest.FromString),
        "ParsedBidi": grpc.stream_stream_rpc_method_handler(
            probe.parsed_bidi, request_deserializer=health_pb2.HealthCheckRequest.FromString),
    })


class Served:
    def __init__(self, address: str, probe: Probe, health: health.aio.HealthServicer) -> None:
        self.address = address
        self.probe = probe
        self.health = health


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    server = rpc.create_server()
    probe = Probe()
    server.add_generic_rpc_handlers((_handler(probe),))
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    await hs.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        yield Served(f"127.0.0.1:{port}", probe, hs)
    finally:
        await server.stop(0)


def _uu(ch: grpc.aio.Channel | grpc.Channel, method: str) -> Any:
    return ch.unary_unary(f"/{SERVICE}/{method}")


# ------------------------------------------------------------------ error mapping


async def test_success_passes_through(served: Served) -> None:
    async with rpc.aio_channel(served.address) as ch:
        assert await _uu(ch, "Echo")(b"hi") == b"echo:hi"


@pytest.mark.parametrize("cls", _all_errors(), ids=lambda c: c.__name__)
async def test_domain_error_becomes_its_status(served: Served, cls: type[errors.TesseraError]) -> None:
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "Raise")(cls.__name__.encode())
    assert e.value.code() == getattr(grpc.StatusCode, cls.code)
    assert e.value.code() != grpc.StatusCode.UNKNOWN
    assert e.value.details() == f"{cls.__name__} says no"


async def test_a_huge_message_keeps_its_status(served: Served) -> None:
    """A message quoting a huge input is cut short: whole, it would overflow gRPC's trailer limit."""
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "Long")(b"")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("name 'sss")
    assert e.value.details().endswith("(70019 characters in all)")
    assert len(e.value.details()) < errors.MAX_DETAILS_CHARS + 40


GARBAGE = b"\xff\xff\xff\xff"  # field 31, wire type 7: no protobuf message parses from it


async def test_a_request_that_does_not_parse_is_invalid_argument(served: Served) -> None:
    """gRPC's own deserialization would answer INTERNAL, as if the server were broken."""
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/grpc.health.v1.Health/Check")(GARBAGE)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("/grpc.health.v1.Health/Check: the request is not a valid message")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in ch.unary_stream(f"/{SERVICE}/ParsedStream")(GARBAGE):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = health_pb2.HealthCheckRequest(service="x").SerializeToString()
        assert [m async for m in ch.unary_stream(f"/{SERVICE}/ParsedStream")(ok)] == [b"x"]
        got: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for m in ch.stream_stream(f"/{SERVICE}/ParsedBidi")(iter([ok, GARBAGE, ok])):
                got.append(m)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert got == [b"x"]  # what came before the bad message was served


def test_status_code_of_each_error() -> None:
    assert rpc.status_code(errors.InvalidArgumentError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.status_code(errors.NoRespondersError("x")) == grpc.StatusCode.UNAVAILABLE
    assert rpc.status_code(errors.DeadlineExceededError("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert rpc.status_code(errors.TesseraError("x")) == grpc.StatusCode.INTERNAL

    class Odd(errors.TesseraError):
        code = "NOT_A_STATUS"

    assert rpc.status_code(Odd("x")) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(("method", "text"), [("Boom", "RuntimeError: kaput"), ("KeyError", "KeyError: 'missing'")])
async def test_unexpected_error_becomes_internal(served: Served, method: str, text: str) -> None:
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, method)(b"")
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details() == f"internal error in /{SERVICE}/{method}: {text}"


async def test_a_dependency_unavailable_is_unavailable_not_internal(served: Served) -> None:
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "Downstream")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details().startswith(f"a dependency of /{SERVICE}/Downstream is unavailable: ")


async def test_a_timeout_waiting_for_a_dependency_is_unavailable_not_internal(served: Served) -> None:
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "TimedOut")(b"")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "timed out waiting for a dependency: TimeoutError: object 52e9 not available" in e.value.details()


async def test_a_dependency_that_cannot_be_reached_is_unavailable_not_internal(served: Served) -> None:
    """A dependency reached over a socket of its own (an object store's Unix socket) that is down: retryable."""
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "Unreachable")(b"")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "is unavailable: ConnectionError: no object store answered at 127.0.0.1:1" in e.value.details()


async def test_explicit_abort_is_kept(served: Served) -> None:
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "Abort")(b"")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.details() == "go away"


async def test_unknown_method_is_unimplemented(served: Served) -> None:
    async with rpc.aio_channel(served.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary(f"/{SERVICE}/Nope")(b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(("arg", "code", "details"), [
    (b"domain", grpc.StatusCode.NOT_FOUND, "gone mid-stream"),
    (b"boom", grpc.StatusCode.INTERNAL, f"internal error in /{SERVICE}/Stream: ZeroDivisionError: mid-stream"),
])
async def test_stream_errors_are_mapped(served: Served, arg: bytes, code: grpc.StatusCode, details: str) -> None:
    async with rpc.aio_channel(served.address) as ch:
        call = ch.unary_stream(f"/{SERVICE}/Stream")(arg, timeout=5)
        got: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for item in call:
                got.append(item)
    assert got == [b"first"]
    assert e.value.code() == code and e.value.details() == details


async def test_stream_success(served: Served) -> None:
    async with rpc.aio_channel(served.address) as ch:
        got = [x async for x in ch.unary_stream(f"/{SERVICE}/Stream")(b"ok", timeout=5)]
    assert got == [b"first", b"second"]


async def test_blocking_channel_maps_errors_too(served: Served) -> None:
    def calls() -> None:  # in a thread: the server runs on this test's event loop
        with rpc.channel(served.address) as ch:
            assert _uu(ch, "Echo")(b"x") == b"echo:x"
            with pytest.raises(grpc.RpcError) as e:
                _uu(ch, "Raise")(b"InvalidArgumentError")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]

    await asyncio.to_thread(calls)


# ------------------------------------------------------------------ deadlines and retries


async def test_aio_channel_applies_the_default_deadline(served: Served) -> None:
    async with rpc.aio_channel(served.address, default_timeout=0.3) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "Block")(b"")
        elapsed = time.monotonic() - t0
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 <= elapsed < 3.0
    assert served.probe.blocked.is_set()


async def test_an_explicit_timeout_wins_over_the_default(served: Served) -> None:
    async with rpc.aio_channel(served.address, default_timeout=30) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "Block")(b"", timeout=0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3.0


async def test_blocking_channel_applies_the_default_deadline(served: Served) -> None:
    def call() -> None:
        with rpc.channel(served.address, default_timeout=0.3) as ch:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                _uu(ch, "Block")(b"")
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 3.0

    await asyncio.to_thread(call)
    assert served.probe.blocked.is_set()


async def test_idempotent_methods_are_retried_on_unavailable(served: Served) -> None:
    async with rpc.aio_channel(served.address, service=SERVICE, idempotent_methods=["Flaky"]) as ch:
        assert await _uu(ch, "Flaky")(b"a") == b"ok after 3"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _uu(ch, "FlakyWrite")(b"b")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and e.value.details() == "not yet (1)"
    assert served.probe.calls == {"a": 3, "b": 1}


async def test_blocking_channel_retries_idempotent_methods(served: Served) -> None:
    def call() -> bytes:
        with rpc.channel(served.address, service=SERVICE, idempotent_methods=["Flaky"]) as ch:
            return _uu(ch, "Flaky")(b"c")  # type: ignore[no-any-return]

    assert await asyncio.to_thread(call) == b"ok after 3"


def test_service_config() -> None:
    cfg = json.loads(rpc.service_config("pkg.Svc", ["Get", "List"]))
    (mc,) = cfg["methodConfig"]
    assert mc["name"] == [{"service": "pkg.Svc", "method": "Get"}, {"service": "pkg.Svc", "method": "List"}]
    assert mc["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert json.loads(rpc.service_config("pkg.Svc", [])) == {"methodConfig": []}


# ------------------------------------------------------------------ health


async def test_health_status(served: Served) -> None:
    assert await asyncio.to_thread(rpc.health_status, served.address) == "SERVING"
    assert await asyncio.to_thread(rpc.health_status, served.address, service=SERVICE) == "NOT_SERVING"
    assert await asyncio.to_thread(rpc.health_status, served.address, service="no.such.Service") == "NOT_FOUND"
    await served.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert await asyncio.to_thread(rpc.health_status, served.address, service=SERVICE) == "SERVING"
    assert await asyncio.to_thread(healthcheck.main, [served.address]) == 0
    assert await asyncio.to_thread(healthcheck.main, [served.address, "--service", "no.such.Service"]) == 1


def test_health_status_of_nothing_is_unreachable() -> None:
    addr = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    assert rpc.health_status(addr, timeout=0.5) == "UNREACHABLE"
    assert time.monotonic() - t0 < 3.0
    assert healthcheck.main([addr, "--timeout", "0.3"]) == 1


# ------------------------------------------------------------------ tracing


async def test_server_span_continues_the_client_trace(served: Served, spans) -> None:  # type: ignore[no-untyped-def]
    tracer = trace.get_tracer("test")
    async with rpc.aio_channel(served.address) as ch:
        with tracer.start_as_current_span("caller") as root:
            assert await _uu(ch, "Echo")(b"t") == b"echo:t"
    await asyncio.to_thread(rpc.health_status, served.address)
    done = spans.finished()
    server = [s for s in done if s.kind == SpanKind.SERVER and s.name == f"/{SERVICE}/Echo"]
    client = [s for s in done if s.kind == SpanKind.CLIENT and s.name == f"/{SERVICE}/Echo"]
    assert len(server) == 1 and len(client) == 1, [(s.name, s.kind) for s in done]
    assert server[0].context.trace_id == client[0].context.trace_id == root.get_span_context().trace_id
    assert server[0].parent is not None and server[0].parent.span_id == client[0].context.span_id
    assert not [s for s in done if s.kind == SpanKind.SERVER and "Health" in s.name]  # health checks are not traced


def test_trace_metadata_carries_the_current_span(spans) -> None:  # type: ignore[no-untyped-def]
    assert rpc.trace_metadata() == []
    with trace.get_tracer("test").start_as_current_span("x") as s:
        md = dict(rpc.trace_metadata())
    ctx = s.get_span_context()
    version, trace_id, span_id, flags = md["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1, "sampled"
