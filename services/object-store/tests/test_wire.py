"""The hand-written chunk encoding is protobuf's PullObjectResponse, both ways."""

from __future__ import annotations

import os

import pytest

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.common.errors import DataLossError
from tessera.object_store.wire import decode_chunk, encode_chunk


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
