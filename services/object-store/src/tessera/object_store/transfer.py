"""The node-to-node data protocol: an object's bytes over a raw TCP stream, arena to arena.

gRPC's stream machinery costs more than the copy itself for large objects, so
object stores move bytes between them over plain sockets and keep gRPC for
control. One connection carries one range of one object:

1. the requester sends a request frame (:data:`REQUEST`, then the object id, its
   own node id and the cluster token, if any);
2. the holder answers with a response header (:data:`RESPONSE`, then the owner
   on success or an error message);
3. on success the holder streams the range as chunks, each preceded by its
   CRC-32C (4 bytes, big-endian), the data read straight from the arena file
   (``sendfile``) and received straight into the requester's arena
   (``recv_into`` a view of the destination range): no Python-level copy on
   either side.

The functions here work on blocking sockets (the caller runs them off the event
loop), bounded by kernel timeouts (:func:`set_io_timeout`): a blocking socket lets
one ``recv_into(MSG_WAITALL)`` fill a whole chunk, where Python's own socket
timeout costs a ``poll`` per call. Nothing here imports gRPC or NATS.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO

from crc32c import crc32c

from tessera.common import ids
from tessera.common.errors import (
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TesseraError,
    UnavailableError,
)

MAGIC = b"TSTR"
VERSION = 1
#: magic, version, object id length, node id length, token length, offset, length, chunk size
REQUEST = struct.Struct("!4sBBBHQQI")
#: magic, version, status, text length (owner or error message), total size, offset, length, chunk size
RESPONSE = struct.Struct("!4sBBHQQQI")
CRC = struct.Struct("!I")

MAX_TOKEN = 4096
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 64 * 1024**2

#: Status codes of a response (their names are those of the matching gRPC status).
STATUSES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAUTHENTICATED", "UNAVAILABLE",
            "RESOURCE_EXHAUSTED", "INTERNAL")
_STATUS = {name: i for i, name in enumerate(STATUSES)}


class UnauthenticatedError(TesseraError):
    """The request's token is not this cluster's."""

    code = "UNAUTHENTICATED"


_ERRORS: dict[str, type[TesseraError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "UNAVAILABLE": UnavailableError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
}


@dataclass(frozen=True)
class Request:
    object_id: bytes
    offset: int
    length: int
    node_id: bytes
    token: str
    chunk_bytes: int


@dataclass(frozen=True)
class Header:
    total_size: int
    offset: int
    length: int
    chunk_bytes: int
    owner: str


# ---------------------------------------------------------------------- frames


def encode_request(r: Request) -> bytes:
    token = r.token.encode()
    if len(token) > MAX_TOKEN:
        raise InvalidArgumentError(f"token of {len(token)} bytes is longer than {MAX_TOKEN}")
    head = REQUEST.pack(MAGIC, VERSION, len(r.object_id), len(r.node_id), len(token), r.offset, r.length,
                        r.chunk_bytes)
    return b"".join((head, r.object_id, r.node_id, token))


def request_tail(head: bytes) -> tuple[int, int, int, int, int, int]:
    """Check a request's fixed part; (id length, node id length, token length, offset, length, chunk)."""
    magic, version, oid_len, node_len, token_len, offset, length, chunk = REQUEST.unpack(head)
    if magic != MAGIC:
        raise InvalidArgumentError("not a transfer request (bad magic)")
    if version != VERSION:
        raise FailedPreconditionError(f"transfer protocol version {version} is not supported (this store speaks "
                                      f"{VERSION})")
    if token_len > MAX_TOKEN:
        raise InvalidArgumentError(f"token of {token_len} bytes is longer than {MAX_TOKEN}")
    return oid_len, node_len, token_len, offset, length, chunk


def decode_request(head: bytes, tail: bytes) -> Request:
    """The request of a fixed part ``head`` and the ``tail`` of variable fields it announces."""
    oid_len, node_len, token_len, offset, length, chunk = request_tail(head)
    if len(tail) != oid_len + node_len + token_len:
        raise InvalidArgumentError("truncated transfer request")
    oid = ids.check_id("object_id", tail[:oid_len])
    node = tail[oid_len:oid_len + node_len]
    if node:
        ids.check_id("node_id", node, field="requester_node_id")
    try:
        token = tail[oid_len + node_len:].decode()
    except UnicodeDecodeError:
        raise InvalidArgumentError("the token is not UTF-8") from None
    if length <= 0:
        raise InvalidArgumentError("a transfer request must ask for at least one byte")
    return Request(oid, offset, length, node, token, min(max(chunk, MIN_CHUNK), MAX_CHUNK))


def encode_ok(h: Header) -> bytes:
    owner = h.owner.encode()[:0xFFFF]
    return RESPONSE.pack(MAGIC, VERSION, 0, len(owner), h.total_size, h.offset, h.length, h.chunk_bytes) + owner


def encode_error(code: str, message: str) -> bytes:
    text = message.encode()[:0xFFFF]
    return RESPONSE.pack(MAGIC, VERSION, _STATUS.get(code, _STATUS["INTERNAL"]), len(text), 0, 0, 0, 0) + text


def read_header(sock: socket.socket) -> Header:
    """Read a response header; a refusal raises the error it names (with the holder's message)."""
    magic, version, status, text_len, total, offset, length, chunk = RESPONSE.unpack(recv_exact(sock, RESPONSE.size))
    if magic != MAGIC or version != VERSION:
        raise DataLossError("not a transfer response (bad magic or version)")
    text = recv_exact(sock, text_len).decode(errors="replace") if text_len else ""
    if status != 0:
        name = STATUSES[status] if status < len(STATUSES) else "INTERNAL"
        raise _ERRORS.get(name, UnavailableError)(f"holder refused the transfer: {name}: {text}")
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise DataLossError(f"transfer response with a chunk size of {chunk}")
    return Header(total, offset, length, chunk, text)


# ---------------------------------------------------------------------- streams


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise UnavailableError(f"the peer closed the connection after {got} of {n} bytes of a frame")
        got += k
    return bytes(buf)


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking, each send or receive failing after ``seconds`` without progress
    (EAGAIN, raised as :class:`BlockingIOError`)."""
    sock.settimeout(None)
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def send_range(sock: socket.socket, file: BinaryIO, view: memoryview, file_offset: int, chunk_bytes: int) -> None:
    """Stream ``view`` (the bytes of ``file`` at ``file_offset``), each chunk preceded by its CRC-32C.

    The CRC is computed over the mapping, the bytes are sent by ``sendfile`` from
    the file: the kernel copies them, Python never does.
    """
    n = len(view)
    out, src = sock.fileno(), file.fileno()
    for pos in range(0, n, chunk_bytes):
        k = min(chunk_bytes, n - pos)
        sock.sendall(CRC.pack(crc32c(view[pos:pos + k])))
        at, end = file_offset + pos, file_offset + pos + k
        while at < end:
            sent = os.sendfile(out, src, at, end - at)
            if not sent:
                raise UnavailableError(f"sendfile stopped at byte {at - file_offset} of {n}: the file is shorter")
            at += sent


def recv_range(sock: socket.socket, dest: memoryview, chunk_bytes: int, *, deadline: float, what: str) -> None:
    """Receive a range streamed by :func:`send_range` into ``dest`` and check every chunk.

    Raises:
        DataLossError: a chunk failed its CRC check.
        UnavailableError: the holder closed the connection before the end.
        DeadlineExceededError: the whole range did not arrive by ``deadline`` (monotonic).
    """
    n = len(dest)
    crc_buf = bytearray(CRC.size)
    crc_view = memoryview(crc_buf)
    for pos in range(0, n, chunk_bytes):
        k = min(chunk_bytes, n - pos)
        _fill(sock, crc_view, what, pos)
        chunk = dest[pos:pos + k]
        _fill(sock, chunk, what, pos)
        if crc32c(chunk) != CRC.unpack(crc_buf)[0]:
            raise DataLossError(f"{what}: the chunk at {pos} failed its CRC check")
        if time.monotonic() > deadline:
            raise DeadlineExceededError(f"{what}: {pos + k} of {n} bytes arrived before the deadline")


def _fill(sock: socket.socket, view: memoryview, what: str, at: int) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:] if got else view, 0, socket.MSG_WAITALL)
        if not k:
            raise UnavailableError(f"{what}: the holder closed the connection at byte {at} of the range")
        got += k


def split_range(size: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``parts`` nearly equal, contiguous, non-empty parts of ``size`` bytes."""
    parts = max(1, min(parts, size))
    step, extra = divmod(size, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + step + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out
