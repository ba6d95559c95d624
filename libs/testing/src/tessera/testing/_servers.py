from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tessera.common import procs


@dataclass
class NatsServer:
    port: int
    store_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class RedisServer:
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        """Start again on the same port and data directory (AOF is replayed)."""
        if self.proc.poll() is None:
            procs.stop(self.proc)
        self.proc = procs.start(procs.redis_command(self.port, self.data_dir), log_path=self.data_dir / "redis.log")
        procs.wait_port("127.0.0.1", self.port, timeout=20, proc=self.proc)


@contextlib.contextmanager
def nats_server(store_dir: Path | None = None) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free port."""
    with contextlib.ExitStack() as stack:
        d = store_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-nats-")))
        port = procs.free_port()
        proc = procs.start(procs.nats_command(port, d), log_path=d / "nats.log")
        try:
            procs.wait_port("127.0.0.1", port, timeout=20, proc=proc)
            yield NatsServer(port, d, proc)
        finally:
            procs.stop(proc)


@contextlib.contextmanager
def redis_server(data_dir: Path | None = None) -> Iterator[RedisServer]:
    """A redis-server (AOF on) on a free port."""
    with contextlib.ExitStack() as stack:
        d = data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-redis-")))
        port = procs.free_port()
        proc = procs.start(procs.redis_command(port, d), log_path=d / "redis.log")
        server = RedisServer(port, d, proc)
        try:
            procs.wait_port("127.0.0.1", port, timeout=20, proc=proc)
            yield server
        finally:
            procs.stop(server.proc)
