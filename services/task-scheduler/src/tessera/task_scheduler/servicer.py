"""gRPC ↔ node agent: the Session stream and GetStatus."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common.errors import InvalidArgumentError

if TYPE_CHECKING:
    from tessera.task_scheduler.server import Node

log = logging.getLogger(__name__)


class TaskSchedulerServicer:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def Session(self, requests: AsyncIterator[pb.ClientFrame], context: Any) -> AsyncIterator[pb.ServerFrame]:
        it = requests.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        if not first.HasField("hello"):
            raise InvalidArgumentError("the first frame of a session must be a hello")
        if len(first.hello.job_id) != 4:
            raise InvalidArgumentError(f"hello.job_id must be 4 bytes, got {len(first.hello.job_id)}")
        out: asyncio.Queue[pb.TaskResult | None] = asyncio.Queue()
        session = self.node.open_session(out.put_nowait, first.hello.name)
        reader = asyncio.create_task(self._read(it, session))
        try:
            yield pb.ServerFrame(welcome=self.node.welcome(session))
            while True:
                r = await out.get()
                if r is None:
                    return
                batch = [r]
                while not out.empty() and len(batch) < 4096:
                    nxt = out.get_nowait()
                    if nxt is None:
                        yield pb.ServerFrame(results=batch)
                        return
                    batch.append(nxt)
                yield pb.ServerFrame(results=batch)
        finally:
            reader.cancel()
            self.node.close_session(session)

    async def _read(self, it: AsyncIterator[pb.ClientFrame], session: str) -> None:
        try:
            async for frame in it:
                self.node.client_frame(session, frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away
            log.debug("session %s ended: %s", session, e)

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.GetStatusResponse:
        return self.node.status()
