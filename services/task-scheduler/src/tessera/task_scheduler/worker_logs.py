"""Workers' stdout and stderr, one pair of files per worker, rotated, readable by worker or by actor.

A worker writes ``worker-<id>.out`` and ``worker-<id>.err`` in its node's folder (it opens
them itself, appending, before anything else). When a task or actor call writes to either,
the worker first writes a line ``:task:<task id hex>`` there, so the output of one task can
be picked out of its worker's log (:func:`tessera.common.logfiles.task_section`). The node agent rotates the files
past a size (``tessera.common.logfiles``) and keeps the files of the last
``keep_dead`` workers that ended, for reading after the fact.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tessera.common import logfiles
from tessera.common.errors import InvalidArgumentError, NotFoundError

WORKER_ID_LEN = 8
SUFFIXES = ("out", "err")
#: The most one read returns.
MAX_READ = 4 * 2**20
#: Actors whose worker is remembered after it ended (their logs stay readable by actor id).
ACTORS_KEPT = 10_000


@dataclass
class _Worker:
    pid: int = 0
    actor_id: bytes = b""
    alive: bool = True


class WorkerLogs:
    def __init__(self, folder: Path, *, max_bytes: int, backups: int, keep_dead: int = 500) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.backups = backups
        self.keep_dead = keep_dead
        self._workers: OrderedDict[bytes, _Worker] = OrderedDict()
        self._actors: OrderedDict[bytes, bytes] = OrderedDict()  # actor -> its (last) worker on this node

    def prefix(self, worker_id: bytes) -> str:
        """What a worker's ``TESSERA_WORKER_LOG`` says: its files are this plus ``.out`` and ``.err``."""
        return str(self.folder / f"worker-{worker_id.hex()}")

    def path(self, worker_id: bytes, suffix: str) -> Path:
        return self.folder / f"worker-{worker_id.hex()}.{suffix}"

    def started(self, worker_id: bytes, pid: int, actor_id: bytes = b"") -> None:
        self._workers[worker_id] = _Worker(pid, actor_id)
        if actor_id:
            self._actors[actor_id] = worker_id
            self._actors.move_to_end(actor_id)
            while len(self._actors) > ACTORS_KEPT:
                self._actors.popitem(last=False)

    def ended(self, worker_id: bytes) -> None:
        w = self._workers.get(worker_id)
        if w is not None:
            w.alive = False
            self._workers.move_to_end(worker_id)

    def maintain(self) -> None:
        """Rotate what grew past the limit; remove the files of ended workers beyond the newest ``keep_dead``."""
        for w in list(self._workers):
            for suffix in SUFFIXES:
                logfiles.rotate(self.path(w, suffix), max_bytes=self.max_bytes, backups=self.backups)
        dead = [w for w, info in self._workers.items() if not info.alive]
        for w in dead[: max(0, len(dead) - self.keep_dead)]:
            del self._workers[w]
            for suffix in SUFFIXES:
                for p in self.folder.glob(f"worker-{w.hex()}.{suffix}*"):
                    p.unlink(missing_ok=True)

    def read(self, *, worker_id: bytes = b"", actor_id: bytes = b"", suffix: str = "", offset: int = 0,
             max_bytes: int = 0) -> tuple[bytes, int, int, bytes, int, bool]:
        """Part of a worker's log: data, where it starts, the file's size, the worker, its pid, whether it runs."""
        suffix = suffix or "out"
        if suffix not in SUFFIXES:
            raise InvalidArgumentError(f"suffix must be one of {', '.join(SUFFIXES)}, got {suffix!r}")
        if max_bytes < 0 or max_bytes > MAX_READ:
            raise InvalidArgumentError(f"max_bytes must be between 0 and {MAX_READ}, got {max_bytes}")
        if bool(worker_id) == bool(actor_id):
            raise InvalidArgumentError("give one of worker_id and actor_id")
        if worker_id and len(worker_id) != WORKER_ID_LEN:
            raise InvalidArgumentError(f"worker_id must be {WORKER_ID_LEN} bytes, got {len(worker_id)}")
        if actor_id:
            if len(actor_id) != 16:
                raise InvalidArgumentError(f"actor_id must be 16 bytes, got {len(actor_id)}")
            found = self._actors.get(actor_id)
            if found is None:
                raise NotFoundError(f"no worker ran actor {actor_id.hex()} on this node")
            worker_id = found
        path = self.path(worker_id, suffix)
        try:
            data, start, size = logfiles.read_part(path, offset, max_bytes or MAX_READ)
        except FileNotFoundError:
            raise NotFoundError(f"no log of worker {worker_id.hex()} on this node") from None
        info = self._workers.get(worker_id, _Worker(alive=False))
        return data, start, size, worker_id, info.pid, info.alive


def redirect(prefix: str) -> None:
    """In a worker, first thing: its stdout and stderr append to ``prefix.out`` and ``prefix.err``."""
    for fd, suffix in ((1, "out"), (2, "err")):
        new = logfiles.open_append(Path(f"{prefix}.{suffix}"))
        os.dup2(new, fd)
        os.close(new)


class MarkedStream(io.TextIOBase):
    """A worker's ``sys.stdout`` or ``sys.stderr``: before the first output of each task, a line naming it."""

    def __init__(self, inner: io.TextIOWrapper, current: Callable[[], bytes]) -> None:
        self._inner = inner
        self._current = current
        self._last = b""
        self._at_line_start = True

    def write(self, s: str) -> int:
        if not s:
            return 0
        tid = self._current()
        if tid and tid != self._last:
            self._last = tid
            self._inner.write(("" if self._at_line_start else "\n") + f"{logfiles.MARKER}{tid.hex()}\n")
        self._at_line_start = s.endswith("\n")
        return self._inner.write(s)

    def flush(self) -> None:
        self._inner.flush()

    def fileno(self) -> int:
        return self._inner.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._inner.encoding

    @property
    def buffer(self) -> object:
        return self._inner.buffer
