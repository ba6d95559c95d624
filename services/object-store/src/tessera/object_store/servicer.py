"""gRPC ↔ domain: ObjectStoreService over :class:`~tessera.object_store.node.NodeObjectStore`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeAlias

import grpc.aio

from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.api.object_store.v1 import object_store_pb2_grpc as pb_grpc
from tessera.common import ids
from tessera.common.errors import FailedPreconditionError, InvalidArgumentError, TesseraError
from tessera.common.wire import decode_write_chunk, encode_chunk
from tessera.object_store.node import NodeObjectStore

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]

#: forget(object_ids, task_ids, reason, remember): the cluster drops the records of freed objects (the control store).
Forget: TypeAlias = Callable[[list[bytes], list[bytes], str, bool], Awaitable[None]]
#: Longest a GetObjects waits when neither the request nor the deadline bounds it.
MAX_WAIT_S = 3600.0
MAX_REASON = 512


class ObjectStoreServicer(pb_grpc.ObjectStoreServiceServicer):
    def __init__(self, node: NodeObjectStore, *, arena_path: str, arena_size: int, forget: Forget | None = None,
                 sessions: set[str] | None = None, local_socket: str = "", hostname: str = "") -> None:
        """``sessions``: the live session ids, shared with the local socket's sessions (a client may mix both);
        ``local_socket``: where clients on ``hostname`` find the local fast path (see server.py)."""
        self.node = node
        self.forget = forget
        self.arena_path = arena_path
        self.arena_size = arena_size
        self.sessions: set[str] = sessions if sessions is not None else set()
        self.local_socket = local_socket
        self.hostname = hostname

    def _session(self, sid: str) -> str:
        if sid not in self.sessions:
            # FAILED_PRECONDITION: the session may have been valid before this store restarted
            raise FailedPreconditionError(f"unknown session {sid!r}: open a session (OpenSession) first")
        return sid

    async def OpenSession(self, request: pb.OpenSessionRequest, context: Ctx) -> AsyncIterator[pb.OpenSessionResponse]:
        sid = uuid.uuid4().hex
        self.sessions.add(sid)
        try:
            yield pb.OpenSessionResponse(session_id=sid, arena_path=self.arena_path, arena_size=self.arena_size,
                                         node_id=self.node.node_id, inline_threshold=self.node.inline_threshold,
                                         local_socket=self.local_socket, hostname=self.hostname)
            await asyncio.Event().wait()  # until the client goes away
        finally:
            self.sessions.discard(sid)
            self.node.manager.release_session(sid)

    async def PutObject(self, request: pb.PutObjectRequest, context: Ctx) -> pb.PutObjectResponse:
        sid = self._session(request.session_id) if request.pin else request.session_id
        self.node.put_inline(request.object_id, request.data, request.owner, sid, request.pin, durable=request.durable)
        return pb.PutObjectResponse()

    async def PutObjects(self, request: pb.PutObjectsRequest, context: Ctx) -> pb.PutObjectsResponse:
        self._session(request.session_id)
        for o in request.objects:  # validate all before storing any
            ids.check_id("object_id", o.object_id)
        failed, errors = [], []
        for o in request.objects:
            try:
                self.node.put_inline(o.object_id, o.data, o.owner, request.session_id, False, durable=request.durable)
            except TesseraError as e:
                failed.append(o.object_id)
                errors.append(f"{e.code}: {e}")
        return pb.PutObjectsResponse(failed_object_ids=failed, errors=errors)

    async def CreateObject(self, request: pb.CreateObjectRequest, context: Ctx) -> pb.CreateObjectResponse:
        sid = self._session(request.session_id)
        return pb.CreateObjectResponse(arena_offset=self.node.create(request.object_id, request.size, request.owner, sid))

    async def SealObject(self, request: pb.SealObjectRequest, context: Ctx) -> pb.SealObjectResponse:
        sid = self._session(request.session_id)
        self.node.seal(request.object_id, sid, request.pin, durable=request.durable)
        return pb.SealObjectResponse()

    async def AbortObject(self, request: pb.AbortObjectRequest, context: Ctx) -> pb.AbortObjectResponse:
        self._session(request.session_id)
        self.node.manager.abort(ids.check_id("object_id", request.object_id))
        return pb.AbortObjectResponse()

    async def GetObjects(self, request: pb.GetObjectsRequest, context: Ctx) -> pb.GetObjectsResponse:
        sid = self._session(request.session_id)
        for oid in request.release_object_ids:
            self.node.manager.release(ids.check_id("object_id", oid), sid)
        limit = context.time_remaining()
        timeout = request.timeout_ms / 1000 if request.timeout_ms else MAX_WAIT_S
        if limit is not None:
            timeout = min(timeout, max(0.0, limit - 0.05))
        locs = await self.node.get(list(request.object_ids), sid, timeout)
        out = []
        for loc in locs:
            if loc.inline is not None:
                out.append(pb.ObjectLocator(object_id=loc.object_id, size=loc.size, owner=loc.owner,
                                            inline_data=loc.inline))
            else:
                out.append(pb.ObjectLocator(object_id=loc.object_id, size=loc.size, owner=loc.owner,
                                            arena_offset=loc.offset or 0))
        return pb.GetObjectsResponse(objects=out)

    async def ReleaseObjects(self, request: pb.ReleaseObjectsRequest, context: Ctx) -> pb.ReleaseObjectsResponse:
        sid = self._session(request.session_id)
        for oid in request.object_ids:
            self.node.manager.release(ids.check_id("object_id", oid), sid)
        return pb.ReleaseObjectsResponse()

    async def DeleteObjects(self, request: pb.DeleteObjectsRequest, context: Ctx) -> pb.DeleteObjectsResponse:
        for oid in request.object_ids:
            ids.check_id("object_id", oid)
        n = sum(1 for oid in request.object_ids if self.node.manager.delete(oid))
        return pb.DeleteObjectsResponse(deleted=n)

    async def FreeObjects(self, request: pb.FreeObjectsRequest, context: Ctx) -> pb.FreeObjectsResponse:
        for oid in (*request.release_object_ids, *request.object_ids):
            ids.check_id("object_id", oid)
        for tid in request.task_ids:
            ids.check_id("task_id", tid)
        if not request.object_ids and not request.task_ids:
            raise InvalidArgumentError("FreeObjects: give object_ids or task_ids")
        if len(request.reason) > MAX_REASON:
            raise InvalidArgumentError(f"reason is {len(request.reason)} characters; at most {MAX_REASON}")
        if request.release_object_ids:
            sid = self._session(request.session_id)
            for oid in request.release_object_ids:
                self.node.manager.release(oid, sid)
        n = self.node.free(list(request.object_ids), request.reason) if request.object_ids else 0
        if self.forget is not None:
            await self.forget(list(request.object_ids), list(request.task_ids), request.reason, request.remember)
        return pb.FreeObjectsResponse(freed=n)

    async def ContainsObjects(self, request: pb.ContainsObjectsRequest, context: Ctx) -> pb.ContainsObjectsResponse:
        for oid in request.object_ids:
            ids.check_id("object_id", oid)
        m = self.node.manager
        present = [m.contains(o) for o in request.object_ids]
        spilled = [here and m.is_spilled(o) for o, here in zip(request.object_ids, present, strict=True)]
        return pb.ContainsObjectsResponse(present=present, spilled=spilled)

    async def PullObject(self, request: pb.PullObjectRequest, context: Ctx) -> AsyncIterator[bytes]:  # type: ignore[override]
        """Registered with a raw serializer: each chunk is encoded straight from the arena."""
        async for c in self.node.serve_pull(request.object_id, request.chunk_size):
            yield encode_chunk(c.total_size, c.offset, c.crc32c, c.owner, memoryview(c.data))

    async def WriteObject(self, request_iterator: AsyncIterator[bytes],  # type: ignore[override]
                          context: Ctx) -> pb.WriteObjectResponse:
        """Registered with raw requests: each chunk is decoded in place (tessera.common.wire), its data
        copied once, into the arena."""
        requests = aiter(request_iterator)
        raw = await anext(requests, None)
        first = _parse(pb.WriteObjectRequest, raw) if raw is not None and decode_write_chunk(raw) is None else None
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgumentError("WriteObject: the first message must be the header")
        h = first.header

        async def chunks() -> AsyncIterator[tuple[int, memoryview, int]]:
            async for r in requests:
                chunk = decode_write_chunk(r)
                if chunk is None:
                    raise InvalidArgumentError("WriteObject: only the first message may be a header")
                offset, crc, data = chunk
                yield offset, data, crc

        await self.node.write(h.object_id, h.size, h.owner, chunks(), durable=h.durable)
        return pb.WriteObjectResponse(size=h.size)

    async def ReadObject(self, request: pb.ReadObjectRequest, context: Ctx) -> AsyncIterator[bytes]:  # type: ignore[override]
        """Registered with a raw serializer, as PullObject (the two messages share their layout)."""
        limit = context.time_remaining()
        timeout = request.timeout_ms / 1000 if request.timeout_ms else MAX_WAIT_S
        if limit is not None:
            timeout = min(timeout, max(0.0, limit - 0.05))
        async with aclosing(self.node.read(request.object_id, timeout, request.chunk_size)) as chunks:
            async for c in chunks:
                yield encode_chunk(c.total_size, c.offset, c.crc32c, c.owner, memoryview(c.data))

    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        s = self.node.manager.stats()
        return pb.GetStatsResponse(
            node_id=self.node.node_id, capacity=s["capacity"], used=s["used"], pinned=s["pinned"],
            spilled_bytes=s["spilled_bytes"], objects=s["objects"], spilled_objects=s["spilled_objects"],
            evictions=s["evictions"], spills=s["spills"], restores=s["restores"], pulls=self.node.pulls,
            spill_capacity=s.get("spill_capacity", 0),
            transfer_pulls=self.node.transfer_pulls, transfer_fallbacks=self.node.transfer_fallbacks,
            transfer_bytes_received=self.node.transfer_bytes_received,
            transfer_bytes_served=self.node.transfer_bytes_served,
        )


def _parse(cls: Any, raw: bytes) -> Any:
    """A small message of a raw-request method, parsed; one that does not parse is the caller's error."""
    try:
        return cls.FromString(raw)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError
        raise InvalidArgumentError(f"the request is not a valid message ({cls.__name__}: {type(e).__name__}: "
                                   f"{e})") from None
