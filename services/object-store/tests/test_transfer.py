"""Node-to-node pulls over the data sockets: real stores (arena, manager, node, TCP server and
client, and a real gRPC server for the PullObject fallback) in one process, on loopback.

The copies' directory is an in-memory :class:`Directory` shared by the stores of a test
(the control store's role); misbehaving holders are real TCP servers that speak the
protocol of :mod:`tessera.object_store.transfer` and then break it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc.aio
import pytest
from crc32c import crc32c

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.common import rpc
from tessera.common.config import Settings
from tessera.common.errors import (
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tessera.object_store import transfer as tp
from tessera.object_store.arena import Arena
from tessera.object_store.manager import ObjectManager
from tessera.object_store.node import Located, NodeObjectStore
from tessera.object_store.server import Peers
from tessera.object_store.servicer import ObjectStoreServicer
from tessera.object_store.transfer_net import TransferClient, TransferServer

MiB = 1024**2
SHM = Path("/dev/shm")


def oid_of(i: int) -> bytes:
    return i.to_bytes(20, "big")


@dataclass
class Copies:
    """The cluster's record of copies: object id -> {store address: (size, owner)}."""

    held: dict[bytes, dict[str, tuple[int, str]]] = field(default_factory=dict)
    transfer: dict[str, str] = field(default_factory=dict)  # store address -> data socket address
    forgotten: list[tuple[bytes, str]] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)  # peers whose records a failure made stale


class SharedDirectory:
    """One store's view of :class:`Copies` (the Directory protocol of node.py)."""

    def __init__(self, copies: Copies, address: str) -> None:
        self.copies = copies
        self.address = address

    async def add_locations(self, entries: list[tuple[bytes, int, str]]) -> None:
        for oid, size, owner in entries:
            self.copies.held.setdefault(oid, {})[self.address] = (size, owner)

    async def remove_locations(self, object_ids: list[bytes]) -> list[bytes]:
        lost = []
        for oid in object_ids:
            held = self.copies.held.get(oid, {})
            held.pop(self.address, None)
            if not held:
                lost.append(oid)
        return lost

    async def locate(self, object_id: bytes) -> Located:
        held = self.copies.held.get(object_id)
        if not held:
            return Located(False)
        peers = [a for a in held if a != self.address]
        size, owner = next(iter(held.values()))
        return Located(True, peers, size, owner, {a: self.copies.transfer[a] for a in peers
                                                  if a in self.copies.transfer})

    async def forget_copy(self, object_id: bytes, address: str) -> list[bytes]:
        self.copies.forgotten.append((object_id, address))
        return await SharedDirectory(self.copies, address).remove_locations([object_id])

    async def announce(self, kind: str, entries: list[tuple[bytes, int, str]]) -> None:
        pass

    def refresh(self, address: str) -> None:
        self.copies.refreshed.append(address)


@dataclass
class Store:
    node: NodeObjectStore
    server: TransferServer
    client: TransferClient
    grpc_server: grpc.aio.Server
    peers: Peers
    address: str

    def put(self, oid: bytes, data: bytes) -> None:
        self.node.put_inline(oid, data, "owner-1", "", False)

    async def get(self, oid: bytes, timeout_s: float = 30.0) -> bytes:
        session = uuid.uuid4().hex
        (loc,) = await self.node.get([oid], session, timeout_s)
        try:
            if loc.inline is not None:
                return loc.inline
            assert loc.offset is not None
            return bytes(self.node.manager.arena.view(loc.offset, loc.size))
        finally:
            self.node.manager.release(oid, session)


async def held(copies: Copies, oid: bytes, *stores: Store) -> None:
    """Wait until the stores' copies of ``oid`` are reported (their seals are reported in batches)."""
    for _ in range(1000):
        if all(s.address in copies.held.get(oid, {}) for s in stores):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{oid.hex()} was not reported by every store")


StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture
async def make_store(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    made: list[tuple[Store, Arena]] = []
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else tmp_path

    async def make(copies: Copies, *, token: str = "", client_token: str | None = None,
                   memory: int = 128 * MiB, streams: int = 4) -> Store:
        node_id = os.urandom(16)
        arena = Arena(base / f"tessera-test-arena-{uuid.uuid4().hex}", memory, reserve=False)
        holder: dict[str, NodeObjectStore] = {}
        manager = ObjectManager(arena, spill_dir=tmp_path / node_id.hex(), spill_capacity=1024 * MiB,
                                has_other_copy=lambda oid: holder["n"].has_other_copy(oid),
                                on_event=lambda kind, e: holder["n"].on_event(kind, e))
        grpc_server = grpc.aio.server()
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        address = f"127.0.0.1:{port}"
        peers = Peers(Settings(auth_token=token), node_id)  # type: ignore[arg-type]
        client = TransferClient(node_id, token=token if client_token is None else client_token,
                                chunk_bytes=MiB, timeout_s=5.0)
        node = holder["n"] = NodeObjectStore(manager, node_id, directory=SharedDirectory(copies, address),
                                             fetch=peers.fetch, inline_threshold=1024, chunk_bytes=MiB,
                                             transfer=client.fetch_range, streams_per_holder=streams)
        rpc.add_servicer(ObjectStoreServicer(node, arena_path=str(arena.path), arena_size=memory), grpc_server,
                         pb.DESCRIPTOR.services_by_name["ObjectStoreService"], raw_responses=["PullObject"])
        await grpc_server.start()
        server = TransferServer(node, arena.path, host="127.0.0.1", port=0, token=token, timeout_s=5.0)
        await server.start()
        node.start()
        copies.transfer[address] = f"127.0.0.1:{server.port}"
        store = Store(node, server, client, grpc_server, peers, address)
        made.append((store, arena))
        return store

    yield make
    for store, arena in made:
        await store.server.stop()
        await store.node.stop()
        await store.client.close()
        await store.peers.close()
        await store.grpc_server.stop(None)
        store.node.manager.close()
        arena.close()
        arena.unlink()


# ---------------------------------------------------------------------- misbehaving holders


@contextlib.asynccontextmanager
async def bad_holder(behaviour: str, data: bytes) -> AsyncIterator[str]:
    """A TCP server that answers a transfer request as a broken holder would; yields its address.

    ``corrupt``: one chunk's bytes differ from its CRC; ``close``: it closes after half the
    range; ``silent``: it reads the request and never answers.
    """
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(tp.REQUEST.size)
            oid_len, node_len, token_len, offset, length, chunk = tp.request_tail(head)
            await reader.readexactly(oid_len + node_len + token_len)
            if behaviour == "silent":  # until the requester gives up and closes
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(reader.read(), 60)
                return
            chunk = max(chunk, tp.MIN_CHUNK)
            writer.write(tp.encode_ok(tp.Header(len(data), offset, length, chunk, "owner-1")))
            part = data[offset:offset + length]
            for pos in range(0, length, chunk):
                piece = part[pos:pos + chunk]
                crc = crc32c(piece)
                if behaviour == "corrupt" and pos >= length // 2:
                    piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
                if behaviour == "close" and pos >= length // 2:
                    writer.write(tp.CRC.pack(crc) + piece[: len(piece) // 2])
                    await writer.drain()
                    return
                writer.write(tp.CRC.pack(crc) + piece)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------- tests


async def test_a_multi_mb_object_is_pulled_over_the_data_socket(make_store: StoreFactory) -> None:
    copies = Copies()
    a, b = await make_store(copies), await make_store(copies)
    data = os.urandom(24 * MiB + 12345)
    a.put(oid_of(1), data)
    await held(copies, oid_of(1), a)
    assert await b.get(oid_of(1)) == data
    assert (b.node.pulls, b.node.transfer_pulls, b.node.transfer_fallbacks) == (1, 1, 0)
    assert b.node.transfer_bytes_received == len(data)
    assert a.node.transfer_bytes_served == len(data)
    assert a.node.manager.stats()["pinned"] == 0  # the holder's pins were released
    # concurrent gets of one object share one pull
    a.put(oid_of(2), data[:5 * MiB])
    await held(copies, oid_of(2), a)
    got = await asyncio.gather(*(b.get(oid_of(2)) for _ in range(4)))
    assert all(g == data[:5 * MiB] for g in got)
    assert b.node.transfer_pulls == 2


async def test_a_large_object_is_split_over_streams_and_holders(make_store: StoreFactory) -> None:
    copies = Copies()
    a, b, c = await make_store(copies), await make_store(copies), await make_store(copies, streams=2)
    data = os.urandom(80 * MiB)
    a.put(oid_of(3), data)
    b.put(oid_of(3), data)
    await held(copies, oid_of(3), a, b)
    assert await c.get(oid_of(3)) == data
    assert c.node.transfer_pulls == 1
    served = (a.node.transfer_bytes_served, b.node.transfer_bytes_served)
    assert all(s > 0 for s in served), served  # both holders served a part
    assert sum(served) == len(data)
    assert a.server.served == 2 and b.server.served == 2  # two streams each


async def test_a_holder_failing_mid_pull_hands_its_part_to_another(make_store: StoreFactory) -> None:
    copies = Copies()
    b, c = await make_store(copies), await make_store(copies)
    data = os.urandom(8 * MiB)
    b.put(oid_of(4), data)
    await held(copies, oid_of(4), b)
    async with bad_holder("close", data) as broken:
        copies.held[oid_of(4)] = {"10.255.255.1:1": (len(data), "owner-1"), **copies.held[oid_of(4)]}
        copies.transfer["10.255.255.1:1"] = broken
        assert await c.get(oid_of(4)) == data
    assert (c.node.transfer_pulls, c.node.transfer_fallbacks) == (1, 0)
    assert b.node.transfer_bytes_served == len(data)  # its own part, then the broken holder's


async def test_data_sockets_failing_fall_back_to_grpc(make_store: StoreFactory) -> None:
    copies = Copies()
    a, b = await make_store(copies), await make_store(copies)
    data = os.urandom(6 * MiB)
    a.put(oid_of(5), data)
    await held(copies, oid_of(5), a)
    async with bad_holder("close", data) as broken:
        copies.transfer[a.address] = broken  # a's gRPC is fine, its data socket is not
        assert await b.get(oid_of(5)) == data
    assert (b.node.pulls, b.node.transfer_pulls, b.node.transfer_fallbacks) == (1, 0, 1)
    assert not copies.forgotten  # a still has its copy: only its data socket failed
    assert copies.refreshed == [a.address]  # its record is read again next time


async def test_a_corrupted_chunk_is_refused_and_nothing_is_left(make_store: StoreFactory) -> None:
    copies = Copies()
    b = await make_store(copies)
    data = os.urandom(4 * MiB)
    dest = bytearray(len(data))
    async with bad_holder("corrupt", data) as broken:
        with pytest.raises(DataLossError, match="failed its CRC check"):
            await b.client.fetch_range(broken, oid_of(6), 0, memoryview(dest), len(data))
        # through the node: no holder gives good bytes, gRPC cannot reach the holder either
        copies.held[oid_of(6)] = {"127.0.0.1:1": (len(data), "owner-1")}
        copies.transfer["127.0.0.1:1"] = broken
        with pytest.raises(DeadlineExceededError):
            await b.get(oid_of(6), timeout_s=2.0)
    assert b.node.manager.get_entry(oid_of(6)) is None  # aborted, not half-sealed
    assert b.node.transfer_fallbacks >= 1 and b.node.transfer_pulls == 0


async def test_a_holder_closing_or_going_silent_fails_the_range(make_store: StoreFactory) -> None:
    b = await make_store(Copies())
    data = os.urandom(2 * MiB)
    dest = memoryview(bytearray(len(data)))
    async with bad_holder("close", data) as broken:
        with pytest.raises(UnavailableError, match="closed the connection"):
            await b.client.fetch_range(broken, oid_of(7), 0, dest, len(data))
    b.client.timeout_s = 0.5
    async with bad_holder("silent", data) as silent:
        with pytest.raises(UnavailableError, match="timed out"):
            await asyncio.wait_for(b.client.fetch_range(silent, oid_of(7), 0, dest, len(data)), 10)
    with pytest.raises(UnavailableError, match="cannot connect"):
        await b.client.fetch_range("127.0.0.1:1", oid_of(7), 0, dest, len(data))
    with pytest.raises(InvalidArgumentError, match="bad data address"):
        await b.client.fetch_range("nowhere", oid_of(7), 0, dest, len(data))


async def test_stopping_the_node_cuts_a_pull_in_progress_and_aborts_it(make_store: StoreFactory) -> None:
    copies = Copies()
    b = await make_store(copies)
    data = os.urandom(2 * MiB)
    async with bad_holder("silent", data) as silent:
        copies.held[oid_of(13)] = {"127.0.0.1:1": (len(data), "owner-1")}
        copies.transfer["127.0.0.1:1"] = silent
        get = asyncio.create_task(b.get(oid_of(13), timeout_s=30))
        for _ in range(200):  # until the pull has allocated the object and waits on the holder
            if b.node.manager.get_entry(oid_of(13)) is not None:
                break
            await asyncio.sleep(0.01)
        assert b.node.manager.get_entry(oid_of(13)) is not None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.node.stop()  # cancels the pull: its socket is shut, its thread ends, the object is aborted
        assert loop.time() - t0 < 3.0  # well before the 5 s socket timeout
        assert b.node.manager.get_entry(oid_of(13)) is None
        get.cancel()
        with contextlib.suppress(asyncio.CancelledError, DeadlineExceededError):
            await get


async def test_freeing_an_object_cuts_its_pull_in_progress(make_store: StoreFactory) -> None:
    copies = Copies()
    b = await make_store(copies)
    data = os.urandom(2 * MiB)
    async with bad_holder("silent", data) as silent:
        copies.held[oid_of(14)] = {"127.0.0.1:1": (len(data), "owner-1")}
        copies.transfer["127.0.0.1:1"] = silent
        get = asyncio.create_task(b.get(oid_of(14), timeout_s=30))
        for _ in range(200):
            if b.node.manager.get_entry(oid_of(14)) is not None:
                break
            await asyncio.sleep(0.01)
        assert b.node.manager.get_entry(oid_of(14)) is not None
        b.node.free([oid_of(14)])
        with pytest.raises(NotFoundError, match="was freed"):
            await asyncio.wait_for(get, 3.0)  # at once, not after the holder's 5 s timeout
        for _ in range(300):  # the cancelled pull aborts its object once its thread has stopped
            if b.node.manager.get_entry(oid_of(14)) is None:
                break
            await asyncio.sleep(0.01)
        assert b.node.manager.get_entry(oid_of(14)) is None


async def test_a_wrong_token_is_refused(make_store: StoreFactory) -> None:
    copies = Copies()
    a = await make_store(copies, token="s3cret")
    data = os.urandom(3 * MiB)
    a.put(oid_of(8), data)
    dest = bytearray(len(data))
    address = f"127.0.0.1:{a.server.port}"
    for wrong in ("", "guess"):
        intruder = TransferClient(os.urandom(16), token=wrong, chunk_bytes=MiB, timeout_s=5.0)
        with pytest.raises(tp.UnauthenticatedError, match="invalid cluster token"):
            await intruder.fetch_range(address, oid_of(8), 0, memoryview(dest), len(data))
        await intruder.close()
    assert a.node.transfer_bytes_served == 0 and not any(dest)
    await a.client.fetch_range(address, oid_of(8), 0, memoryview(dest), len(data))  # its own token works
    assert bytes(dest) == data


async def test_bad_requests_get_precise_refusals(make_store: StoreFactory) -> None:
    a = await make_store(Copies())
    a.put(oid_of(9), os.urandom(MiB))
    address = f"127.0.0.1:{a.server.port}"
    dest = memoryview(bytearray(MiB))
    with pytest.raises(NotFoundError, match="not in this store"):
        await a.client.fetch_range(address, oid_of(10), 0, dest, MiB)
    with pytest.raises(InvalidArgumentError, match="outside object"):
        await a.client.fetch_range(address, oid_of(9), 1, dest, MiB)

    def raw(frame: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", a.server.port), timeout=5) as s:
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def status(reply: bytes) -> tuple[str, str]:
        _, _, code, n, *_ = tp.RESPONSE.unpack(reply[:tp.RESPONSE.size])
        return tp.STATUSES[code], reply[tp.RESPONSE.size:tp.RESPONSE.size + n].decode()

    loop = asyncio.get_running_loop()
    assert status(await loop.run_in_executor(None, raw, b"GET / HTTP/1.1\r\n\r\n" + bytes(20))) == \
        ("INVALID_ARGUMENT", "not a transfer request (bad magic)")
    short_id = tp.REQUEST.pack(tp.MAGIC, tp.VERSION, 3, 0, 0, 0, 10, MiB) + b"abc"
    code, message = status(await loop.run_in_executor(None, raw, short_id))
    assert code == "INVALID_ARGUMENT" and "object_id" in message
    truncated = tp.REQUEST.pack(tp.MAGIC, tp.VERSION, 20, 0, 0, 0, 10, MiB) + b"abc"
    code, message = status(await loop.run_in_executor(None, raw, truncated))
    assert code == "INVALID_ARGUMENT" and "closed the connection" in message
    newer = tp.REQUEST.pack(tp.MAGIC, tp.VERSION + 1, 20, 0, 0, 0, 10, MiB) + oid_of(9)
    assert status(await loop.run_in_executor(None, raw, newer))[0] == "FAILED_PRECONDITION"
    assert a.node.manager.stats()["pinned"] == 0 and a.node.transfer_bytes_served == 0


async def test_a_spilled_object_is_restored_and_served(make_store: StoreFactory) -> None:
    copies = Copies()
    a, b = await make_store(copies, memory=16 * MiB), await make_store(copies)
    first, second = os.urandom(10 * MiB), os.urandom(10 * MiB)
    a.put(oid_of(11), first)
    a.put(oid_of(12), second)  # no room for both: the first is spilled
    await held(copies, oid_of(12), a)
    entry = a.node.manager.get_entry(oid_of(11))
    assert entry is not None and entry.state == "spilled"
    assert await b.get(oid_of(11)) == first
    assert a.node.manager.restores == 1 and b.node.transfer_pulls == 1


def test_split_range_covers_the_whole_range() -> None:
    for size, parts in [(1, 4), (10, 3), (80 * MiB, 4), (7, 7)]:
        out = tp.split_range(size, parts)
        assert out[0][0] == 0 and out[-1][1] == size
        assert all(s < e for s, e in out)
        assert all(out[i][1] == out[i + 1][0] for i in range(len(out) - 1))
        assert len(out) == min(parts, size)


def test_request_frames_round_trip_and_check_their_fields() -> None:
    req = tp.Request(oid_of(1), 5, 100, os.urandom(16), "tok", MiB)
    frame = tp.encode_request(req)
    head = frame[:tp.REQUEST.size]
    assert tp.decode_request(head, frame[tp.REQUEST.size:]) == req
    with pytest.raises(InvalidArgumentError, match="truncated"):
        tp.decode_request(head, frame[tp.REQUEST.size:-1])
    zero = tp.encode_request(tp.Request(oid_of(1), 0, 0, b"", "", MiB))
    with pytest.raises(InvalidArgumentError, match="at least one byte"):
        tp.decode_request(zero[:tp.REQUEST.size], zero[tp.REQUEST.size:])
    with pytest.raises(InvalidArgumentError, match="longer than"):
        tp.encode_request(tp.Request(oid_of(1), 0, 1, b"", "x" * (tp.MAX_TOKEN + 1), MiB))
