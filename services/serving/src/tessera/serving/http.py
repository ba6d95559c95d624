"""HTTP/JSON front end (HTTP/1.1, keep-alive), beside gRPC:

- ``POST /v1/pipelines/<name>:predict`` with ``{"records": [...]}`` -> ``{"predictions": [...]}``
- ``GET /v1/pipelines`` -> ``{"pipelines": [names]}``
- ``GET /healthz`` -> ``ok``

Errors come back as ``{"error": {"code": "NOT_FOUND", "message": ...}}`` with the matching
HTTP status. Bodies are JSON only; nothing else is decoded.

With a token configured (as for gRPC: ``TESSERA_AUTH_TOKEN``/``TESSERA_AUTH_TOKEN_FILE``, which
``tessera up --auth`` sets), every request but ``/healthz`` must carry ``Authorization: Bearer <token>``,
checked by :func:`tessera.common.auth.check` exactly as gRPC calls are; one without it, or with
another token, gets 401 with a ``WWW-Authenticate: Bearer`` header and is not routed any further.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from tessera.common import auth
from tessera.common.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, TesseraError
from tessera.serving.engine import Prediction

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 413,
          "FAILED_PRECONDITION": 412, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 411: "Length Required", 412: "Precondition Failed", 413: "Payload Too Large",
           500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}

Predict = Callable[[str, list[Any]], Awaitable[list[Prediction]]]
Names = Callable[[], Awaitable[list[str]]]

#: Paths served without the token: the liveness probe, like gRPC's health service (it tells nothing
#: about the pipelines and must answer probes that hold no secret).
OPEN_PATHS = frozenset({"/healthz"})
#: Sent with every 401 (RFC 6750): the scheme the client must use.
CHALLENGE = 'Bearer realm="tessera"'


class HttpFrontEnd:
    def __init__(self, predict: Predict, names: Names, *, token: str = "") -> None:
        """``token``: the bearer token every request but :data:`OPEN_PATHS` must carry; empty: none."""
        self.predict = predict
        self.names = names
        self._token = token
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._conn, host, port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    method, target, _version = line.decode("latin-1").split(" ", 2)
                except ValueError:
                    await self._send(writer, 400, {"error": {"code": "INVALID_ARGUMENT", "message": "bad request line"}})
                    return
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > MAX_BODY:
                    await self._send(writer, 413, {"error": {"code": "RESOURCE_EXHAUSTED",
                                                             "message": f"body of {length} bytes; at most {MAX_BODY}"}})
                    return
                body = await reader.readexactly(length) if length else b""  # read even if refused: keep-alive
                keep = headers.get("connection", "").lower() != "close"
                why = self._refusal(target, headers)
                if why is not None:
                    await self._send(writer, 401, {"error": {"code": "UNAUTHENTICATED", "message": why}},
                                     keep_alive=keep, extra={"WWW-Authenticate": CHALLENGE})
                else:
                    status, payload = await self._handle(method, target, body)
                    await self._send(writer, status, payload, keep_alive=keep)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def _refusal(self, target: str, headers: dict[str, str]) -> str | None:
        """Why the request may not go on (no or another token), or None: checked before routing, so
        that a caller without the token learns nothing, not even which paths exist."""
        if not self._token or target.split("?", 1)[0] in OPEN_PATHS:
            return None
        return auth.check(headers.items(), self._token, carrier="header")

    async def _handle(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        path = target.split("?", 1)[0]
        try:
            if path == "/healthz":
                return 200, "ok"
            if path == "/v1/pipelines" and method == "GET":
                return 200, {"pipelines": await self.names()}
            if path.startswith("/v1/pipelines/") and path.endswith(":predict"):
                if method != "POST":
                    return 405, {"error": {"code": "INVALID_ARGUMENT", "message": "use POST"}}
                name = path[len("/v1/pipelines/"):-len(":predict")]
                try:
                    req = json.loads(body or b"{}")
                except ValueError as e:
                    raise InvalidArgumentError(f"body is not JSON: {e}") from None
                recs = req.get("records") if isinstance(req, dict) else None
                if not isinstance(recs, list):
                    raise InvalidArgumentError('body must be {"records": [...]}')
                preds = await self.predict(name, recs)
                return 200, {"predictions": [asdict(p) for p in preds]}
            raise NotFoundError(f"no route {method} {path}")
        except ResourceExhaustedError as e:
            return 413, {"error": {"code": e.code, "message": str(e)}}
        except TesseraError as e:
            return STATUS.get(e.code, 500), {"error": {"code": e.code, "message": str(e)}}
        except Exception as e:
            log.exception("HTTP %s %s", method, path)
            return 500, {"error": {"code": "INTERNAL", "message": f"{type(e).__name__}: {e}"}}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: Any, *, keep_alive: bool = False,
                    extra: dict[str, str] | None = None) -> None:
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain"
        else:
            data, ctype = json.dumps(payload, separators=(",", ":")).encode(), "application/json"
        more = "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n"
                f"{more}\r\n")
        writer.write(head.encode() + data)
        await writer.drain()
