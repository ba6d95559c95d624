"""Credentials: the shared gRPC token, and the NATS and Redis passwords.

Authentication is on when a token is configured (``TESSERA_AUTH_TOKEN`` or
``TESSERA_AUTH_TOKEN_FILE``; the file wins when both are set). Then:

- every server made by :func:`tessera.common.rpc.create_server` refuses a call
  that lacks ``authorization: Bearer <token>`` metadata with UNAUTHENTICATED.
  ``grpc.health.v1.Health`` and server reflection stay open, so probes and
  healthchecks work without the token;
- every channel made by the helpers of :mod:`tessera.common.rpc` sends the token.
  A client with no token configured also looks for the one ``tessera up --auth``
  wrote into its run directory (``<run_dir>/secrets/auth_token``).

Secrets are read from their files when a process starts or opens a channel, and
are never logged, put in span attributes or printed.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from pydantic import SecretStr

from tessera.common.config import Settings, current_settings
from tessera.common.errors import FailedPreconditionError, bounded

# Where ``tessera up --auth`` keeps its secrets (in the run directory), and the NATS user it creates.
from tessera.common.names import NATS_PASSWORD_FILE as NATS_PASSWORD_FILE
from tessera.common.names import NATS_USER as NATS_USER
from tessera.common.names import REDIS_PASSWORD_FILE as REDIS_PASSWORD_FILE
from tessera.common.names import SECRETS_DIR as SECRETS_DIR
from tessera.common.names import TOKEN_FILE as TOKEN_FILE

#: Metadata key of the token (gRPC metadata keys are lowercase).
HEADER = "authorization"
SCHEME = "Bearer "

#: Methods open without the token: health (probes, compose healthchecks) and reflection.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)



def read_secret(value: SecretStr | str, file: Path | None, *, what: str) -> str:
    """The secret in ``file`` when one is named (trailing whitespace dropped), else ``value``.

    Raises:
        FailedPreconditionError: ``file`` is named but cannot be read.
    """
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as e:
            raise FailedPreconditionError(f"cannot read {what} file {file}: {e.strerror or e}") from None
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def server_token(settings: Settings | None = None) -> str:
    """The token a server requires: configured explicitly (empty: no authentication)."""
    s = settings or current_settings()
    return read_secret(s.auth_token, s.auth_token_file, what="auth token")


def client_token(settings: Settings | None = None) -> str:
    """The token a client sends: configured explicitly, else the one in the run directory, else empty."""
    s = settings or current_settings()
    token = server_token(s)
    if token:
        return token
    path = s.run_dir / SECRETS_DIR / TOKEN_FILE
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def nats_credentials(settings: Settings | None = None) -> tuple[str, str]:
    """``(user, password)`` for NATS; empty strings when none are configured."""
    s = settings or current_settings()
    return s.nats_user, read_secret(s.nats_password, s.nats_password_file, what="NATS password")


def redis_password(settings: Settings | None = None) -> str:
    """The Redis password of every shard; empty when none is configured."""
    s = settings or current_settings()
    return read_secret(s.redis_password, s.redis_password_file, what="Redis password")


# ---------------------------------------------------------------------- checking


def check(metadata: Iterable[tuple[str, Any]] | None, token: str, *, carrier: str = "metadata") -> str | None:
    """None if ``metadata`` carries ``token``, else why not (a message that never contains a token).

    ``metadata``: gRPC metadata, or HTTP headers with lowercased names (the HTTP front end checks its
    requests here too, so both front ends accept and refuse the same things); ``carrier`` names which,
    in the message.
    """
    values = [v for k, v in (metadata or ()) if k == HEADER]
    if not values:
        return f"missing '{HEADER}' {carrier}: this server requires '{HEADER}: {SCHEME}<token>'"
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value.startswith(SCHEME):
        return f"'{HEADER}' {carrier} must use the {SCHEME.strip()} scheme"
    given = value[len(SCHEME):].strip().encode()
    if not hmac.compare_digest(given, token.encode()):
        return "invalid bearer token"
    return None


def matches(given: str, token: str) -> bool:
    """Whether ``given`` is ``token`` (compared in constant time)."""
    return hmac.compare_digest(given.encode(), token.encode())


def is_open(method: str) -> bool:
    """Whether ``method`` (``/package.Service/Method``) is served without the token."""
    return method.startswith(OPEN_PREFIXES)


class ServerAuth(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection unless it carries the token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("ServerAuth needs a non-empty token")
        self._token = token

    def __repr__(self) -> str:  # never shows the token
        return "ServerAuth()"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if is_open(method):
            return await continuation(details)
        why = check(details.invocation_metadata, self._token)
        if why is None:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: UNIMPLEMENTED tells nothing an attacker needs
            return handler

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, bounded(f"{method}: {why}"))

        from tessera.common.rpc import same_kind  # rpc imports this module

        return same_kind(handler, deny)


# ---------------------------------------------------------------------- sending


def _with_token(metadata: Any, token: str) -> list[tuple[str, Any]]:
    items = [(k, v) for k, v in (metadata or ()) if k != HEADER]
    items.append((HEADER, SCHEME + token))
    return items


class _AioAuth:
    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:  # never shows the token
        return f"{type(self).__name__}()"

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=grpc.aio.Metadata(*_with_token(details.metadata, self._token)))


class _AioUnaryUnaryAuth(_AioAuth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStreamAuth(_AioAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnaryAuth(_AioAuth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _AioStreamStreamAuth(_AioAuth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def aio_client_auth(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add ``token`` to every call of an asyncio channel (one per call kind:
    ``grpc.aio`` files each interceptor under a single kind)."""
    return [_AioUnaryUnaryAuth(token), _AioUnaryStreamAuth(token), _AioStreamUnaryAuth(token),
            _AioStreamStreamAuth(token)]


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: Any, metadata: list[tuple[str, Any]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class ClientAuth(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call of a blocking channel; streams keep their ``cancel()``."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "ClientAuth()"

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(details, _with_token(details.metadata, self._token))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)
