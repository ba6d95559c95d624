from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tessera.common import procs
from tessera.testing._leaks import track


def _start(cmd: list[str], log_path: Path, port: int) -> subprocess.Popen[bytes]:
    """Start a server, recorded for the session's leak check, and wait for its port (stopped if it never opens)."""
    proc = procs.start(cmd, log_path=log_path)
    track(proc)
    try:
        procs.wait_port("127.0.0.1", port, timeout=20, proc=proc)
    except BaseException:
        procs.stop(proc)
        raise
    return proc


@dataclass
class NatsServer:
    port: int
    store_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        """Start again on the same port and store directory (streams are kept); the fixture stops this one."""
        if self.proc.poll() is None:
            procs.stop(self.proc)
        self.proc = _start(procs.nats_command(self.port, self.store_dir), self.store_dir / "nats.log", self.port)


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
        self.proc = _start(procs.redis_command(self.port, self.data_dir), self.data_dir / "redis.log", self.port)


@contextlib.contextmanager
def nats_server(store_dir: Path | None = None) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free port."""
    with contextlib.ExitStack() as stack:
        d = store_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-nats-")))
        port = procs.free_port()
        server = NatsServer(port, d, _start(procs.nats_command(port, d), d / "nats.log", port))
        try:
            yield server
        finally:
            procs.stop(server.proc)  # the one running now: a test may have restarted it


@contextlib.contextmanager
def redis_server(data_dir: Path | None = None) -> Iterator[RedisServer]:
    """A redis-server (AOF on) on a free port."""
    with contextlib.ExitStack() as stack:
        d = data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-redis-")))
        port = procs.free_port()
        server = RedisServer(port, d, _start(procs.redis_command(port, d), d / "redis.log", port))
        try:
            yield server
        finally:
            procs.stop(server.proc)  # the one running now: a test may have restarted it
