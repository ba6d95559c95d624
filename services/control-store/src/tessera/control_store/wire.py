"""Protobuf wire format, for records assembled from bytes already serialized.

A serialized message followed by more serialized fields parses as one message,
so ``field(b"\\x0a", spec_bytes) + other_fields`` is a TaskRecord holding that
spec: the batched paths use this to avoid copying every record into a new
message just to serialize it again.
"""

from __future__ import annotations

from collections.abc import Iterable


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, data: bytes) -> bytes:
    """One length-delimited field: ``tag`` (its key, e.g. ``b"\\x0a"`` for field 1), the length, ``data``."""
    n = len(data)
    if n < 0x80:
        return tag + bytes((n,)) + data
    return tag + varint(n) + data


_TABLE_SIZE = 4096
_tables: dict[bytes, list[bytes]] = {}


def fields(tag: bytes, datas: Iterable[bytes], suffix: bytes = b"") -> list[bytes]:
    """``field(tag, d) + suffix`` for each of ``datas``: the batched form, with the key and
    length bytes of the usual sizes looked up in a table rather than computed per item."""
    table = _tables.get(tag)
    if table is None:
        table = _tables[tag] = [tag + varint(n) for n in range(_TABLE_SIZE)]
    return [table[len(d)] + d + suffix if len(d) < _TABLE_SIZE else field(tag, d) + suffix for d in datas]
