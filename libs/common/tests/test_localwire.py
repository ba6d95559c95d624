"""The object store's local framing: every message packs and parses back; bad bodies are refused precisely."""

from __future__ import annotations

import os

import pytest

from tessera.common import localwire as lw
from tessera.common.errors import AlreadyExistsError, DeadlineExceededError, ResourceExhaustedError, TesseraError


def _body(frame: bytes) -> tuple[lw.Header, memoryview]:
    h = lw.parse_header(frame)
    assert h.length == len(frame) - lw.HEADER.size
    return h, memoryview(frame)[lw.HEADER.size :]


def test_header_and_releases_round_trip() -> None:
    rel = [os.urandom(20) for _ in range(3)]
    h, body = _body(lw.frame(lw.GET, 7, lw.get_body([b"\x01" * 20], 250), flags=lw.F_PIN, releases=rel))
    assert (h.op, h.flags, h.releases, h.request_id) == (lw.GET, lw.F_PIN, 3, 7)
    got, rest = lw.split_releases(h, body)
    assert got == rel
    assert lw.parse_get(rest) == ([b"\x01" * 20], 250)


def test_every_message_round_trips() -> None:
    oid = os.urandom(20)
    assert lw.parse_hello(memoryview(lw.hello_body("tök", "driver"))) == ("tök", "driver")
    w = lw.Welcome("local-1", b"\x02" * 16, "/dev/shm/a", 1 << 30, 100 * 1024)
    assert lw.parse_welcome(memoryview(lw.welcome_body(w))) == w
    assert lw.parse_create(memoryview(lw.create_body(oid, 5 << 30, "owner"))) == (oid, 5 << 30, "owner")
    assert lw.parse_offset(memoryview(lw.offset_body(123456789))) == 123456789
    locs = [lw.Located(oid, 10, "o", offset=4096), lw.Located(os.urandom(20), 3, "", inline=b"abc")]
    assert lw.parse_located(memoryview(lw.located_body(locs))) == locs
    put = lw.parse_put(memoryview(lw.put_body([(oid, b"data", "me"), (os.urandom(20), b"", "")])))
    assert [(o, bytes(d), w_) for o, d, w_ in put][0] == (oid, b"data", "me")
    assert lw.parse_failed(memoryview(lw.failed_body([(oid, "ALREADY_EXISTS: x")]))) == [(oid, "ALREADY_EXISTS: x")]


def test_errors_keep_their_type_and_message() -> None:
    for code, cls in (("ALREADY_EXISTS", AlreadyExistsError), ("DEADLINE_EXCEEDED", DeadlineExceededError),
                      ("RESOURCE_EXHAUSTED", ResourceExhaustedError), ("UNAUTHENTICATED", lw.UnauthenticatedError)):
        parsed = lw.parse_error(memoryview(lw.error_body(code, "why, exactly")))
        assert parsed == (code, "why, exactly")
        e = lw.error_of(*parsed)
        assert isinstance(e, cls) and str(e) == "why, exactly"
    other = lw.error_of("ABORTED", "m")  # a code without a class of its own keeps its name
    assert isinstance(other, TesseraError) and other.code == "ABORTED"


@pytest.mark.parametrize(("parse", "body", "message"), [
    (lw.parse_create, b"\x00" * 10, "CREATE body is 10 bytes"),
    (lw.parse_create, lw.create_body(b"\x00" * 20, 1, "o") + b"!", "1 bytes too many"),
    (lw.parse_create, lw.create_body(b"\x00" * 20, 1, "")[:28] + b"\x05\x00", "runs past the end"),
    (lw.parse_get, b"\x00" * 4, "GET body is 4 bytes"),
    (lw.parse_get, lw.get_body([b"\x00" * 20], 0)[:-1], "GET of 1 objects"),
    (lw.parse_put, lw.put_body([(b"\x00" * 20, b"abc", "")])[:-1], "run past the end"),
    (lw.parse_put, lw.put_body([(b"\x00" * 20, b"abc", "")]) + b"x", "bytes too many"),
    (lw.parse_hello, lw.hello_body("t", "n") + b"x", "bytes too many"),
    (lw.parse_hello, b"\x02\x00\xff\xfe\x00\x00", "not UTF-8"),
])
def test_bad_bodies_are_refused(parse: object, body: bytes, message: str) -> None:
    with pytest.raises(lw.ProtocolError, match=message):
        parse(memoryview(body))  # type: ignore[operator]


def test_limits() -> None:
    with pytest.raises(lw.ProtocolError, match="over the"):
        lw.parse_header(lw.HEADER.pack(lw.GET, 0, 0, 1, lw.MAX_BODY + 1))
    h = lw.parse_header(lw.HEADER.pack(lw.RELEASE, 0, 2, 1, 20))
    with pytest.raises(lw.ProtocolError, match="announces 2 releases"):
        lw.split_releases(h, b"\x00" * 20)
    with pytest.raises(TesseraError, match="object ids are 20 bytes"):
        lw.frame(lw.RELEASE, 1, releases=[b"short"])
