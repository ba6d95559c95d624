"""The wire form of the object store's chunk messages, written and read without protobuf objects.

Chunks of objects are the messages in Tessera that carry megabytes. Encoding
them by hand lets the sender copy the bytes once, from the arena (or a value's
own buffers) into the message, and the receiver copy them once, from the message
into its arena (or its buffer).

:func:`encode_chunk` / :func:`decode_chunk`: a valid protobuf encoding of
``tessera.object_store.v1.PullObjectResponse`` and of ``ReadObjectResponse``, which
shares its layout (fields 1 total_size, 2 offset, 4 crc32c, 5 owner, then 3 data
last), so any gRPC client may read them with the generated classes.
:func:`encode_write_chunk` / :func:`decode_write_chunk`: a ``WriteObjectRequest`` carrying a chunk.
"""

from __future__ import annotations

from tessera.common.errors import DataLossError


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_chunk(total_size: int, offset: int, crc32c: int, owner: str, data: memoryview) -> bytes:
    """One PullObjectResponse as bytes, copying ``data`` once."""
    head = bytearray()
    if total_size:
        head += b"\x08" + _varint(total_size)
    if offset:
        head += b"\x10" + _varint(offset)
    if crc32c:
        head += b"\x20" + _varint(crc32c)
    if owner:
        o = owner.encode()
        head += b"\x2a" + _varint(len(o)) + o
    head += b"\x1a" + _varint(len(data))
    return b"".join((head, data))


def encode_write_chunk(offset: int, crc32c: int, parts: list[memoryview]) -> bytes:
    """One ``WriteObjectRequest{chunk: {offset, crc32c, data}}`` whose data is ``parts`` end to end,
    copying them once (they need not be joined first)."""
    n = sum(len(p) for p in parts)
    inner = bytearray()
    if offset:
        inner += b"\x08" + _varint(offset)
    if crc32c:
        inner += b"\x18" + _varint(crc32c)
    inner += b"\x12" + _varint(n)
    head = b"\x12" + _varint(len(inner) + n) + bytes(inner)
    return b"".join((head, *parts))


def decode_write_chunk(raw: bytes) -> tuple[int, int, memoryview] | None:
    """(offset, crc32c, data view) of an encoded ``WriteObjectRequest`` carrying a chunk; None if it
    carries something else (the header: parse that one with the generated class)."""
    mv = memoryview(raw)
    n = len(raw)
    if n == 0 or raw[0] != 0x12:
        return None
    length, pos = _read_varint(raw, 1)
    if pos + length != n:
        raise DataLossError("truncated write request")
    offset = crc = 0
    data = mv[0:0]
    while pos < n:
        key, pos = _read_varint(raw, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(raw, pos)
            if field == 1:
                offset = value
            elif field == 3:
                crc = value
        elif wire == 2:
            size, pos = _read_varint(raw, pos)
            if pos + size > n:
                raise DataLossError("truncated chunk")
            if field == 2:
                data = mv[pos : pos + size]
            pos += size
        else:
            raise DataLossError(f"unexpected wire type {wire} in a chunk")
    return offset, crc, data


def decode_chunk(raw: bytes) -> tuple[int, int, int, str, memoryview]:
    """(total_size, offset, crc32c, owner, data view) of an encoded PullObjectResponse."""
    mv = memoryview(raw)
    pos, n = 0, len(raw)
    total = offset = crc = 0
    owner = ""
    data = mv[0:0]
    while pos < n:
        key, pos = _read_varint(raw, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(raw, pos)
            if field == 1:
                total = value
            elif field == 2:
                offset = value
            elif field == 4:
                crc = value
        elif wire == 2:
            length, pos = _read_varint(raw, pos)
            if pos + length > n:
                raise DataLossError("truncated chunk")
            if field == 3:
                data = mv[pos : pos + length]
            elif field == 5:
                owner = bytes(mv[pos : pos + length]).decode()
            pos += length
        else:
            raise DataLossError(f"unexpected wire type {wire} in a chunk")
    return total, offset, crc, owner, data


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(raw):
            raise DataLossError("truncated varint in a chunk")
        b = raw[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
