"""Length-prefixed protobuf frames between a node agent and its workers (a Unix socket)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb

_LEN = struct.Struct("<I")
#: A frame larger than this is a protocol error (values above the inline threshold go through the object store).
MAX_FRAME = 256 * 2**20


class FrameError(ConnectionError):
    pass


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes is over the {MAX_FRAME} limit")
    return await reader.readexactly(n)


def pack(msg: pb.ClientFrame | pb.ServerFrame) -> bytes:
    data = msg.SerializeToString()
    return _LEN.pack(len(data)) + data


class SocketConnection:
    """The worker's side: blocking sends from any thread, reads from one thread."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect("\0" + path[1:] if path.startswith("@") else path)  # "@name": an abstract socket
        self._send_lock = threading.Lock()
        self._rfile = self.sock.makefile("rb", buffering=1 << 16)

    def send(self, frame: pb.ClientFrame) -> None:
        data = pack(frame)
        with self._send_lock:
            self.sock.sendall(data)

    def recv(self) -> pb.ServerFrame:
        head = self._rfile.read(_LEN.size)
        if len(head) < _LEN.size:
            raise FrameError("the node agent closed the connection")
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes is over the {MAX_FRAME} limit")
        data = self._rfile.read(n)
        if len(data) < n:
            raise FrameError("the node agent closed the connection mid-frame")
        return pb.ServerFrame.FromString(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
