"""gRPC ↔ node agent: the Session stream, GetStatus and GetWorkerLog."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.common.errors import InvalidArgumentError, TesseraError, UnavailableError

if TYPE_CHECKING:
    from tessera.task_scheduler.server import Node

log = logging.getLogger(__name__)

#: How long a session opened while the node agent starts waits for it.
READY_WAIT_S = 60.0


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
        try:  # the gRPC server answers while the agent still starts: its welcome must name a ready socket
            await asyncio.wait_for(self.node.ready.wait(), READY_WAIT_S)
        except TimeoutError:
            raise UnavailableError(f"the node agent did not finish starting within {READY_WAIT_S:g}s") from None
        out: asyncio.Queue[pb.TaskResult | None] = asyncio.Queue()
        session = self.node.open_session(out.put_nowait, first.hello.name, refs_key=first.hello.refs_key,
                                         job_id=first.hello.job_id)
        failed: list[TesseraError] = []
        reader = asyncio.create_task(self._read(it, session, failed, out))
        try:
            yield pb.ServerFrame(welcome=self.node.welcome(session))
            while True:
                r = await out.get()
                if r is None:
                    if failed:  # a frame the client sent was not a valid message: the session ends with its status
                        raise failed[0]
                    return
                batch = [r]
                while not out.empty() and len(batch) < 4096:
                    nxt = out.get_nowait()
                    if nxt is None:
                        yield pb.ServerFrame(results=batch)
                        if failed:
                            raise failed[0]
                        return
                    batch.append(nxt)
                yield pb.ServerFrame(results=batch)
        finally:
            reader.cancel()
            self.node.close_session(session)

    async def _read(self, it: AsyncIterator[pb.ClientFrame], session: str, failed: list[TesseraError],
                    out: asyncio.Queue[pb.TaskResult | None]) -> None:
        try:
            async for frame in it:
                self.node.client_frame(session, frame)
        except asyncio.CancelledError:
            raise
        except TesseraError as e:
            failed.append(e)
            out.put_nowait(None)
        except Exception as e:  # the client went away
            log.debug("session %s ended: %s", session, e)

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.GetStatusResponse:
        return self.node.status()

    async def GetWorkerLog(self, request: pb.GetWorkerLogRequest, context: Any) -> pb.GetWorkerLogResponse:
        return await asyncio.to_thread(self.node.worker_log, request)
