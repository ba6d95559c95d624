"""Optional TLS: a server with tls_cert_file/tls_key_file, clients that trust tls_ca_file."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tessera.common import errors, rpc

SERVICE = "test.v1.Tls"
TOKEN = "tls-test-token"

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
              pytest.mark.usefixtures("clean_env")]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=tessera-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "ext", cwd=d)
    return d


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"echo:" + request


@pytest.fixture
async def tls_server(pki: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setenv("TESSERA_TLS_CERT_FILE", str(pki / "server.pem"))
    monkeypatch.setenv("TESSERA_TLS_KEY_FILE", str(pki / "server.key"))
    server = rpc.create_server(token=TOKEN)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = rpc.add_port(server, "127.0.0.1:0")
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.delenv("TESSERA_TLS_CERT_FILE")
    monkeypatch.delenv("TESSERA_TLS_KEY_FILE")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_clients_trusting_the_ca_talk_tls_with_the_token(
        tls_server: str, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_TLS_CA_FILE", str(pki / "ca.pem"))
    async with rpc.aio_channel(tls_server, token=TOKEN) as ch:
        assert await ch.unary_unary(f"/{SERVICE}/Echo")(b"sealed") == b"echo:sealed"
    async with rpc.aio_channel(tls_server, token="wrong") as ch:  # TLS does not replace the token
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await ch.unary_unary(f"/{SERVICE}/Echo")(b"x")
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def blocking() -> None:
        assert rpc.health_status(tls_server, timeout=5) == "SERVING"
        with rpc.channel(tls_server, token=TOKEN) as sch:
            assert sch.unary_unary(f"/{SERVICE}/Echo")(b"sync") == b"echo:sync"

    await asyncio.to_thread(blocking)


async def test_a_plain_client_gets_nothing(tls_server: str) -> None:
    async with grpc.aio.insecure_channel(tls_server) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await ch.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=5,
                                                    metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_trusting_another_ca_is_refused(
        tls_server: str, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = pki / "other"
    other.mkdir(exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "o.key", "-out", "o.pem", "-days", "1",
             "-subj", "/CN=other-ca", cwd=other)
    monkeypatch.setenv("TESSERA_TLS_CA_FILE", str(other / "o.pem"))
    async with rpc.aio_channel(tls_server, token=TOKEN, default_timeout=5) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await ch.unary_unary(f"/{SERVICE}/Echo")(b"x")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_half_a_tls_configuration_is_a_precise_error(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_TLS_CERT_FILE", str(pki / "server.pem"))
    with pytest.raises(errors.FailedPreconditionError, match="both tls_cert_file and tls_key_file"):
        rpc.server_credentials()
    monkeypatch.setenv("TESSERA_TLS_KEY_FILE", str(pki / "absent.key"))
    with pytest.raises(errors.FailedPreconditionError, match="cannot read the TLS certificate or key"):
        rpc.server_credentials()
