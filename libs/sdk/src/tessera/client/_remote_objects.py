"""The object-store client of a process that cannot map the store's arena (as Ray Client's drivers).

A driver on a laptop, in a notebook outside the cluster, or on the host of a
compose stack shares no memory with any node. Its puts and gets stream the
bytes over gRPC instead (``WriteObject`` / ``ReadObject``), in chunks checked
against their CRC-32C:

- a put sends the serialized value piece by piece, straight from the value's
  own buffers (a numpy array is never first joined into one bytes object);
- a get allocates one buffer of the object's size, writes each chunk into it at
  its offset and deserializes from it, so numpy arrays come back as read-only
  views of that buffer with no further copy. While any of them is alive, another
  get of the same object returns views of the same buffer without a round trip.

Small values go the way the mapped client sends them (owned here, batched).
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
from crc32c import crc32c

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.api.object_store.v1 import object_store_pb2_grpc as pb_grpc
from tessera.client._base import FOREVER_S, SERVICE, ObjectClientBase, _map_error
from tessera.client.objects import ObjectRef
from tessera.common import ids, rpc
from tessera.common.errors import DataLossError
from tessera.common.serialization import deserialize, serialize
from tessera.common.wire import decode_chunk, encode_write_chunk
from tessera.exceptions import GetTimeoutError

#: Bytes per streamed chunk, both ways.
CHUNK_BYTES = 4 * 2**20
#: A stream is given at least this rate when its deadline is set from its size.
MIN_RATE_BPS = 20e6


def arena_mappable(hello: pb.OpenSessionResponse) -> bool:
    """Whether this process can map the arena a store described in its OpenSession answer."""
    if hello.hostname and hello.hostname != socket.gethostname():
        return False
    return bool(hello.arena_path) and os.access(hello.arena_path, os.R_OK | os.W_OK)


def probe(address: str, *, timeout: float = 30.0) -> pb.OpenSessionResponse:
    """The OpenSession answer of the store at ``address`` (the session is closed again at once)."""
    with rpc.stream_channel(address) as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"no object store answered at {address} within {timeout:g}s") from None
        call = pb_grpc.ObjectStoreServiceStub(ch).OpenSession(pb.OpenSessionRequest(client_name="probe"),
                                                              timeout=timeout, metadata=rpc.trace_metadata())
        try:
            return next(iter(call))
        except grpc.RpcError as e:
            raise _map_error(e) from None
        finally:
            call.cancel()


class RemoteObjectStoreClient(ObjectClientBase):
    """A session with one node's object store whose arena this process does not map: bytes travel in gRPC."""

    def __init__(self, address: str, *, timeout: float = 30.0, name: str = "", durable: bool = False,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(address, timeout=timeout, name=name, durable=durable)
        self.chunk_bytes = chunk_bytes
        # buffers of objects read here that values still use: a get of one again returns views of it
        self._live: weakref.WeakValueDictionary[bytes, np.ndarray] = weakref.WeakValueDictionary()
        self._open()

    def _open(self, wait: float | None = None) -> None:
        """Open a session (small puts name it); nothing is mapped."""
        hello = self._open_grpc_session(wait)
        self.hostname = hello.hostname
        # the bulk streams, encoded and decoded by hand (tessera.common.wire): one copy of the bytes each way
        self._write_object = self._streams.stream_unary(
            f"/{SERVICE}/WriteObject", request_serializer=None, response_deserializer=pb.WriteObjectResponse.FromString)
        self._read_object = self._streams.unary_stream(
            f"/{SERVICE}/ReadObject", request_serializer=pb.ReadObjectRequest.SerializeToString,
            response_deserializer=None)

    def _close_session(self) -> None:
        self._session.cancel()
        self._streams.close()

    def _stream_timeout(self, size: int) -> float:
        return max(self.timeout, size / MIN_RATE_BPS)

    # ------------------------------------------------------------------ put

    def put(self, value: Any, *, owner: str = "", object_id: bytes | None = None) -> ObjectRef:
        """Store ``value``; large buffers are streamed to the store from their own memory.

        ``object_id`` names the object (a task's return value); by default a new id is drawn.
        """
        oid = ids.check_id("object_id", object_id) if object_id is not None else ids.new_id("object_id")
        return self.put_serialized(oid, serialize(value), owner=owner)

    def put_serialized(self, oid: bytes, ser: Any, *, owner: str = "") -> ObjectRef:
        """Store an already serialized value (``tessera.common.serialization.Serialized``) as ``oid``."""
        self._raise_flush_error()
        if ser.size <= self.inline_threshold:
            self._put_small(oid, ser.to_bytes(), owner)
            return ObjectRef(oid)
        size, pieces = ser.pieces()
        try:
            self._write_object(self._write_requests(oid, size, pieces, owner),
                               timeout=self._stream_timeout(size), metadata=rpc.trace_metadata())
        except grpc.RpcError as e:
            raise _map_error(e) from None
        return ObjectRef(oid)

    def _write_requests(self, oid: bytes, size: int, pieces: list[memoryview], owner: str) -> Iterator[bytes]:
        yield pb.WriteObjectRequest(header=pb.WriteObjectHeader(object_id=oid, size=size, owner=owner,
                                                                durable=self.durable)).SerializeToString()
        offset = 0
        for parts in _chunks(pieces, self.chunk_bytes):
            crc = 0
            for p in parts:
                crc = crc32c(p, crc)
            yield encode_write_chunk(offset, crc, parts)
            offset += sum(len(p) for p in parts)

    # ------------------------------------------------------------------ get

    def get(self, refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
        """The values of ``refs`` (one ref or a list), waiting up to ``timeout`` seconds (None: forever).

        Raises:
            GetTimeoutError: an object was not available in time.
        """
        items, single = self._get_args(refs)
        deadline = time.monotonic() + (timeout if timeout is not None else FOREVER_S)
        values = []
        for r in items:
            data = self.owned(r.id)
            if data is not None:
                values.append(deserialize(data))
                continue
            buf = self._live.get(r.id)
            if buf is None:
                buf = self._read(r.id, deadline, timeout)
            values.append(deserialize(memoryview(buf)))  # type: ignore[arg-type]
        return values[0] if single else values

    def _read(self, oid: bytes, deadline: float, timeout: float | None) -> np.ndarray:
        """The object's bytes in one new read-only buffer, each chunk written at its offset."""
        remaining = max(0.0, deadline - time.monotonic())  # 0: only if it is there now (as the mapped client)
        timeout_ms = max(1, int(remaining * 1000)) if timeout is not None else 0
        call_timeout = remaining + 5.0 if timeout is not None else FOREVER_S
        req = pb.ReadObjectRequest(object_id=oid, timeout_ms=timeout_ms, chunk_size=self.chunk_bytes)
        buf: np.ndarray | None = None
        written = 0
        try:
            for raw in self._read_object(req, timeout=call_timeout, metadata=rpc.trace_metadata()):
                total, offset, crc, _owner, data = decode_chunk(raw)
                if buf is None:
                    buf = np.empty(total, dtype=np.uint8)
                n = len(data)
                if offset != written or written + n > len(buf):
                    raise DataLossError(f"chunks of {oid.hex()} from {self.address} arrived out of order")
                if crc32c(data) != crc:
                    raise DataLossError(f"chunk at {offset} of {oid.hex()} from {self.address} failed its CRC check")
                buf[written : written + n] = np.frombuffer(data, dtype=np.uint8)
                written += n
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                # not there (yet) and unknown to the cluster: as for a mapped client, "not available in time"
                raise GetTimeoutError(e.details()) from None  # type: ignore[attr-defined]
            raise _map_error(e) from None
        if buf is None or written != len(buf):
            raise DataLossError(f"the stream of {oid.hex()} from {self.address} ended after {written} bytes")
        buf.flags.writeable = False  # values of the store are immutable, as the mapped client's views are
        self._live[oid] = buf
        return buf

    # ------------------------------------------------------------------ misc

    def close(self) -> None:
        """Send what is pending, then end the session."""
        self._stop_flusher()
        self._close_session()
        self._channel.close()


def _chunks(pieces: list[memoryview], size: int) -> Iterator[list[memoryview]]:
    """Consecutive ``pieces`` cut into chunks of ``size`` bytes (the last may be shorter), each chunk the
    list of views it is made of (nothing copied)."""
    parts: list[memoryview] = []
    n = 0
    for piece in pieces:
        pos = 0
        while pos < len(piece):
            take = min(size - n, len(piece) - pos)
            parts.append(piece[pos : pos + take])
            n += take
            pos += take
            if n == size:
                yield parts
                parts, n = [], 0
    if parts:
        yield parts
