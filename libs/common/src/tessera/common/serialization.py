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

import cloudpickle

from tessera.common.errors import InvalidArgumentError

MAGIC = b"TSR1"
ALIGN = 64
PAGE = 4096
#: Buffers at least this large are placed at the same offset within a page as their
#: source, so the copy runs at full memcpy speed (a misaligned page offset can make
#: it several times slower); each reserves up to one page of slack for that.
LARGE = 64 * 1024
_HEAD = struct.Struct("<4sIQ")
_ENTRY = struct.Struct("<QQ")


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


@dataclass
class Serialized:
    """An object ready to be written: its pickle stream and its raw buffers.

    ``size`` is what to allocate; the buffers' exact offsets are chosen when the
    destination's address is known (:meth:`write_into`) and recorded in the header.
    """

    meta: bytes
    buffers: list[memoryview]
    size: int

    def _layout(self, dst_addr: int | None) -> list[int]:
        pos = _align(_HEAD.size + _ENTRY.size * len(self.buffers) + len(self.meta))
        offsets = []
        for b in self.buffers:
            src = _address(b) if dst_addr is not None and b.nbytes >= LARGE else None
            if src is not None and dst_addr is not None:
                pos += (src - (dst_addr + pos)) % PAGE  # same offset within a page as the source
            offsets.append(pos)
            pos = _align(pos + b.nbytes)
        return offsets

    def write_into(self, dst: memoryview, *, dst_addr: int | None = None) -> None:
        """Copy the object into ``dst`` (at least ``size`` bytes): one memcpy per buffer.

        Args:
            dst_addr: the address of ``dst[0]``, if known: large buffers are then
                placed congruent to their source modulo the page size.
        """
        offsets = self._layout(dst_addr)
        head = self._header(offsets)
        dst[: len(head)] = head
        start = len(head)
        dst[start : start + len(self.meta)] = self.meta
        for off, buf in zip(offsets, self.buffers, strict=True):
            dst[off : off + buf.nbytes] = buf

    def _header(self, offsets: list[int]) -> bytearray:
        head = bytearray(_HEAD.pack(MAGIC, len(self.buffers), len(self.meta)))
        for off, buf in zip(offsets, self.buffers, strict=True):
            head += _ENTRY.pack(off, buf.nbytes)
        return head

    def pieces(self) -> tuple[int, list[memoryview]]:
        """The object as consecutive pieces (header and pickle stream, padding, each buffer) and their total size.

        For a writer that sends the object somewhere instead of copying it into one
        place: the buffers are the value's own memory, not copies. The total is at most
        ``size`` (no page slack is needed when no destination address is known).
        """
        offsets = self._layout(None)
        head = self._header(offsets)
        head += self.meta
        pieces = [memoryview(head)]
        pos = len(head)
        for off, buf in zip(offsets, self.buffers, strict=True):
            if off > pos:
                pieces.append(memoryview(bytes(off - pos)))
            pieces.append(buf)
            pos = off + buf.nbytes
        return pos, pieces

    def to_bytes(self) -> bytes:
        out = bytearray(self.size)
        self.write_into(memoryview(out))
        return bytes(out)


def _address(buf: memoryview) -> int | None:
    """The address of a contiguous buffer's first byte (None without numpy)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is installed wherever large buffers are
        return None
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def serialize(value: Any) -> Serialized:
    """Pickle ``value`` (protocol 5), keeping contiguous buffers out of band.

    Raises:
        InvalidArgumentError: the value cannot be pickled (the message says why).
    """
    raw: list[pickle.PickleBuffer] = []
    try:
        meta = pickle.dumps(value, protocol=5, buffer_callback=raw.append)
    except Exception:
        # Lambdas, closures and classes defined in __main__ pickle by value.
        raw.clear()
        try:
            meta = cloudpickle.dumps(value, protocol=5, buffer_callback=raw.append)
        except Exception as e:
            raise InvalidArgumentError(f"cannot serialize {type(value).__name__}: {e}") from e
    buffers: list[memoryview] = []
    for pb in raw:
        try:
            buffers.append(pb.raw())
        except BufferError:  # not contiguous: pickle it in band after all
            buffers.append(memoryview(bytes(pb)))
    pos = _align(_HEAD.size + _ENTRY.size * len(buffers) + len(meta))
    end = _HEAD.size + len(meta)
    for b in buffers:
        if b.nbytes >= LARGE:
            pos += PAGE  # slack for placing it page-congruent to its source
        end = pos + b.nbytes
        pos = _align(end)
    return Serialized(meta, buffers, end)


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
