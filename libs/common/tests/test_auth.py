"""Token authentication of servers made by ``rpc.create_server`` and of the channel helpers."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from tessera.common import auth, errors, rpc
from tessera.common.config import Settings

SERVICE = "test.v1.Guarded"
TOKEN = secrets.token_urlsafe(32)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in list(os.environ):
        if k.startswith("TESSERA_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("TESSERA_RUN_DIR", str(tmp_path / "run"))


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    logging.getLogger("test.guarded").info("echo called with metadata %s", context.invocation_metadata())
    return b"echo:" + request


async def _count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


async def _sum(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return str(sum([int(r) async for r in requests])).encode()


class Guarded:
    def __init__(self, address: str) -> None:
        self.address = address


@pytest.fixture
async def guarded() -> AsyncIterator[Guarded]:
    server = rpc.create_server(token=TOKEN)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Sum": grpc.stream_unary_rpc_method_handler(_sum),
    }),))
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield Guarded(f"127.0.0.1:{port}")
    finally:
        await server.stop(0)


def _echo_call(ch: Any) -> Any:
    return ch.unary_unary(f"/{SERVICE}/Echo")


async def test_no_metadata_is_unauthenticated(guarded: Guarded) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _echo_call(ch)(b"hi", timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing 'authorization' metadata" in (ei.value.details() or "")
    assert SERVICE in (ei.value.details() or "")


@pytest.mark.parametrize("value, why", [
    (f"Bearer {TOKEN}x", "invalid bearer token"),
    ("Bearer ", "invalid bearer token"),
    (f"Basic {TOKEN}", "must use the Bearer scheme"),
])
async def test_wrong_token_is_unauthenticated(guarded: Guarded, value: str, why: str) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _echo_call(ch)(b"hi", timeout=5, metadata=(("authorization", value),))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert why in (ei.value.details() or "")
    assert TOKEN not in (ei.value.details() or "")


async def test_wrong_token_through_the_helper_is_unauthenticated(guarded: Guarded) -> None:
    async with rpc.aio_channel(guarded.address, token="not-" + TOKEN) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _echo_call(ch)(b"hi")
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_every_call_kind_is_guarded(guarded: Guarded) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            [r async for r in ch.unary_stream(f"/{SERVICE}/Count")(b"3", timeout=5)]
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await ch.stream_unary(f"/{SERVICE}/Sum")(iter([b"1", b"2"]), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_right_token_from_the_settings_through_every_helper(
        guarded: Guarded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_AUTH_TOKEN", TOKEN)
    async with rpc.aio_channel(guarded.address) as ch:
        assert await _echo_call(ch)(b"hi") == b"echo:hi"
        assert [r async for r in ch.unary_stream(f"/{SERVICE}/Count")(b"3")] == [b"0", b"1", b"2"]
        assert await ch.stream_unary(f"/{SERVICE}/Sum")(iter([b"1", b"2"])) == b"3"

    def blocking() -> None:  # in a thread: the server runs on this test's event loop
        with rpc.channel(guarded.address) as sch:
            assert _echo_call(sch)(b"sync") == b"echo:sync"
        with rpc.stream_channel(guarded.address) as stch:
            call = stch.unary_stream(f"/{SERVICE}/Count")(b"2", timeout=5)
            assert list(call) == [b"0", b"1"]

    await asyncio.to_thread(blocking)


async def test_stream_channel_keeps_cancel(guarded: Guarded) -> None:
    def blocking() -> None:
        with rpc.stream_channel(guarded.address, token=TOKEN) as ch:
            call = ch.unary_stream(f"/{SERVICE}/Count")(b"1000000")
            assert next(call) == b"0"
            call.cancel()
            assert call.code() == grpc.StatusCode.CANCELLED

    await asyncio.to_thread(blocking)


async def test_token_file_wins_and_the_run_dir_is_the_clients_fallback(
        guarded: Guarded, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    monkeypatch.setenv("TESSERA_AUTH_TOKEN", "the-value-loses")
    monkeypatch.setenv("TESSERA_AUTH_TOKEN_FILE", str(f))
    assert auth.server_token() == TOKEN
    async with rpc.aio_channel(guarded.address) as ch:
        assert await _echo_call(ch)(b"file") == b"echo:file"
    monkeypatch.delenv("TESSERA_AUTH_TOKEN")
    monkeypatch.delenv("TESSERA_AUTH_TOKEN_FILE")
    assert auth.server_token() == "" and auth.client_token() == ""
    secrets_dir = Settings().run_dir / auth.SECRETS_DIR
    secrets_dir.mkdir(parents=True)
    (secrets_dir / auth.TOKEN_FILE).write_text(TOKEN)
    assert auth.server_token() == ""  # a server never takes the run directory's token by itself
    async with rpc.aio_channel(guarded.address) as ch:
        assert await _echo_call(ch)(b"run-dir") == b"echo:run-dir"


def test_an_unreadable_token_file_is_a_precise_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TESSERA_AUTH_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(errors.FailedPreconditionError, match="cannot read auth token file"):
        auth.server_token()


async def test_health_and_reflection_stay_open(guarded: Guarded) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = [r async for r in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
    names = {s.name for s in answers[0].list_services_response.service}
    assert SERVICE in names
    assert await asyncio.to_thread(rpc.health_status, guarded.address) == "SERVING"


async def test_no_token_configured_leaves_servers_open(monkeypatch: pytest.MonkeyPatch) -> None:
    server = rpc.create_server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert await _echo_call(ch)(b"open", timeout=5) == b"echo:open"
    finally:
        await server.stop(0)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


async def test_the_token_is_in_no_log_and_no_span(
        guarded: Guarded, monkeypatch: pytest.MonkeyPatch, all_logs: pytest.LogCaptureFixture, spans: Any) -> None:
    monkeypatch.setenv("TESSERA_AUTH_TOKEN", TOKEN)
    async with rpc.aio_channel(guarded.address) as ch:
        assert await _echo_call(ch)(b"hi") == b"echo:hi"
    async with rpc.aio_channel(guarded.address, token="wrong") as ch:
        with pytest.raises(grpc.aio.AioRpcError):
            await _echo_call(ch)(b"hi")

    def blocking() -> None:
        with rpc.channel(guarded.address) as sch:
            assert _echo_call(sch)(b"sync") == b"echo:sync"

    await asyncio.to_thread(blocking)
    finished = spans.finished()
    assert any(s.name == f"/{SERVICE}/Echo" for s in finished), [s.name for s in finished]
    for s in finished:
        for key, value in (s.attributes or {}).items():
            assert TOKEN not in str(value), f"span {s.name} attribute {key} holds the token"
        for event in s.events:
            assert TOKEN not in str(event.attributes), f"span {s.name} event {event.name} holds the token"
    # the handler above logs its metadata on purpose: only that line may hold the token
    leaked = [r for r in all_logs.records if TOKEN in r.getMessage() and r.name != "test.guarded"]
    assert not leaked, [r.getMessage() for r in leaked]
    assert any(r.name == "test.guarded" for r in all_logs.records), "the probe handler did not run"
    assert TOKEN not in repr(Settings()) and TOKEN not in repr(auth.ServerAuth(TOKEN))


def test_check_compares_the_whole_token() -> None:
    assert auth.check([("authorization", f"Bearer {TOKEN}")], TOKEN) is None
    assert auth.check([("authorization", f"Bearer {TOKEN[:-1]}")], TOKEN) == "invalid bearer token"
    assert auth.check([("x-other", "1")], TOKEN) is not None
    assert auth.is_open("/grpc.health.v1.Health/Check") and not auth.is_open(f"/{SERVICE}/Echo")


async def test_a_hand_made_channel_is_authorized_by_the_helper(guarded: Guarded) -> None:
    def blocking() -> None:
        with grpc.insecure_channel(guarded.address, options=[("grpc.lb_policy_name", "round_robin")]) as raw:
            with pytest.raises(grpc.RpcError) as ei:
                _echo_call(raw)(b"bare", timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert _echo_call(rpc.authorized(raw, token=TOKEN))(b"hand", timeout=5) == b"echo:hand"

    await asyncio.to_thread(blocking)
