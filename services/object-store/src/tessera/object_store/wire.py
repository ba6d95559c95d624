"""The wire form of PullObjectResponse, written and read without protobuf objects.

A pulled chunk is the one message in Tessera that carries megabytes. Encoding it
by hand lets the sender copy the bytes once, from the arena into the message,
and the receiver copy them once, from the message into its arena. The bytes are
a valid protobuf encoding of ``tessera.object_store.v1.PullObjectResponse``
(fields 1 total_size, 2 offset, 4 crc32c, 5 owner, then 3 data last), so any gRPC
client may read them with the generated classes.
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
