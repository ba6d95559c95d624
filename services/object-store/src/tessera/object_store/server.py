"""Wiring of one node's object store: arena + manager + node logic, the control store
as directory, NATS for events, gRPC for clients and peers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.common import auth, ids, rpc
from tessera.common.config import Settings
from tessera.common.errors import InvalidArgumentError, NotFoundError, UnavailableError
from tessera.common.metrics import observe
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import RETRY_FIRST_S, ServiceApp, next_retry
from tessera.common.sizing import StoreSize, object_store_size
from tessera.common.wire import decode_chunk
from tessera.object_store.arena import Arena
from tessera.object_store.local import LocalSession, LocalSessions
from tessera.object_store.manager import ObjectManager
from tessera.object_store.node import Chunk, Located, NodeObjectStore, freed_message
from tessera.object_store.servicer import ObjectStoreServicer
from tessera.object_store.transfer_net import TransferClient, TransferServer
from tessera.object_store.warm import Warmer, headroom_for

NAME = "object-store"
SERVICE = "tessera.object_store.v1.ObjectStoreService"
IDEMPOTENT = ("GetObjects", "ContainsObjects", "GetStats", "ReleaseObjects")
#: Ids per FreeObjects call to the control store (its batch limit is 10,000).
BATCH = 5000

log = logging.getLogger(__name__)

#: The label of a node's record that names its object store's data socket (host:port).
TRANSFER_LABEL = "object_store_transfer_address"

_OPS = {"sealed": cpb.CHANGE_OP_SEALED, "evicted": cpb.CHANGE_OP_EVICTED, "spilled": cpb.CHANGE_OP_SPILLED,
        "restored": cpb.CHANGE_OP_RESTORED, "lost": cpb.CHANGE_OP_LOST}


class ClusterDirectory:
    """Copies as the control store records them; announcements on NATS."""

    def __init__(self, app: ServiceApp, node_id: bytes) -> None:
        self.app = app
        self.node_id = node_id
        self.channel, self.stub = control_store_aio_stub(app.settings)
        self._addresses: dict[bytes, str] = {}
        self._transfer: dict[str, str] = {}  # object-store address -> its data socket address
        self._stale: set[bytes] = set()  # nodes whose records are read again at the next lookup

    async def add_locations(self, entries: list[tuple[bytes, int, str]]) -> None:
        locs = [cpb.ObjectLocation(object_id=o, node_id=self.node_id, size=s, owner=w) for o, s, w in entries]
        await self.stub.AddObjectLocations(cpb.AddObjectLocationsRequest(locations=locs))

    async def remove_locations(self, object_ids: list[bytes]) -> list[bytes]:
        locs = [cpb.ObjectLocation(object_id=o, node_id=self.node_id) for o in object_ids]
        resp = await self.stub.RemoveObjectLocations(cpb.RemoveObjectLocationsRequest(locations=locs))
        return list(resp.lost_object_ids)

    async def _address(self, node_id: bytes) -> str:
        if node_id not in self._addresses or node_id in self._stale:
            self._stale.discard(node_id)
            try:
                node = (await self.stub.GetNode(cpb.GetNodeRequest(node_id=node_id))).node
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    self._addresses.pop(node_id, None)
                    return ""
                self._stale.add(node_id)  # (when it was stale: still so)
                raise
            if node.state == cpb.NODE_STATE_DEAD:
                self._addresses.pop(node_id, None)
                return ""
            self._addresses[node_id] = node.object_store_address
            if node.labels.get(TRANSFER_LABEL):
                self._transfer[node.object_store_address] = node.labels[TRANSFER_LABEL]
            else:  # a store of an older version: gRPC only
                self._transfer.pop(node.object_store_address, None)
        return self._addresses[node_id]

    async def locate(self, object_id: bytes) -> Located:
        objs = (await self.stub.GetObjects(cpb.GetObjectsRequest(object_ids=[object_id]))).objects
        if not objs:
            return Located(False)
        if objs[0].freed_reason:
            raise NotFoundError(freed_message(object_id, objs[0].freed_reason))
        addrs = [await self._address(n) for n in objs[0].locations if n != self.node_id]
        peers = [a for a in addrs if a]
        return Located(True, peers, objs[0].size, objs[0].owner,
                       {a: self._transfer[a] for a in peers if a in self._transfer})

    async def forget_copy(self, object_id: bytes, address: str) -> list[bytes]:
        node = next((n for n, a in self._addresses.items() if a == address), None)
        if node is None:
            return []
        locs = [cpb.ObjectLocation(object_id=object_id, node_id=node)]
        return list((await self.stub.RemoveObjectLocations(cpb.RemoveObjectLocationsRequest(locations=locs))).lost_object_ids)

    async def free(self, object_ids: list[bytes], task_ids: list[bytes], reason: str, remember: bool) -> None:
        """The cluster forgets freed objects (and the lineage only they needed); every node drops its copies."""
        for i in range(0, max(len(object_ids), len(task_ids)), BATCH):
            await self.stub.FreeObjects(cpb.FreeObjectsRequest(object_ids=object_ids[i:i + BATCH],
                                                               task_ids=task_ids[i:i + BATCH], reason=reason,
                                                               remember=remember))

    def refresh(self, address: str) -> None:
        self._stale.update(n for n, a in self._addresses.items() if a == address)

    async def announce(self, kind: str, entries: list[tuple[bytes, int, str]]) -> None:
        if self.app.bus is None:
            return
        changes = [cpb.Change(key=o, value=cpb.ObjectInfo(object_id=o, size=s, owner=w, locations=[self.node_id])
                              .SerializeToString()) for o, s, w in entries]
        ev = cpb.ChangeEvent(table="objects", op=_OPS[kind], changes=changes)
        await self.app.bus.publish(f"tessera.events.objects.{kind}", ev.SerializeToString())


class Peers:
    """gRPC channels to other nodes' object stores, for pulls."""

    def __init__(self, settings: Settings, node_id: bytes) -> None:
        self.settings = settings
        self.node_id = node_id
        self._pulls: dict[str, grpc.aio.UnaryStreamMultiCallable] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _pull(self, address: str) -> grpc.aio.UnaryStreamMultiCallable:
        """PullObject at ``address``, its chunks read raw (see wire.py): one copy into the arena."""
        if address not in self._pulls:
            token = auth.server_token(self.settings)  # this cluster's token, when it has one
            ch = rpc.raw_aio_channel(address, [("grpc.max_receive_message_length", self.settings.grpc_max_message_bytes)],
                                     interceptors=auth.aio_client_auth(token) if token else None)
            self._channels.append(ch)
            self._pulls[address] = ch.unary_stream(f"/{SERVICE}/PullObject",
                                                   request_serializer=pb.PullObjectRequest.SerializeToString)
        return self._pulls[address]

    async def fetch(self, address: str, object_id: bytes) -> AsyncIterator[Chunk]:
        req = pb.PullObjectRequest(object_id=object_id, requester_node_id=self.node_id,
                                   chunk_size=self.settings.object_store_chunk_bytes)
        call = self._pull(address)(req, timeout=600, metadata=rpc.trace_metadata())
        try:
            async for raw in call:
                total, offset, crc, owner, data = decode_chunk(raw)
                yield Chunk(total, offset, data, crc, owner)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFoundError(e.details()) from e
            raise UnavailableError(f"object store at {address}: {e.code().name} {e.details()}") from e

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()


class _LocalProtocol(asyncio.BufferedProtocol):
    """One connection to the local socket, handed to a :class:`LocalSession` (the protocol lives there).

    Reads land in one buffer of the connection's own (a plain Protocol gets a fresh 256 KiB bytes object
    per read, which costs more than the request itself)."""

    def __init__(self, shared: LocalSessions) -> None:
        self.shared = shared
        self.session: LocalSession | None = None
        self._buf = memoryview(bytearray(READ_BYTES))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.session = self.shared.session(transport.write, transport.close)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        assert self.session is not None
        self.session.feed(self._buf[:nbytes])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.close()


#: Bytes read from a local connection at a time.
READ_BYTES = 64 * 1024
#: Longest path a Unix socket may have (sun_path, less its terminating NUL).
MAX_SOCKET_PATH = 107


def local_socket_path(settings: Settings, node_id: bytes) -> str:
    """Where the local fast path listens: a file beside the arena; an abstract name ("@...") when that
    path is too long for a Unix socket."""
    path = str(settings.object_store_arena_dir / f"tessera-{node_id.hex()}.sock")
    if len(path.encode()) <= MAX_SOCKET_PATH:
        return path
    return f"@tessera-objects-{node_id.hex()}-{os.getpid()}"


class LocalServer:
    """The object store's Unix socket: same-host clients create, seal, get and release without gRPC.

    With a token set, the socket file is the owner's alone (mode 0600) and a session's first frame
    must carry the token all the same (an abstract socket has no file mode)."""

    def __init__(self, shared: LocalSessions, path: str) -> None:
        self.shared = shared
        self.path = path
        self._server: asyncio.base_events.Server | None = None

    def _address(self) -> str:
        return "\0" + self.path[1:] if self.path.startswith("@") else self.path

    async def start(self) -> None:
        if not self.path.startswith("@"):
            try:  # left by a store of this node that died
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _LocalProtocol(self.shared), path=self._address())
        if self.shared.token and not self.path.startswith("@"):
            os.chmod(self.path, 0o600)
        log.info("local object sessions on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if not self.path.startswith("@"):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def node_id_of(settings: Settings) -> bytes:
    """TESSERA_NODE_ID, else one derived from host and port, so a restarted store keeps its
    id (and adopts its spill files); with no fixed port, a random one."""
    if settings.node_id:
        try:
            node_id = bytes.fromhex(settings.node_id)
        except ValueError:
            raise InvalidArgumentError(f"TESSERA_NODE_ID must be hex, got {settings.node_id!r}") from None
        return ids.check_id("node_id", node_id, field="TESSERA_NODE_ID")
    if settings.grpc_port:
        seed = f"{socket.gethostname()}:{settings.grpc_port}".encode()
        return hashlib.sha256(seed).digest()[: ids.NODE_ID_LEN]
    return ids.new_id("node_id")


def store_size(settings: Settings, arena_path: Path) -> StoreSize:
    """The arena's capacity: TESSERA_OBJECT_STORE_MEMORY, else Ray's default (see tessera.common.sizing).

    A stale arena of this node (a store that crashed) still holds its pages until it is
    replaced: they count as free, since :class:`Arena` removes the file before making its own.
    Raises InvalidArgumentError when the requested size cannot fit: the store refuses to start.
    """
    try:
        stale = arena_path.stat().st_blocks * 512
    except FileNotFoundError:
        stale = 0
    return object_store_size(settings.object_store_memory, arena_path.parent, reclaim=stale)


def build(settings: Settings) -> ServiceApp:
    app = ServiceApp(NAME, settings)
    node_id = node_id_of(settings)
    arena_path = settings.object_store_arena_dir / f"tessera-{node_id.hex()}.arena"
    spill_dir = (settings.object_store_spill_dir or settings.run_dir / "spill") / node_id.hex()
    spill_dir.mkdir(parents=True, exist_ok=True)
    size = store_size(settings, arena_path)
    log.info("object store of node %s: %s", node_id.hex(), size.describe())
    capacity = size.capacity
    arena = Arena(arena_path, capacity, reserve=settings.object_store_prefault)
    directory = ClusterDirectory(app, node_id)
    peers = Peers(settings, node_id)
    token = auth.server_token(settings)
    transfer_client = TransferClient(node_id, token=token, chunk_bytes=settings.object_store_chunk_bytes,
                                     timeout_s=settings.rpc_timeout_s)
    holder: dict[str, NodeObjectStore] = {}  # the manager reports to the node store made from it
    manager = ObjectManager(arena, spill_dir=spill_dir, spill_capacity=settings.object_store_spill_capacity,
                            has_other_copy=lambda oid: holder["node"].has_other_copy(oid),
                            on_event=lambda kind, e: holder["node"].on_event(kind, e))
    node = holder["node"] = NodeObjectStore(manager, node_id, directory=directory, fetch=peers.fetch,
                                            inline_threshold=settings.object_store_inline_threshold,
                                            chunk_bytes=settings.object_store_chunk_bytes,
                                            transfer=transfer_client.fetch_range)
    warmer = Warmer(arena, lambda: manager.alloc.high_water,
                    0 if settings.object_store_prefault else headroom_for(settings.object_store_warm_bytes, capacity))
    transfer_server = TransferServer(node, arena_path, host=settings.grpc_host, port=settings.object_store_transfer_port,
                                     token=token, timeout_s=settings.rpc_timeout_s)
    sessions: set[str] = set()  # gRPC and local sessions alike
    servicer = ObjectStoreServicer(node, arena_path=str(arena_path), arena_size=capacity,
                                   forget=directory.free, sessions=sessions, hostname=socket.gethostname())
    descriptor = pb.DESCRIPTOR.services_by_name["ObjectStoreService"]
    app.add_servicer(lambda s, srv: rpc.add_servicer(s, srv, descriptor, raw_responses=["PullObject", "ReadObject"],
                                                          raw_requests=["WriteObject"]),
                     servicer, SERVICE)
    local = LocalServer(LocalSessions(node, sessions, arena_path=str(arena_path),
                                      arena_size=capacity, token=token, matches=auth.matches),
                        local_socket_path(settings, node_id))
    tasks: list[asyncio.Task[None]] = []

    async def register_node() -> None:
        host = app.address.rpartition(":")[0]  # advertised like the gRPC address
        info = cpb.NodeInfo(node_id=node_id, address=app.address, object_store_address=app.address,
                            resources_total={"object_store_memory": float(capacity)},
                            labels={"hostname": socket.gethostname(), "pid": str(os.getpid()),
                                    TRANSFER_LABEL: f"{host}:{transfer_server.port}"})
        delay = RETRY_FIRST_S
        while True:
            try:
                await directory.stub.RegisterNode(cpb.RegisterNodeRequest(node=info))
                break
            except grpc.aio.AioRpcError as e:
                log.info("registering node %s: %s", node_id.hex(), e.details())
                await asyncio.sleep(delay)
                delay = next_retry(delay)
        log.info("node %s registered (object store at %s)", node_id.hex(), app.address)
        while True:
            await asyncio.sleep(settings.heartbeat_interval_s)
            try:
                r = await directory.stub.NodeHeartbeat(cpb.NodeHeartbeatRequest(node_id=node_id))
                if r.state == cpb.NODE_STATE_DEAD:
                    log.error("node %s was declared dead by the control store", node_id.hex())
            except grpc.aio.AioRpcError as e:
                log.warning("heartbeat failed: %s", e.details())

    async def on_freed(msg: Any) -> None:
        """Objects freed anywhere in the cluster (their records deleted): drop the copies held here."""
        try:
            ev = cpb.ChangeEvent.FromString(msg.data)
        except Exception:
            log.warning("ignoring a malformed objects.deleted event")
            return
        by_reason: dict[str, list[bytes]] = {}  # a freed object's event carries why it was freed
        for c in ev.changes:
            if len(c.key) == ids.OBJECT_ID_LEN:
                by_reason.setdefault(c.value.decode(errors="replace"), []).append(c.key)
        for reason, oids in by_reason.items():
            node.free(oids, reason)

    async def start() -> None:
        if settings.object_store_prefault:
            await asyncio.to_thread(arena.prefault)
        await transfer_server.start()
        warmer.start()
        node.start()
        if app.bus is not None:
            await app.bus.subscribe("tessera.events.objects.deleted", on_freed)
        await local.start()
        servicer.local_socket = local.path  # advertised once it listens
        tasks.append(asyncio.create_task(register_node(), name="node-registration"))

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await transfer_server.stop()
        servicer.local_socket = ""
        await local.stop()
        await node.stop()
        await transfer_client.close()
        await peers.close()
        await directory.channel.close()
        await asyncio.to_thread(warmer.stop)
        manager.close()  # a graceful stop: this node leaves, its spill files go too
        arena.close()
        arena.unlink()

    app.on_start(start)
    app.on_stop(stop)
    observe_store(node)
    return app


def observe_store(node: NodeObjectStore) -> None:
    """The node store's figures as metrics, read at each collection: memory used and spilled, objects, pulls."""
    scope, stats = "tessera.object_store", node.manager.stats

    def figure(key: str) -> Callable[[], int]:
        return lambda: int(stats()[key])

    observe(scope, "tessera.object_store.used", figure("used"), unit="By", description="Bytes of the arena in use")
    observe(scope, "tessera.object_store.capacity", figure("capacity"), unit="By", description="Bytes of the arena")
    observe(scope, "tessera.object_store.spilled", figure("spilled_bytes"), unit="By",
            description="Bytes of objects spilled to disk")
    observe(scope, "tessera.object_store.objects",
            lambda: [(int(s["objects"]), {"tessera.object.location": "memory"}),
                     (int(s["spilled_objects"]), {"tessera.object.location": "spilled"})] if (s := stats()) else [],
            unit="{object}", description="Objects on this node, in memory or spilled")
    for key, what in (("evictions", "evicted"), ("spills", "spilled"), ("restores", "restored from disk")):
        observe(scope, f"tessera.object_store.{key}", figure(key), kind="counter", unit="{object}",
                description=f"Objects {what} so far")
    observe(scope, "tessera.object_store.pulls", lambda: node.pulls, kind="counter", unit="{object}",
            description="Objects pulled from other nodes")


async def serve(settings: Settings | None = None) -> None:
    try:
        app = build(settings or Settings())
    except InvalidArgumentError as e:  # a setting that cannot work (an arena that cannot fit): say which, and stop
        log.error("the object store cannot start: %s", e)
        raise SystemExit(2) from None
    await app.run()
