"""Servers that outlive the test session: found, named and killed when the session ends.

A fixture that starts a server records it with :func:`track`; the pytest plugin asks
:func:`leaked` when the session ends (every fixture is torn down by then) and fails the
session if anything is still running. A process is known by its pid *and* its start time
(``/proc/<pid>/stat``), so a pid reused by an unrelated process is never taken for a leak,
and a server a test killed (a zombie included) or stopped and started again counts as gone:
only what is still running at the end is reported. Besides what was tracked, every
``nats-server`` and ``redis-server`` descended from this process is looked for, so one
started without the helpers is caught as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Server binaries looked for among this process's descendants, by ``/proc/<pid>/comm``.
SERVER_NAMES = frozenset({"nats-server", "redis-server"})


@dataclass(frozen=True)
class Started:
    """One process as it was when it was recorded: ``start`` tells it from a later one with its pid."""

    pid: int
    start: int
    command: str
    proc: subprocess.Popen[bytes] | None = field(default=None, compare=False, hash=False, repr=False)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of ``pid``, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces; fields[0] is field 3
    return fields[0], int(fields[1]), int(fields[19])


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or f"pid {pid}"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def running(p: Started) -> bool:
    """Whether the process recorded as ``p`` still runs (not reaped, not a zombie, not another with its pid)."""
    if p.proc is not None and p.proc.poll() is not None:  # our child and exited: now reaped
        return False
    st = _stat(p.pid)
    return st is not None and st[2] == p.start and st[0] not in ("Z", "X")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Tracker:
    """The servers this test process started (thread-safe: fixtures may start them from threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[tuple[int, int], Started] = {}

    def track(self, proc: subprocess.Popen[bytes] | int) -> None:
        """Record a server: a child (its ``Popen``) or any process by pid (e.g. one ``tessera up`` started).

        A process already gone is not recorded (nothing to check); recording one twice is harmless.
        """
        pid = proc if isinstance(proc, int) else proc.pid
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X"):
            return
        if isinstance(proc, int):
            started = Started(pid, st[2], _command(pid))
        else:  # its arguments: a child just started may not have exec'd yet, so /proc still shows ours
            args = proc.args if isinstance(proc.args, list | tuple) else [proc.args]
            started = Started(pid, st[2], " ".join(str(a) for a in args), proc)
        with self._lock:
            self._started.setdefault((pid, st[2]), started)

    def leaked(self) -> list[Started]:
        """Every recorded server still running, and every server binary still running below this process."""
        with self._lock:
            found = {(p.pid, p.start): p for p in self._started.values() if running(p)}
        for pid in _descendants(os.getpid()):
            st = _stat(pid)
            if st is not None and st[0] not in ("Z", "X") and _comm(pid) in SERVER_NAMES:
                found.setdefault((pid, st[2]), Started(pid, st[2], _command(pid)))
        return sorted(found.values(), key=lambda p: p.pid)

    def forget(self) -> None:
        with self._lock:
            self._started.clear()


def kill(processes: list[Started], *, grace: float = 5.0) -> None:
    """SIGTERM each, then SIGKILL what is still running after ``grace`` seconds; reaps our own children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in processes:
            if running(p):
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while any(running(p) for p in processes) and time.monotonic() < deadline:
            for p in processes:
                if p.proc is None and running(p):
                    try:  # a descendant we did not record may still be our child: reap it
                        os.waitpid(p.pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
            time.sleep(0.05)


#: The one tracker of this process, which the plugin checks when the session ends.
TRACKER = Tracker()


def track(proc: subprocess.Popen[bytes] | int) -> None:
    """Record a server this test process started, so that the session fails if it outlives it."""
    TRACKER.track(proc)
