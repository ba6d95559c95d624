"""The object store's local protocol: compact binary frames over a Unix socket, shared by store and client.

A client on the store's host talks to it over a Unix domain socket instead of
gRPC: a gRPC call costs about a millisecond, a socket round trip tens of
microseconds. The connection is the session: when it closes, the store releases
every pin the session held and aborts the objects it left unsealed.

Every frame is a fixed header followed by a struct-packed body::

    op: u8 | flags: u8 | releases: u16 | request id: u32 | body length: u32

A request's body starts with ``releases`` object ids (20 bytes each): pins the
client dropped since its last request, released before the request runs, so
releases never cost a round trip of their own. A reply carries the request's id
with ``op | REPLY`` (or ``ERROR``: the body is a status code and a message);
replies may come out of order (a get that waits does not hold up the others).

The store also sends one frame nobody asked for, ``FREED`` with request id 0
(:data:`NOTICE_ID`): objects the session pins were freed by their owner. A
client that keeps the pin of a value it dropped (to serve the next get of it
without a round trip) reads these first and stops using those pins.

The first frame of a connection is ``HELLO`` (the token, when the cluster has
one: the socket carries no metadata). A frame that cannot be parsed gets an
``ERROR`` reply and the connection is closed; nothing it asked for is done.

No grpc, no I/O here: both ends pack and parse with these functions.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from tessera.common import ids
from tessera.common.errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TesseraError,
    UnavailableError,
)

HEADER = struct.Struct("<BBHII")
#: Object ids on this socket are always this long.
OID_LEN = ids.OBJECT_ID_LEN
#: Longest body accepted: a batch of small puts stays far below it.
MAX_BODY = 64 * 2**20
#: Most releases one request may carry (the header field is a u16).
MAX_RELEASES = 0xFFFF

# ---- ops (requests); a reply is op | REPLY, a failure ERROR
HELLO = 1
CREATE = 2
SEAL = 3
ABORT = 4
GET = 5
RELEASE = 6  # nothing but the releases the header carries
PUT = 7  # a batch of small objects, sealed at once
REPLY = 0x80
ERROR = 0xFF
REQUESTS = frozenset((HELLO, CREATE, SEAL, ABORT, GET, RELEASE, PUT))
# ---- notices (store -> client, unasked, with request id NOTICE_ID)
FREED = 0x40  # object ids (20 bytes each) this session pins, freed by their owner
NOTICE_ID = 0  # (a request never has it)

# ---- flags
F_DURABLE = 1  # SEAL, PUT: also keep a copy on the node's disk
F_PIN = 2  # SEAL: keep the object pinned for this session

# ---- GET reply entries
AT_OFFSET = 0
INLINE = 1

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_Q = struct.Struct("<Q")
_CREATE = struct.Struct(f"<{OID_LEN}sQH")  # oid, size, owner length (owner follows)
_GET = struct.Struct("<II")  # timeout ms (0: the store's longest wait), count (ids follow)
_LOC = struct.Struct(f"<{OID_LEN}sBQQH")  # oid, kind, size, offset or inline length, owner length
_PUT_ITEM = struct.Struct(f"<{OID_LEN}sIH")  # oid, data length, owner length (owner, then data follow)
_WELCOME = struct.Struct("<QQH")  # arena size, inline threshold, node id length

#: Status codes of ERROR frames: the names of tessera.common.errors' codes (gRPC's), as numbers.
CODES = {"INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5, "ALREADY_EXISTS": 6,
         "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "UNAVAILABLE": 14, "DATA_LOSS": 15,
         "UNAUTHENTICATED": 16, "INTERNAL": 13}
_NAMES = {v: k for k, v in CODES.items()}
_ERRORS: dict[str, type[TesseraError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError, "DEADLINE_EXCEEDED": DeadlineExceededError, "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError, "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "FAILED_PRECONDITION": FailedPreconditionError, "UNAVAILABLE": UnavailableError, "DATA_LOSS": DataLossError}


class ProtocolError(InvalidArgumentError):
    """A frame that does not parse: the connection that sent it is closed."""


class UnauthenticatedError(TesseraError):
    """The first frame lacked this cluster's token."""

    code = "UNAUTHENTICATED"


class Header(NamedTuple):  # (tuples: made per frame, cheaper than frozen dataclasses)
    op: int
    flags: int
    releases: int
    request_id: int
    length: int


class Welcome(NamedTuple):
    session_id: str
    node_id: bytes
    arena_path: str
    arena_size: int
    inline_threshold: int


class Located(NamedTuple):
    """One object of a GET reply: at ``offset`` in the arena (pinned), or its bytes inline (not pinned)."""

    object_id: bytes
    size: int
    owner: str
    offset: int | None = None
    inline: bytes | None = None


def parse_header(raw: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """The header at ``offset`` in ``raw`` (HEADER.size bytes from there).

    Raises:
        ProtocolError: a body over MAX_BODY.
    """
    op, flags, nrel, rid, length = HEADER.unpack_from(raw, offset)
    if length > MAX_BODY:
        raise ProtocolError(f"frame body of {length} bytes is over the {MAX_BODY}-byte limit")
    return Header(op, flags, nrel, rid, length)


def frame(op: int, request_id: int, body: bytes = b"", *, flags: int = 0, releases: list[bytes] | None = None) -> bytes:
    """One frame; ``releases`` (object ids) go first in the body."""
    if releases:
        if len(releases) > MAX_RELEASES:
            raise InvalidArgumentError(f"at most {MAX_RELEASES} releases ride on one request, got {len(releases)}")
        head = b"".join(releases)
        if len(head) != OID_LEN * len(releases):
            raise InvalidArgumentError(f"object ids are {OID_LEN} bytes")
        return HEADER.pack(op, flags, len(releases), request_id, len(head) + len(body)) + head + body
    return HEADER.pack(op, flags, 0, request_id, len(body)) + body


def split_releases(h: Header, body: bytes | memoryview) -> tuple[list[bytes], memoryview]:
    """(the released ids, the rest of the body)."""
    mv = memoryview(body)
    n = h.releases * OID_LEN
    if n > len(mv):
        raise ProtocolError(f"the header announces {h.releases} releases but the body has {len(mv)} bytes")
    return [bytes(mv[i : i + OID_LEN]) for i in range(0, n, OID_LEN)], mv[n:]


def _text(mv: memoryview, pos: int, n: int, what: str) -> tuple[str, int]:
    if pos + n > len(mv):
        raise ProtocolError(f"{what} runs past the end of the frame")
    try:
        return bytes(mv[pos : pos + n]).decode(), pos + n
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


def _exact(mv: memoryview, want: int, what: str) -> None:
    if len(mv) != want:
        raise ProtocolError(f"{what} body is {len(mv)} bytes, expected {want}")


# ------------------------------------------------------------------ HELLO

def hello_body(token: str, client_name: str) -> bytes:
    t, n = token.encode(), client_name.encode()
    return _U16.pack(len(t)) + t + _U16.pack(len(n)) + n


def parse_hello(mv: memoryview) -> tuple[str, str]:
    """(token, client name)."""
    if len(mv) < 2:
        raise ProtocolError("HELLO body is too short")
    (n,) = _U16.unpack_from(mv)
    token, pos = _text(mv, 2, n, "HELLO token")
    if pos + 2 > len(mv):
        raise ProtocolError("HELLO body has no client name")
    (n,) = _U16.unpack_from(mv, pos)
    name, pos = _text(mv, pos + 2, n, "HELLO client name")
    if pos != len(mv):
        raise ProtocolError(f"HELLO body has {len(mv) - pos} bytes too many")
    return token, name


def welcome_body(w: Welcome) -> bytes:
    sid, path = w.session_id.encode(), w.arena_path.encode()
    return (_WELCOME.pack(w.arena_size, w.inline_threshold, len(w.node_id)) + w.node_id
            + _U16.pack(len(sid)) + sid + _U16.pack(len(path)) + path)


def parse_welcome(mv: memoryview) -> Welcome:
    if len(mv) < _WELCOME.size:
        raise ProtocolError("welcome is too short")
    size, threshold, n = _WELCOME.unpack_from(mv)
    pos = _WELCOME.size
    node_id = bytes(mv[pos : pos + n])
    pos += n
    (n,) = _U16.unpack_from(mv, pos)
    sid, pos = _text(mv, pos + 2, n, "session id")
    (n,) = _U16.unpack_from(mv, pos)
    path, pos = _text(mv, pos + 2, n, "arena path")
    return Welcome(sid, node_id, path, size, threshold)


# ------------------------------------------------------------------ CREATE / SEAL / ABORT

def create_body(object_id: bytes, size: int, owner: str) -> bytes:
    o = owner.encode()
    return _CREATE.pack(object_id, size, len(o)) + o


def parse_create(mv: memoryview) -> tuple[bytes, int, str]:
    """(object id, size, owner)."""
    if len(mv) < _CREATE.size:
        raise ProtocolError(f"CREATE body is {len(mv)} bytes, at least {_CREATE.size} expected")
    oid, size, n = _CREATE.unpack_from(mv)
    owner, pos = _text(mv, _CREATE.size, n, "CREATE owner")
    if pos != len(mv):
        raise ProtocolError(f"CREATE body has {len(mv) - pos} bytes too many")
    return oid, size, owner


def parse_offset(mv: memoryview) -> int:
    _exact(mv, _Q.size, "CREATE reply")
    return int(_Q.unpack_from(mv)[0])


def offset_body(offset: int) -> bytes:
    return _Q.pack(offset)


def parse_oid(mv: memoryview, what: str) -> bytes:
    _exact(mv, OID_LEN, what)
    return bytes(mv)


# ------------------------------------------------------------------ GET

def get_body(object_ids: list[bytes], timeout_ms: int) -> bytes:
    return _GET.pack(timeout_ms, len(object_ids)) + b"".join(object_ids)


def parse_get(mv: memoryview) -> tuple[list[bytes], int]:
    """(object ids, timeout in ms: 0 means the store's longest wait)."""
    if len(mv) < _GET.size:
        raise ProtocolError(f"GET body is {len(mv)} bytes, at least {_GET.size} expected")
    timeout_ms, n = _GET.unpack_from(mv)
    _exact(mv, _GET.size + n * OID_LEN, f"GET of {n} objects:")
    base = _GET.size
    return [bytes(mv[base + i * OID_LEN : base + (i + 1) * OID_LEN]) for i in range(n)], timeout_ms


def located_body(objects: list[Located]) -> bytes:
    parts = [_U32.pack(len(objects))]
    for o in objects:
        owner = o.owner.encode()
        if o.inline is not None:
            parts += [_LOC.pack(o.object_id, INLINE, o.size, len(o.inline), len(owner)), owner, o.inline]
        else:
            parts += [_LOC.pack(o.object_id, AT_OFFSET, o.size, o.offset or 0, len(owner)), owner]
    return b"".join(parts)


def parse_located(mv: memoryview) -> list[Located]:
    (n,) = _U32.unpack_from(mv)
    pos = _U32.size
    out = []
    for _ in range(n):
        oid, kind, size, where, k = _LOC.unpack_from(mv, pos)
        owner, pos = _text(mv, pos + _LOC.size, k, "owner")
        if kind == INLINE:
            out.append(Located(oid, size, owner, inline=bytes(mv[pos : pos + where])))
            pos += where
        else:
            out.append(Located(oid, size, owner, offset=where))
    return out


# ------------------------------------------------------------------ PUT (small objects)

def put_body(objects: list[tuple[bytes, bytes, str]]) -> bytes:
    """``objects``: (object id, data, owner) each."""
    parts = [_U32.pack(len(objects))]
    for oid, data, owner in objects:
        o = owner.encode()
        parts += [_PUT_ITEM.pack(oid, len(data), len(o)), o, data]
    return b"".join(parts)


def parse_put(mv: memoryview) -> list[tuple[bytes, memoryview, str]]:
    """(object id, data, owner) of each object; the whole body is checked before anything is returned."""
    if len(mv) < _U32.size:
        raise ProtocolError("PUT body is too short")
    (n,) = _U32.unpack_from(mv)
    pos = _U32.size
    out = []
    for i in range(n):
        if pos + _PUT_ITEM.size > len(mv):
            raise ProtocolError(f"PUT object {i} of {n} runs past the end of the frame")
        oid, size, k = _PUT_ITEM.unpack_from(mv, pos)
        owner, pos = _text(mv, pos + _PUT_ITEM.size, k, "PUT owner")
        if pos + size > len(mv):
            raise ProtocolError(f"PUT object {i} of {n}: its {size} bytes run past the end of the frame")
        out.append((oid, mv[pos : pos + size], owner))
        pos += size
    if pos != len(mv):
        raise ProtocolError(f"PUT body has {len(mv) - pos} bytes too many")
    return out


def failed_body(failed: list[tuple[bytes, str]]) -> bytes:
    """The PUT reply: the objects that could not be stored, with why."""
    parts = [_U32.pack(len(failed))]
    for oid, why in failed:
        w = why.encode()[:0xFFFF]
        parts += [oid, _U16.pack(len(w)), w]
    return b"".join(parts)


def parse_failed(mv: memoryview) -> list[tuple[bytes, str]]:
    (n,) = _U32.unpack_from(mv)
    pos = _U32.size
    out = []
    for _ in range(n):
        oid = bytes(mv[pos : pos + OID_LEN])
        (k,) = _U16.unpack_from(mv, pos + OID_LEN)
        why, pos = _text(mv, pos + OID_LEN + 2, k, "reason")
        out.append((oid, why))
    return out


# ------------------------------------------------------------------ ERROR

def freed_body(object_ids: list[bytes]) -> bytes:
    body = b"".join(object_ids)
    if len(body) != OID_LEN * len(object_ids):
        raise InvalidArgumentError(f"object ids are {OID_LEN} bytes")
    return body


def parse_freed(mv: memoryview) -> list[bytes]:
    if len(mv) % OID_LEN:
        raise ProtocolError(f"a FREED notice carries whole object ids, got {len(mv)} bytes")
    return [bytes(mv[i : i + OID_LEN]) for i in range(0, len(mv), OID_LEN)]


def error_body(code: str, message: str) -> bytes:
    m = message.encode()[:0xFFFF]
    return bytes([CODES.get(code, CODES["INTERNAL"])]) + _U16.pack(len(m)) + m


def parse_error(mv: memoryview) -> tuple[str, str]:
    """(status code name, message)."""
    if len(mv) < 3:
        return "INTERNAL", "malformed error frame"
    (n,) = _U16.unpack_from(mv, 1)
    return _NAMES.get(mv[0], "INTERNAL"), bytes(mv[3 : 3 + n]).decode(errors="replace")


def error_of(code: str, message: str) -> TesseraError:
    """The typed error an ERROR frame stands for."""
    if code == "UNAUTHENTICATED":
        return UnauthenticatedError(message)
    err = _ERRORS.get(code)
    if err is None:
        e = TesseraError(message)
        e.code = code
        return e
    return err(message)
