"""The hand-written chunk encoding is protobuf's PullObjectResponse, both ways."""

from __future__ import annotations

import os

import pytest

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.common.errors import DataLossError
from tessera.common.wire import decode_chunk, decode_write_chunk, encode_chunk, encode_write_chunk


@pytest.mark.parametrize("total,offset,crc,owner,size", [
    (1, 0, 0, "", 1), (123_456_789, 4096, 0xDEADBEEF, "owner-x", 5000), (2**40, 2**39, 1, "ü", 0),
])
def test_round_trip_through_protobuf(total: int, offset: int, crc: int, owner: str, size: int) -> None:
    data = os.urandom(size)
    raw = encode_chunk(total, offset, crc, owner, memoryview(data))
    m = pb.PullObjectResponse.FromString(raw)
    assert (m.total_size, m.offset, m.crc32c, m.owner, m.data) == (total, offset, crc, owner, data)
    back = pb.PullObjectResponse(total_size=total, offset=offset, crc32c=crc, owner=owner, data=data)
    t, o, c, w, d = decode_chunk(back.SerializeToString())
    assert (t, o, c, w, bytes(d)) == (total, offset, crc, owner, data)


def test_truncated_chunk_is_data_loss() -> None:
    raw = encode_chunk(10, 0, 5, "", memoryview(b"0123456789"))
    with pytest.raises(DataLossError):
        decode_chunk(raw[:-3])


@pytest.mark.parametrize("offset,crc,sizes", [(0, 0, [1]), (4096, 0xDEADBEEF, [3, 0, 70_000]), (2**40, 1, [])])
def test_write_chunk_is_a_write_object_request(offset: int, crc: int, sizes: list[int]) -> None:
    parts = [os.urandom(n) for n in sizes]
    raw = encode_write_chunk(offset, crc, [memoryview(p) for p in parts])
    m = pb.WriteObjectRequest.FromString(raw)
    assert m.WhichOneof("part") == "chunk"
    assert (m.chunk.offset, m.chunk.crc32c, m.chunk.data) == (offset, crc, b"".join(parts))
    got = decode_write_chunk(raw)
    assert got is not None and (got[0], got[1], bytes(got[2])) == (offset, crc, b"".join(parts))
    # what protobuf itself encodes reads the same way
    again = decode_write_chunk(m.SerializeToString())
    assert again is not None and bytes(again[2]) == b"".join(parts)


def test_a_header_is_not_a_chunk_and_truncation_is_data_loss() -> None:
    header = pb.WriteObjectRequest(header=pb.WriteObjectHeader(object_id=b"x" * 20, size=5)).SerializeToString()
    assert decode_write_chunk(header) is None
    raw = encode_write_chunk(7, 9, [memoryview(b"abcdef")])
    with pytest.raises(DataLossError):
        decode_write_chunk(raw[:-1])
