"""Length-prefixed protobuf frames over a Unix socket: a session with the node agent on this host.

Workers always talk to their agent this way; drivers on the agent's host move
their session here from gRPC (the agent names its socket in the session's
welcome). ``@name`` is an abstract socket (no file).
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

LEN = struct.Struct("<I")
#: A frame larger than this is a protocol error (values above the inline threshold go through the object store).
MAX_FRAME = 256 * 2**20


class FrameError(ConnectionError):
    pass


def pack(msg: Any) -> bytes:
    data = msg.SerializeToString()
    return LEN.pack(len(data)) + data


class SocketConnection:
    """Blocking sends from any thread; reads from one thread."""

    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect("\0" + path[1:] if path.startswith("@") else path)
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._rfile = self.sock.makefile("rb", buffering=1 << 16)

    def send(self, frame: Any, *, idle: bool = False) -> None:
        """Write ``frame`` now, from this thread (``idle`` changes nothing: each frame is written at once)."""
        data = pack(frame)
        with self._send_lock:
            self.sock.sendall(data)

    def recv_bytes(self) -> bytes:
        head = self._rfile.read(LEN.size)
        if len(head) < LEN.size:
            raise FrameError("the node agent closed the connection")
        (n,) = LEN.unpack(head)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes is over the {MAX_FRAME} limit")
        data = self._rfile.read(n)
        if len(data) < n:
            raise FrameError("the node agent closed the connection mid-frame")
        return data

    def recv(self) -> Any:
        from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb

        return pb.ServerFrame.FromString(self.recv_bytes())

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
