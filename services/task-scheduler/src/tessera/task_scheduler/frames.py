"""Length-prefixed protobuf frames between a node agent and its clients on the host (a Unix socket).

The client side (:class:`SocketConnection`) lives in the SDK; this is the agent's asyncio side.
"""

from __future__ import annotations

import asyncio

from tessera._framing import LEN, MAX_FRAME, FrameError, SocketConnection, pack

__all__ = ["FrameError", "SocketConnection", "pack", "read_frame"]


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(LEN.size)
    (n,) = LEN.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes is over the {MAX_FRAME} limit")
    return await reader.readexactly(n)
