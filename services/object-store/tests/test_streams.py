"""WriteObject and ReadObject against real object stores: two nodes (processes) with a control
store over a private nats-server and redis-server. Whole objects both ways, reads of objects
held by the other node, checksums, broken streams, pins and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from crc32c import crc32c

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.api.object_store.v1 import object_store_pb2_grpc as pb_grpc
from tessera.common import ids, procs
from tessera.common.rpc import health_status
from tessera.testing import nats_server, redis_server

MiB = 2**20


@dataclass
class Store:
    address: str
    channel: grpc.Channel
    stub: pb_grpc.ObjectStoreServiceStub


def _start(module: str, name: str, env: dict[str, str], log_dir: Path, started: list[subprocess.Popen[bytes]]) -> str:
    port = procs.free_port()
    p = procs.start([sys.executable, "-m", module], log_path=log_dir / f"{name}.log",
                    env={**env, "TESSERA_GRPC_PORT": str(port), "TESSERA_INSTANCE_ID": name})
    started.append(p)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while health_status(address, timeout=0.5) != "SERVING":
        if p.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{name} did not start:\n{(log_dir / f'{name}.log').read_text()[-3000:]}")
        time.sleep(0.1)
    return address


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Store]]:
    tmp = tmp_path_factory.mktemp("object-streams")
    started: list[subprocess.Popen[bytes]] = []
    with nats_server() as nats, redis_server() as redis:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
        cs_port = procs.free_port()
        env.update(TESSERA_NATS_URL=nats.url, TESSERA_REDIS_URLS=redis.url,
                   TESSERA_CONTROL_STORE_ADDRESS=f"127.0.0.1:{cs_port}", TESSERA_RUN_DIR=str(tmp / "run"),
                   TESSERA_HEARTBEAT_INTERVAL_S="0.5", TESSERA_SHUTDOWN_GRACE_S="1",
                   TESSERA_OBJECT_STORE_MEMORY=str(64 * MiB), OTEL_TRACES_SAMPLER="always_off")
        out: list[Store] = []
        try:
            p = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=tmp / "control-store.log",
                            env={**env, "TESSERA_GRPC_PORT": str(cs_port), "TESSERA_INSTANCE_ID": "control-store"})
            started.append(p)
            deadline = time.monotonic() + 60
            while health_status(f"127.0.0.1:{cs_port}", timeout=0.5) != "SERVING":
                assert p.poll() is None and time.monotonic() < deadline, "the control store did not start"
                time.sleep(0.1)
            for i in range(2):
                address = _start("tessera.object_store", f"object-store-{i}", env, tmp, started)
                ch = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MiB)])
                out.append(Store(address, ch, pb_grpc.ObjectStoreServiceStub(ch)))
            yield out
        finally:
            for s in out:
                s.channel.close()
            for proc in reversed(started):
                procs.stop(proc)


def _requests(oid: bytes, data: bytes, chunk: int, *, size: int | None = None, owner: str = "test",
              corrupt_at: int | None = None) -> Iterator[pb.WriteObjectRequest]:
    yield pb.WriteObjectRequest(header=pb.WriteObjectHeader(object_id=oid, size=len(data) if size is None else size,
                                                            owner=owner))
    for off in range(0, len(data), chunk):
        part = data[off : off + chunk]
        crc = crc32c(part) ^ (1 if off == corrupt_at else 0)
        yield pb.WriteObjectRequest(chunk=pb.WriteObjectChunk(offset=off, data=part, crc32c=crc))


def _read(store: Store, oid: bytes, *, chunk_size: int = 0, timeout_ms: int = 10_000) -> tuple[bytes, list[int]]:
    """The object's bytes and the size of each chunk; checks every chunk's CRC and offset."""
    parts: list[bytes] = []
    sizes: list[int] = []
    at = 0
    for c in store.stub.ReadObject(pb.ReadObjectRequest(object_id=oid, chunk_size=chunk_size, timeout_ms=timeout_ms),
                                   timeout=30):
        assert c.offset == at
        assert crc32c(c.data) == c.crc32c
        parts.append(c.data)
        sizes.append(len(c.data))
        at += len(c.data)
        total = c.total_size
    data = b"".join(parts)
    assert len(data) == total
    return data, sizes


def _used(store: Store) -> int:
    return int(store.stub.GetStats(pb.GetStatsRequest(), timeout=5).used)


def test_an_object_written_in_chunks_reads_back_whole(stores: list[Store]) -> None:
    s = stores[0]
    data = os.urandom(5 * MiB + 12_345)  # a short last chunk
    oid = ids.new_id("object_id")
    resp = s.stub.WriteObject(_requests(oid, data, MiB), timeout=30)
    assert resp.size == len(data)
    assert list(s.stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[oid]), timeout=5).present) == [True]
    got, sizes = _read(s, oid, chunk_size=2 * MiB)
    assert got == data
    assert sizes == [2 * MiB, 2 * MiB, MiB + 12_345]
    # a small one travels in one chunk
    small = b"tiny object"
    oid2 = ids.new_id("object_id")
    s.stub.WriteObject(_requests(oid2, small, 4), timeout=10)
    assert _read(s, oid2) == (small, [len(small)])


def test_a_read_on_another_node_pulls_the_object_first(stores: list[Store]) -> None:
    data = os.urandom(3 * MiB)
    oid = ids.new_id("object_id")
    stores[0].stub.WriteObject(_requests(oid, data, MiB), timeout=30)
    before = stores[1].stub.GetStats(pb.GetStatsRequest(), timeout=5).pulls
    got, _ = _read(stores[1], oid)
    assert got == data
    assert stores[1].stub.GetStats(pb.GetStatsRequest(), timeout=5).pulls == before + 1


def test_a_chunk_with_a_wrong_crc_is_refused_and_nothing_stays(stores: list[Store]) -> None:
    s = stores[0]
    data = os.urandom(3 * MiB)
    oid = ids.new_id("object_id")
    used = _used(s)
    with pytest.raises(grpc.RpcError) as err:
        s.stub.WriteObject(_requests(oid, data, MiB, corrupt_at=MiB), timeout=30)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "CRC" in err.value.details()
    assert list(s.stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[oid]), timeout=5).present) == [False]
    assert _used(s) == used
    s.stub.WriteObject(_requests(oid, data, MiB), timeout=30)  # the id is free again
    assert _read(s, oid)[0] == data


def test_a_stream_that_ends_short_or_overflows_is_refused(stores: list[Store]) -> None:
    s = stores[0]
    used = _used(s)
    oid = ids.new_id("object_id")
    with pytest.raises(grpc.RpcError) as err:
        s.stub.WriteObject(_requests(oid, os.urandom(MiB), 256 * 1024, size=2 * MiB), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended after 1048576 of 2097152 bytes" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        s.stub.WriteObject(_requests(oid, os.urandom(MiB), 256 * 1024, size=MiB - 1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(s.stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[oid]), timeout=5).present) == [False]
    assert _used(s) == used


def test_a_broken_write_stream_leaves_nothing(stores: list[Store]) -> None:
    s = stores[0]
    used = _used(s)
    oid = ids.new_id("object_id")
    data = os.urandom(4 * MiB)

    def broken() -> Iterator[pb.WriteObjectRequest]:
        for i, r in enumerate(_requests(oid, data, MiB)):
            if i == 3:  # the header and two chunks went out: the client dies here
                raise ConnectionResetError("the client went away")
            yield r

    with pytest.raises(grpc.RpcError) as err:
        s.stub.WriteObject(broken(), timeout=30)
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    deadline = time.monotonic() + 10
    while _used(s) != used:  # the store learns of the cancellation asynchronously
        assert time.monotonic() < deadline, "a broken write left its allocation behind"
        time.sleep(0.05)
    assert list(s.stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[oid]), timeout=5).present) == [False]
    s.stub.WriteObject(_requests(oid, data, MiB), timeout=30)  # nothing half-written holds the id
    assert _read(s, oid)[0] == data


def test_a_read_holds_a_pin_until_its_stream_ends(stores: list[Store]) -> None:
    s = stores[0]
    oid = ids.new_id("object_id")
    s.stub.WriteObject(_requests(oid, bytes(40 * MiB), 4 * MiB), timeout=30)
    # more chunks than HTTP/2 flow control lets the store send ahead: the stream stays open on its side
    stream = s.stub.ReadObject(pb.ReadObjectRequest(object_id=oid, chunk_size=256 * 1024), timeout=30)
    next(stream)  # reading has begun
    with pytest.raises(grpc.RpcError) as err:
        s.stub.DeleteObjects(pb.DeleteObjectsRequest(object_ids=[oid]), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in err.value.details()
    stream.cancel()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert s.stub.DeleteObjects(pb.DeleteObjectsRequest(object_ids=[oid]), timeout=5).deleted == 1
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() < deadline, e
            time.sleep(0.05)


def test_a_read_of_an_unknown_object_is_not_found_within_its_deadline(stores: list[Store]) -> None:
    oid = ids.new_id("object_id")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stores[0].stub.ReadObject(pb.ReadObjectRequest(object_id=oid, timeout_ms=300), timeout=5))
    took = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert oid.hex() in err.value.details()
    assert 0.25 < took < 3.0
    # with no timeout of its own, the call's deadline bounds the wait
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stores[0].stub.ReadObject(pb.ReadObjectRequest(object_id=oid), timeout=1.0))
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - t0 < 2.0


def test_bad_input_gets_a_precise_status_and_changes_nothing(stores: list[Store]) -> None:
    s = stores[0]
    used = _used(s)
    oid = ids.new_id("object_id")
    cases = [
        ([pb.WriteObjectRequest(chunk=pb.WriteObjectChunk(offset=0, data=b"x", crc32c=crc32c(b"x")))],
         "the first message must be the header"),
        ([], "the first message must be the header"),
        ([pb.WriteObjectRequest(header=pb.WriteObjectHeader(object_id=oid, size=0))], "size must be > 0"),
        ([pb.WriteObjectRequest(header=pb.WriteObjectHeader(object_id=b"short", size=10))], "object_id"),
        (list(_requests(oid, b"abc", 3))[:2] + [pb.WriteObjectRequest(header=pb.WriteObjectHeader(object_id=oid, size=3))],
         "only the first message may be a header"),
    ]
    for reqs, why in cases:
        with pytest.raises(grpc.RpcError) as err:
            s.stub.WriteObject(iter(reqs), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (why, err.value)
        assert why in err.value.details()
    raw_write = s.channel.stream_unary("/tessera.object_store.v1.ObjectStoreService/WriteObject",
                                       request_serializer=None,
                                       response_deserializer=pb.WriteObjectResponse.FromString)
    for garbage in (b"\x0a\xff", b"\x12\x05ab"):  # a header that does not parse; a chunk cut short
        with pytest.raises(grpc.RpcError) as err:
            raw_write(iter([garbage]), timeout=10)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS), err.value
    with pytest.raises(grpc.RpcError) as err:  # a gap between chunks
        s.stub.WriteObject(iter([pb.WriteObjectRequest(header=pb.WriteObjectHeader(object_id=oid, size=4)),
                                 pb.WriteObjectRequest(chunk=pb.WriteObjectChunk(offset=2, data=b"ab",
                                                                                 crc32c=crc32c(b"ab")))]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected the chunk at 0" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(s.stub.ReadObject(pb.ReadObjectRequest(object_id=b"short"), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(s.stub.ReadObject(pb.ReadObjectRequest(object_id=oid, chunk_size=64 * MiB), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in err.value.details()
    assert list(s.stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[oid]), timeout=5).present) == [False]
    assert _used(s) == used
    # an object that exists already cannot be written again
    s.stub.WriteObject(_requests(oid, b"first", 5), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        s.stub.WriteObject(_requests(oid, b"second", 6), timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _read(s, oid)[0] == b"first"
