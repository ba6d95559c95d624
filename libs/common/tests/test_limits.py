"""Limits: message sizes, and deadlines passed on from a handler to the calls it makes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from tessera.common import rpc
from tessera.common.config import Settings

pytestmark = pytest.mark.usefixtures("clean_env")

SERVICE = "test.v1.Limits"

#: How far a deadline may grow on its way through one gRPC hop: the ``grpc-timeout`` header is sent
#: rounded up (gRPC core encodes 1 s to 10 s in units of 10 ms), so a server can see a little more time
#: than its caller had left. The chain below has two hops; a handler that passed on nothing would show
#: the 30 s default instead, far outside this.
WIRE_ROUNDING_S = 0.010


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"echo:" + request


def _echo_call(ch: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return ch.unary_unary(f"/{SERVICE}/Echo")


async def _serve(handlers: dict[str, grpc.RpcMethodHandler], **kw: int) -> tuple[grpc.aio.Server, str]:
    server = rpc.create_server(**kw)  # type: ignore[arg-type]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_oversized_request_is_resource_exhausted() -> None:
    server, address = await _serve({"Echo": grpc.unary_unary_rpc_method_handler(_echo)}, max_message_bytes=64 * 1024)
    try:
        async with rpc.aio_channel(address) as ch:
            assert await _echo_call(ch)(b"x" * 1000) == b"echo:" + b"x" * 1000
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await _echo_call(ch)(b"x" * (65 * 1024))
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await _echo_call(ch)(b"still serving") == b"echo:still serving"
        async with rpc.aio_channel(address, max_message_bytes=8 * 1024) as small:
            with pytest.raises(grpc.aio.AioRpcError) as ei:  # the reply is over the client's own limit
                await _echo_call(small)(b"y" * (10 * 1024))
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)


def test_max_message_bytes_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().grpc_max_message_bytes == rpc.MAX_MESSAGE_BYTES
    monkeypatch.setenv("TESSERA_GRPC_MAX_MESSAGE_BYTES", "2048")
    assert dict(rpc._options(None, ()))["grpc.max_receive_message_length"] == 2048


@pytest.fixture
async def chain() -> AsyncIterator[str]:
    """Two servers: Front's handler calls Back (through a channel helper with a 30 s default deadline),
    which answers the time it was given."""

    async def back(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return repr(context.time_remaining()).encode()

    back_server, back_address = await _serve({"Back": grpc.unary_unary_rpc_method_handler(back)})
    downstream = rpc.aio_channel(back_address, default_timeout=30.0)

    async def front(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return bytes(await downstream.unary_unary(f"/{SERVICE}/Back")(b""))

    front_server, front_address = await _serve({"Front": grpc.unary_unary_rpc_method_handler(front)})
    try:
        yield front_address
    finally:
        await downstream.close()
        await front_server.stop(0)
        await back_server.stop(0)


async def test_a_handler_passes_its_remaining_deadline_on(chain: str) -> None:
    async with grpc.aio.insecure_channel(chain) as ch:
        given = float(await ch.unary_unary(f"/{SERVICE}/Front")(b"", timeout=2.0))
        assert 0 < given <= 2.0 + 2 * WIRE_ROUNDING_S, given
        unbounded = float(await ch.unary_unary(f"/{SERVICE}/Front")(b""))  # the caller set no deadline
        assert 20 < unbounded <= 31.0, unbounded
    assert rpc.inherited_deadline() is None  # outside any handler


class _Ctx:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_downstream_timeout_is_cut_to_the_remaining_deadline() -> None:
    assert rpc.downstream_timeout(_Ctx(None), 10.0) == 10.0  # type: ignore[arg-type]
    assert rpc.downstream_timeout(_Ctx(2.5), 10.0) == 2.5  # type: ignore[arg-type]
    assert rpc.downstream_timeout(_Ctx(30.0), 10.0) == 10.0  # type: ignore[arg-type]
    assert rpc.downstream_timeout(_Ctx(-1.0), 10.0) == 0.01  # type: ignore[arg-type]

