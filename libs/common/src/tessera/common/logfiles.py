"""Log files that do not grow without end: rotation by copy and truncate, and reading a part of one.

A process writes its log through a descriptor opened with ``O_APPEND`` (a service's
stdout and stderr under ``tessera up``, a worker's stdout and stderr). Another process
(the supervisor, the node agent) rotates the file when it passes a size: it copies it to
``NAME.1`` (shifting ``NAME.1`` to ``NAME.2`` and so on, the oldest dropped) and
truncates it, and the writer goes on at the new end, with nothing to reopen (as
logrotate's ``copytruncate``). Lines written between the copy and the truncation are
lost; the window is one copy of at most ``max_bytes``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

#: The line a worker writes to its stdout or stderr before the first output of each task (then the task id).
MARKER = ":task:"


def rotate(path: Path, *, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` if it is larger than ``max_bytes`` (0: never); True if it did."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if max_bytes <= 0 or size <= max_bytes:
        return False
    if backups > 0:
        for i in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as f:
        f.truncate(0)
    return True


def read_part(path: Path, offset: int, max_bytes: int) -> tuple[bytes, int, int]:
    """Up to ``max_bytes`` of ``path`` from ``offset`` (negative: that many bytes before its end): the bytes,
    where they start, and the file's size now. An offset past the end (the file was rotated since) reads
    from the start."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size + offset) if offset < 0 else offset
        if start > size:
            start = 0
        f.seek(start)
        return f.read(max(0, max_bytes)), start, size


def open_append(path: Path) -> int:
    """A descriptor that appends to ``path`` (created, with its folder, if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


_SECTION = re.compile(rb"^" + re.escape(MARKER.encode()) + rb"([0-9a-f]+)$", re.MULTILINE)


def task_section(data: bytes, task_id_hex: str) -> bytes:
    """The lines of ``data`` (a worker's log) written by task ``task_id_hex``: those after each of its markers,
    up to the next marker."""
    out: list[bytes] = []
    marks = list(_SECTION.finditer(data))
    for i, m in enumerate(marks):
        if m.group(1).decode() != task_id_hex:
            continue
        end = marks[i + 1].start() if i + 1 < len(marks) else len(data)
        out.append(data[m.end() + 1:end])
    return b"".join(out)


def without_markers(data: bytes) -> bytes:
    """``data`` (a worker's log) without the lines that mark where each task's output starts."""
    return _LINE.sub(b"", data) if MARKER.encode() in data else data


_LINE = re.compile(rb"^" + re.escape(MARKER.encode()) + rb"[0-9a-f]+\n", re.MULTILINE)
