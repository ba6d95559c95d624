"""The local fast path: a real object store (with a real control store, NATS and Redis) over its Unix socket."""

from __future__ import annotations

import mmap
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.api.object_store.v1 import object_store_pb2_grpc as pb_grpc
from tessera.client import objects
from tessera.client._local import LocalConnection
from tessera.client.objects import ObjectRef, ObjectStoreClient
from tessera.common import ids, procs
from tessera.common import localwire as lw
from tessera.common.errors import AlreadyExistsError, DeadlineExceededError, FailedPreconditionError
from tessera.common.rpc import health_status
from tessera.common.serialization import serialize
from tessera.testing import NatsServer, RedisServer, redis_server

MiB = 2**20
TOKEN = "local-path-test-token"


@dataclass
class Store:
    """One ``python -m tessera.object_store`` process."""

    address: str
    socket_path: str
    arena_path: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stub(self) -> tuple[grpc.Channel, pb_grpc.ObjectStoreServiceStub]:
        ch = grpc.insecure_channel(self.address)
        return ch, pb_grpc.ObjectStoreServiceStub(ch)

    def stats(self, token: str = "") -> pb.GetStatsResponse:
        ch, stub = self.stub()
        with ch:
            md = [("authorization", f"Bearer {token}")] if token else None
            return stub.GetStats(pb.GetStatsRequest(), timeout=10, metadata=md)

    def connect(self, name: str = "test", token: str = "") -> LocalConnection:
        return LocalConnection(self.socket_path, token=token, name=name, timeout=10)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_HEARTBEAT_INTERVAL_S="0.5", TESSERA_SHUTDOWN_GRACE_S="1", TESSERA_LOG_LEVEL="INFO",
               OTEL_TRACES_SAMPLER="always_off", **extra)
    return env


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if health_status(address, timeout=0.5) == "SERVING":
            return
        time.sleep(0.1)
    raise AssertionError(f"not SERVING within {timeout:g}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def _redis() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture(scope="module")
def _cluster(nats_srv: NatsServer, _redis: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list[subprocess.Popen[bytes]]]]:
    """A control store; the stores of the tests join it. Everything started is stopped at the end."""
    d = tmp_path_factory.mktemp("local")
    port = procs.free_port()
    address = f"127.0.0.1:{port}"
    log_path = d / "control-store.log"
    started: list[subprocess.Popen[bytes]] = []
    try:
        cs = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=log_path,
                         env=_env(TESSERA_NATS_URL=nats_srv.url, TESSERA_REDIS_URLS=_redis.url,
                                  TESSERA_GRPC_PORT=str(port), TESSERA_CONTROL_STORE_ADDRESS=address,
                                  TESSERA_INSTANCE_ID="cs-local"))
        started.append(cs)
        _wait_serving(address, cs, log_path)
        yield address, d, started
    finally:
        for p in reversed(started):
            procs.stop(p, timeout=10)


def _start_store(cluster: tuple[str, Path, list[subprocess.Popen[bytes]]], nats_url: str, name: str,
                 **extra: str) -> Store:
    cs_address, d, started = cluster
    port = procs.free_port()
    arena_dir = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else d
    log_path = d / f"{name}.log"
    node_id = ids.new_id("node_id").hex()
    proc = procs.start([sys.executable, "-m", "tessera.object_store"], log_path=log_path,
                       env=_env(TESSERA_NATS_URL=nats_url, TESSERA_CONTROL_STORE_ADDRESS=cs_address,
                                TESSERA_GRPC_PORT=str(port), TESSERA_NODE_ID=node_id, TESSERA_RUN_DIR=str(d / name),
                                TESSERA_OBJECT_STORE_ARENA_DIR=str(arena_dir),
                                TESSERA_OBJECT_STORE_MEMORY=str(64 * MiB), TESSERA_OBJECT_STORE_PREFAULT="false",
                                TESSERA_OBJECT_STORE_SPILL_DIR=str(d / name / "spill"), **extra))
    started.append(proc)
    address = f"127.0.0.1:{port}"
    token = extra.get("TESSERA_AUTH_TOKEN", "")
    deadline = time.monotonic() + 60
    while True:  # (health answers without the token; the session needs it)
        if proc.poll() is not None:
            raise AssertionError(f"store exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        ch = grpc.insecure_channel(address)
        try:
            md = [("authorization", f"Bearer {token}")] if token else None
            call = pb_grpc.ObjectStoreServiceStub(ch).OpenSession(pb.OpenSessionRequest(client_name="probe"),
                                                                  metadata=md, timeout=2)
            hello = next(iter(call))
            call.cancel()
            if hello.local_socket:
                return Store(address, hello.local_socket, hello.arena_path, proc, log_path)
        except grpc.RpcError:
            pass
        finally:
            ch.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"the store never advertised its socket:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def store(_cluster: tuple[str, Path, list[subprocess.Popen[bytes]]], nats_srv: NatsServer) -> Store:
    return _start_store(_cluster, nats_srv.url, "store")


@pytest.fixture(scope="module")
def auth_store(_cluster: tuple[str, Path, list[subprocess.Popen[bytes]]], nats_srv: NatsServer) -> Store:
    return _start_store(_cluster, nats_srv.url, "auth-store", TESSERA_AUTH_TOKEN=TOKEN)


@pytest.fixture
def arena(store: Store) -> Iterator[mmap.mmap]:
    fd = os.open(store.arena_path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 64 * MiB, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    yield m
    m.close()


def _wait_for(pred: object, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout:g}s: {what}")


def _create_sealed(conn: LocalConnection, arena: mmap.mmap, data: bytes) -> tuple[bytes, int]:
    oid = ids.new_id("object_id")
    off = lw.parse_offset(conn.call(lw.CREATE, lw.create_body(oid, len(data), "me"), timeout=10))
    arena[off : off + len(data)] = data
    conn.call(lw.SEAL, oid, timeout=10)
    return oid, off


# ---------------------------------------------------------------------- the protocol


def test_create_seal_get_release_through_the_socket(store: Store, arena: mmap.mmap) -> None:
    data = os.urandom(1 * MiB)
    with_writer, reader = store.connect("writer"), store.connect("reader")
    try:
        assert with_writer.welcome.arena_path == store.arena_path
        assert with_writer.welcome.session_id != reader.welcome.session_id
        oid, off = _create_sealed(with_writer, arena, data)
        pinned_before = store.stats().pinned
        (loc,) = lw.parse_located(reader.call(lw.GET, lw.get_body([oid], 1000), timeout=10))
        assert (loc.object_id, loc.offset, loc.size, loc.owner) == (oid, off, len(data), "me")
        assert arena[loc.offset : loc.offset + loc.size] == data
        assert store.stats().pinned == pinned_before + len(data)
        # a release rides on the next request
        reader.call(lw.RELEASE, releases=[oid], timeout=10)
        assert store.stats().pinned == pinned_before
        # small objects come back inline, unpinned
        small = os.urandom(100)
        sid, _ = _create_sealed(with_writer, arena, small)
        (loc,) = lw.parse_located(reader.call(lw.GET, lw.get_body([sid], 1000), timeout=10))
        assert loc.inline == small and loc.offset is None
    finally:
        with_writer.close()
        reader.close()


def test_abort_frees_a_create_and_errors_keep_the_session(store: Store, arena: mmap.mmap) -> None:
    conn = store.connect()
    try:
        oid = ids.new_id("object_id")
        conn.call(lw.CREATE, lw.create_body(oid, 2 * MiB, ""), timeout=10)
        with pytest.raises(AlreadyExistsError, match=oid.hex()):
            conn.call(lw.CREATE, lw.create_body(oid, 2 * MiB, ""), timeout=10)
        conn.call(lw.ABORT, oid, timeout=10)
        with pytest.raises(DeadlineExceededError, match="not available within"):
            conn.call(lw.GET, lw.get_body([oid], 100), timeout=10)
        sealed, _ = _create_sealed(conn, arena, b"x" * 200_000)  # the session still works
        with pytest.raises(FailedPreconditionError, match="already sealed"):
            conn.call(lw.SEAL, sealed, timeout=10)
    finally:
        conn.close()


def test_a_get_waits_for_the_seal(store: Store, arena: mmap.mmap) -> None:
    writer, reader = store.connect("writer"), store.connect("reader")
    try:
        oid = ids.new_id("object_id")
        off = lw.parse_offset(writer.call(lw.CREATE, lw.create_body(oid, MiB, ""), timeout=10))
        got: list[list[lw.Located]] = []
        t = threading.Thread(target=lambda: got.append(
            lw.parse_located(reader.call(lw.GET, lw.get_body([oid], 10_000), timeout=15))))
        t.start()
        time.sleep(0.3)
        assert not got, "the get answered before the object was sealed"
        arena[off : off + MiB] = b"\x07" * MiB
        writer.call(lw.SEAL, oid, timeout=10)
        t.join(10)
        assert got and got[0][0].offset == off
    finally:
        writer.close()
        reader.close()


def test_closing_the_connection_releases_pins_and_aborts_creates(store: Store, arena: mmap.mmap) -> None:
    writer = store.connect("writer")
    try:
        oid, _ = _create_sealed(writer, arena, os.urandom(MiB))
        base = store.stats().pinned
        reader = store.connect("reader")
        reader.call(lw.GET, lw.get_body([oid], 1000), timeout=10)
        reader.call(lw.GET, lw.get_body([oid], 1000), timeout=10)  # pinned twice by one session
        left = ids.new_id("object_id")
        reader.call(lw.CREATE, lw.create_body(left, MiB, ""), timeout=10)
        assert store.stats().pinned == base + MiB
        reader.close()
        _wait_for(lambda: store.stats().pinned == base, "pins released when the session's socket closed")
        # the unsealed create was aborted: its id can be created again
        writer.call(lw.CREATE, lw.create_body(left, MiB, ""), timeout=10)
    finally:
        writer.close()


def _raw(store: Store) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(store.socket_path)
    return s


def _reply(s: socket.socket) -> tuple[lw.Header, bytes]:
    data = b""
    while True:
        if len(data) >= lw.HEADER.size:
            h = lw.parse_header(data)
            if len(data) >= lw.HEADER.size + h.length:
                return h, data[lw.HEADER.size : lw.HEADER.size + h.length]
        chunk = s.recv(65536)
        assert chunk, "the store closed the connection without an answer"
        data += chunk


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _hello(s: socket.socket, token: str = "") -> None:
    s.sendall(lw.frame(lw.HELLO, 1, lw.hello_body(token, "raw")))
    h, _ = _reply(s)
    assert h.op == lw.HELLO | lw.REPLY


@pytest.mark.parametrize(("hello", "frame", "message"), [
    (False, lw.frame(lw.GET, 1, lw.get_body([b"\x01" * 20], 0)), "the first frame must be a HELLO"),
    (True, lw.frame(99, 2, b""), "unknown op 99"),
    (True, struct.pack("<BBHII", lw.GET, 0, 0, 2, lw.MAX_BODY + 1), "over the"),
    (True, lw.frame(lw.CREATE, 2, b"\x00" * 10), "CREATE body is 10 bytes"),
    (True, lw.frame(lw.GET, 2, struct.pack("<II", 0, 3) + b"\x00" * 20), "GET of 3 objects"),
    (True, lw.frame(lw.HELLO, 2, lw.hello_body("", "again")), "HELLO was sent twice"),
    (True, struct.pack("<BBHII", lw.RELEASE, 0, 5, 2, 20), "announces 5 releases"),
], ids=["no-hello", "unknown-op", "oversized", "short-create", "get-count", "second-hello", "releases"])
def test_bad_frames_are_refused_and_the_connection_closed(store: Store, hello: bool, frame: bytes,
                                                          message: str) -> None:
    s = _raw(store)
    try:
        if hello:
            _hello(s)
        s.sendall(frame + b"\x00" * 20 if frame[:1] == bytes([lw.RELEASE]) else frame)
        h, body = _reply(s)
        assert h.op == lw.ERROR
        code, text = lw.parse_error(memoryview(body))
        assert code == "INVALID_ARGUMENT" and message in text, text
        assert _closed(s)
    finally:
        s.close()


def test_a_bad_frame_changes_nothing(store: Store) -> None:
    """A frame is checked whole before anything in it is done: a bad tail undoes its valid head."""
    oid, other = ids.new_id("object_id"), ids.new_id("object_id")
    conn = store.connect()
    try:
        for body, op in ((lw.create_body(oid, 16, "") + b"junk", lw.CREATE),  # a valid CREATE, then 4 bytes too many
                         (lw.put_body([(oid, b"a", ""), (other, b"b", "")])[:-1], lw.PUT)):  # the 2nd object cut
            s = _raw(store)
            try:
                _hello(s)
                s.sendall(lw.frame(op, 2, body))
                h, text = _reply(s)
                assert h.op == lw.ERROR and _closed(s), text
            finally:
                s.close()
            # nothing was created: the id is free
            conn.call(lw.CREATE, lw.create_body(oid, 16, ""), timeout=10)
            conn.call(lw.ABORT, oid, timeout=10)
    finally:
        conn.close()


# ---------------------------------------------------------------------- the client


def test_the_client_moves_its_session_to_the_socket(store: Store) -> None:
    with ObjectStoreClient(store.address, name="a") as a, ObjectStoreClient(store.address, name="b") as b:
        assert a.transport == "socket" and b.transport == "socket"
        x = np.arange(2 * MiB // 8, dtype=np.float64)
        ref = a.put(x)
        v = b.get(ref, timeout=10)
        assert np.array_equal(v, x) and np.shares_memory(v, b._arena)
        small = {"k": [1, 2, 3]}
        sref = a.put(small)
        assert b.get(sref, timeout=10) == small  # sent by a's batch, over the socket
        pinned = store.stats().pinned
        assert pinned >= x.nbytes  # b's view pins the object
        del v
        b._flush_releases()
        assert store.stats().pinned < pinned - x.nbytes + 4096  # (the serialized header aside)


def test_releases_ride_on_the_next_create(store: Store) -> None:
    import gc

    with ObjectStoreClient(store.address, name="a") as a:
        ref = a.put(np.ones(2 * MiB // 8))
        pinned = store.stats().pinned
        v = a.get(ref, timeout=10)
        assert store.stats().pinned >= pinned + 2 * MiB
        del v
        gc.collect()
        assert store.stats().pinned >= pinned + 2 * MiB  # (dropped, not yet released: no call of its own)
        assert a._local is not None
        sent = a._local._next_id
        a.put(np.ones(MiB // 8))  # the create carries the release
        assert a._local._next_id - sent == 2, "a put is a create and a seal, the release riding on the create"
        assert store.stats().pinned == pinned


def test_a_dropped_view_is_taken_back_without_a_call_until_its_object_is_freed(store: Store) -> None:
    import gc

    from tessera.exceptions import ObjectFreedError

    with ObjectStoreClient(store.address, name="a") as a, ObjectStoreClient(store.address, name="b") as b:
        x = np.arange(2 * MiB // 8, dtype=np.float64)
        ref = a.put(x)
        v = b.get(ref, timeout=10)
        pinned = store.stats().pinned
        del v
        gc.collect()
        assert b._local is not None
        sent = b._local._next_id
        v = b.get(ref, timeout=10)  # its release was not sent: the pin is taken back, nothing asked
        assert np.array_equal(v, x) and np.shares_memory(v, b._arena)
        assert b._local._next_id == sent
        assert store.stats().pinned == pinned  # one pin still, not two
        del v
        gc.collect()
        a.free([ref.id], reason="dropped")  # b still pins it (its release is parked): the store tells b
        with pytest.raises(ObjectFreedError):
            b.get(ref, timeout=10)  # so this get asks, and the store says freed
        assert b._local._next_id == sent + 1
        b._flush_releases()  # the parked pin's release goes (it rode on that get): the object is gone
        assert store.stats().pinned < pinned - x.nbytes + 4096


def test_a_batch_of_small_puts_larger_than_one_frame(store: Store) -> None:
    with ObjectStoreClient(store.address, name="a") as a, ObjectStoreClient(store.address, name="b") as b:
        values = [serialize(bytes([i]) * 90_000).to_bytes() for i in range(120)]  # about 10.8 MB: two frames
        oids = [ids.new_id("object_id") for _ in values]
        batch = [pb.InlineObject(object_id=o, data=v) for o, v in zip(oids, values, strict=True)]
        assert sum(len(v) for v in values) > objects.PUT_FRAME_BYTES
        assert a._put_batch(batch) == []
        assert b.get([ObjectRef(o) for o in oids], timeout=10) == [bytes([i]) * 90_000 for i in range(120)]


def test_forced_grpc_still_works(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_OBJECT_TRANSPORT", "grpc")
    with ObjectStoreClient(store.address) as c:
        assert c.transport == "grpc"
        x = np.arange(MiB // 8, dtype=np.float64)
        assert np.array_equal(c.get(c.put(x), timeout=10), x)


# ---------------------------------------------------------------------- auth


def test_under_auth_the_socket_is_the_owners_and_needs_the_token(auth_store: Store,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mode = stat.S_IMODE(os.stat(auth_store.socket_path).st_mode)
    assert mode == 0o600, oct(mode)
    for token in ("", "wrong"):
        s = _raw(auth_store)
        try:
            s.sendall(lw.frame(lw.HELLO, 1, lw.hello_body(token, "intruder")))
            h, body = _reply(s)
            assert h.op == lw.ERROR
            code, text = lw.parse_error(memoryview(body))
            assert code == "UNAUTHENTICATED" and "token" in text
            assert _closed(s)
        finally:
            s.close()
    conn = auth_store.connect(token=TOKEN)
    conn.close()
    monkeypatch.setenv("TESSERA_AUTH_TOKEN", TOKEN)
    with ObjectStoreClient(auth_store.address) as c:
        assert c.transport == "socket"
        x = np.arange(MiB // 8, dtype=np.float64)
        assert np.array_equal(c.get(c.put(x), timeout=10), x)


def test_threads_share_one_connection(store: Store, arena: mmap.mmap) -> None:
    """Replies find their callers whatever the order: a get left waiting does not hold up the others."""
    writer, conn = store.connect("writer"), store.connect("shared")
    try:
        objects = [_create_sealed(writer, arena, bytes([i]) * (200_000 + i)) for i in range(8)]
        later = ids.new_id("object_id")
        off = lw.parse_offset(writer.call(lw.CREATE, lw.create_body(later, 300_000, ""), timeout=10))
        waited: list[lw.Located] = []
        waiter = threading.Thread(target=lambda: waited.extend(
            lw.parse_located(conn.call(lw.GET, lw.get_body([later], 20_000), timeout=30))))
        waiter.start()
        errors: list[BaseException] = []

        def reads(k: int) -> None:
            try:
                for _ in range(30):
                    oid, at = objects[k]
                    (loc,) = lw.parse_located(conn.call(lw.GET, lw.get_body([oid], 1000), timeout=10))
                    assert (loc.object_id, loc.offset) == (oid, at)
                    conn.call(lw.RELEASE, releases=[oid], timeout=10)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reads, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert not waited, "the waiting get answered before its object was sealed"
        writer.call(lw.SEAL, later, timeout=10)
        waiter.join(10)
        assert [w.offset for w in waited] == [off]
    finally:
        writer.close()
        conn.close()
