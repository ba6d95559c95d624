"""The HTTP/JSON front end on a real socket: with a token, every route but /healthz requires it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tessera.serving.engine import Prediction
from tessera.serving.http import HttpFrontEnd

TOKEN = "s3cret-token-of-this-front-end"


class Served:
    """What the front end was asked for, to show that a refused request reaches nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []

    async def predict(self, name: str, records: list[Any]) -> list[Prediction]:
        self.calls.append((name, records))
        return [Prediction(label=f"{name}:{r}") for r in records]

    async def names(self) -> list[str]:
        self.calls.append(("<names>", []))
        return ["alpha", "beta"]


async def _front(token: str) -> tuple[HttpFrontEnd, Served]:
    served = Served()
    front = HttpFrontEnd(served.predict, served.names, token=token)
    await front.start("127.0.0.1", 0)
    return front, served


@pytest.fixture
async def secured() -> AsyncIterator[tuple[HttpFrontEnd, Served]]:
    front, served = await _front(TOKEN)
    try:
        yield front, served
    finally:
        await front.stop()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                    body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on an open keep-alive connection: (status, headers with lowercased names, body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    status = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    got: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        got[k.strip().lower()] = v.strip()
    data = await asyncio.wait_for(reader.readexactly(int(got["content-length"])), 10)
    return status, got, data


async def _request(front: HttpFrontEnd, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    try:
        return await _exchange(reader, writer, method, path, body, headers)
    finally:
        writer.close()


PREDICT = ("POST", "/v1/pipelines/alpha:predict", json.dumps({"records": [1, 2]}).encode())
LIST = ("GET", "/v1/pipelines", b"")
BAD = {
    "no token": {},
    "wrong token": {"Authorization": "Bearer not-the-token"},
    "another scheme": {"Authorization": f"Basic {TOKEN}"},
    "token without scheme": {"Authorization": TOKEN},
}


@pytest.mark.parametrize("route", [PREDICT, LIST], ids=["predict", "list"])
@pytest.mark.parametrize("case", list(BAD))
async def test_a_request_without_the_token_is_refused_and_reaches_nothing(
        secured: tuple[HttpFrontEnd, Served], route: tuple[str, str, bytes], case: str) -> None:
    front, served = secured
    status, headers, body = await _request(front, *route, headers=BAD[case])
    assert status == 401, (case, status, body)
    assert headers["www-authenticate"].startswith("Bearer"), headers
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "UNAUTHENTICATED" and ("authorization" in error["message"] or "token" in error["message"]), error
    assert TOKEN not in body.decode()
    assert served.calls == []  # refused before routing: no prediction, no listing


async def test_the_right_token_is_served(secured: tuple[HttpFrontEnd, Served]) -> None:
    front, served = secured
    ok = {"Authorization": f"Bearer {TOKEN}"}
    status, _, body = await _request(front, *PREDICT, headers=ok)
    assert status == 200, body
    assert [p["label"] for p in json.loads(body)["predictions"]] == ["alpha:1", "alpha:2"]
    status, _, body = await _request(front, *LIST, headers=ok)
    assert status == 200 and json.loads(body) == {"pipelines": ["alpha", "beta"]}
    assert served.calls == [("alpha", [1, 2]), ("<names>", [])]


async def test_unknown_paths_are_refused_too_and_healthz_stays_open(secured: tuple[HttpFrontEnd, Served]) -> None:
    front, _ = secured
    status, _, _ = await _request(front, "GET", "/v1/nowhere")
    assert status == 401  # without the token nobody learns which paths exist
    status, _, _ = await _request(front, "GET", "/v1/nowhere", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 404
    status, _, body = await _request(front, "GET", "/healthz")
    assert (status, body) == (200, b"ok")


async def test_a_refusal_keeps_the_connection_usable(secured: tuple[HttpFrontEnd, Served]) -> None:
    """The refused request's body is read, so the next request on the same connection is parsed right."""
    front, served = secured
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    try:
        status, headers, _ = await _exchange(reader, writer, *PREDICT)
        assert status == 401 and headers["connection"] == "keep-alive"
        status, _, body = await _exchange(reader, writer, *PREDICT, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, body
    finally:
        writer.close()
    assert served.calls == [("alpha", [1, 2])]


async def test_without_a_token_nothing_is_required() -> None:
    front, served = await _front("")
    try:
        status, _, body = await _request(front, *LIST)
        assert status == 200 and json.loads(body) == {"pipelines": ["alpha", "beta"]}
    finally:
        await front.stop()
