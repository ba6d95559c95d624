"""The byte layout of an object: pickle protocol 5 with out-of-band buffers.

Large buffers (numpy arrays, bytes-like objects wrapped in PickleBuffer) never
pass through the pickle stream: they are laid out after it, 64-byte aligned, so
a reader can hand them to ``pickle.loads`` as views of shared memory (zero copy)
and a writer can copy each straight into place.

Layout (little-endian)::

    magic "TSR1" | u32 n_buffers | u64 meta_len | n x (u64 offset, u64 length) | meta | pad | buf0 | pad | buf1 ...
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tessera.common.errors import InvalidArgumentError

MAGIC = b"TSR1"
ALIGN = 64
_HEAD = struct.Struct("<4sIQ")
_ENTRY = struct.Struct("<QQ")


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


@dataclass
class Serialized:
    """An object ready to be written: its pickle stream and its raw buffers."""

    meta: bytes
    buffers: list[memoryview]
    offsets: list[int]
    size: int

    def write_into(self, dst: memoryview) -> None:
        """Copy the object into ``dst`` (at least ``size`` bytes): one memcpy per buffer."""
        n = len(self.buffers)
        head = bytearray(_HEAD.pack(MAGIC, n, len(self.meta)))
        for off, buf in zip(self.offsets, self.buffers, strict=True):
            head += _ENTRY.pack(off, buf.nbytes)
        dst[: len(head)] = head
        start = len(head)
        dst[start : start + len(self.meta)] = self.meta
        for off, buf in zip(self.offsets, self.buffers, strict=True):
            dst[off : off + buf.nbytes] = buf

    def to_bytes(self) -> bytes:
        out = bytearray(self.size)
        self.write_into(memoryview(out))
        return bytes(out)


def serialize(value: Any) -> Serialized:
    """Pickle ``value`` (protocol 5), keeping contiguous buffers out of band.

    Raises:
        InvalidArgumentError: the value cannot be pickled (the message says why).
    """
    raw: list[pickle.PickleBuffer] = []
    try:
        meta = pickle.dumps(value, protocol=5, buffer_callback=raw.append)
    except Exception as e:
        raise InvalidArgumentError(f"cannot serialize {type(value).__name__}: {e}") from e
    buffers: list[memoryview] = []
    for pb in raw:
        try:
            buffers.append(pb.raw())
        except BufferError:  # not contiguous: pickle it in band after all
            buffers.append(memoryview(bytes(pb)))
    pos = _align(_HEAD.size + _ENTRY.size * len(buffers) + len(meta))
    offsets = []
    for b in buffers:
        offsets.append(pos)
        pos = _align(pos + b.nbytes)
    size = offsets[-1] + buffers[-1].nbytes if buffers else _HEAD.size + len(meta)
    return Serialized(meta, buffers, offsets, size)


def deserialize(data: memoryview | bytes, *, wrap: Callable[[memoryview], Any] | None = None) -> Any:
    """Rebuild a value; its buffers are views of ``data`` (zero copy).

    ``wrap`` may turn each buffer view into the object handed to pickle (e.g. an
    anchor whose lifetime tells the caller when the views are no longer used).
    """
    mv = memoryview(data)
    if len(mv) < _HEAD.size:
        raise InvalidArgumentError(f"object of {len(mv)} bytes is too short to be a Tessera object")
    magic, n, meta_len = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise InvalidArgumentError("not a Tessera object (bad magic)")
    pos = _HEAD.size
    bufs = []
    for _ in range(n):
        off, length = _ENTRY.unpack_from(mv, pos)
        pos += _ENTRY.size
        if off + length > len(mv):
            raise InvalidArgumentError("corrupt object: a buffer lies past its end")
        view = mv[off : off + length]
        bufs.append(wrap(view) if wrap else view)
    meta = mv[pos : pos + meta_len]
    return pickle.loads(meta, buffers=bufs)
