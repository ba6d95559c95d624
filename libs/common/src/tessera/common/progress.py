"""Feedback on long work in a terminal, and nothing that garbles a pipe or a log.

:class:`Progress` keeps one line that it redraws in place (a bar, or what is still awaited) only when its
stream is a terminal; lines that say something happened (:meth:`Progress.done`) are printed either way, so a
log or a CI transcript still shows each step. ``quiet`` (a ``--json`` run) silences all of it.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    """Progress of ``total`` steps, shown on ``stream`` (default stdout)."""

    def __init__(self, total: int, *, stream: TextIO | None = None, quiet: bool = False, label: str = "") -> None:
        self.total = max(0, total)
        self.count = 0
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.label = label
        self.started = time.monotonic()
        try:
            self.live = not quiet and self.stream.isatty()
        except (AttributeError, ValueError):  # a closed or file-like stream without isatty
            self.live = False
        self._shown = False  # a transient line is on screen
        self._last_draw = 0.0

    def _draw(self, text: str) -> None:
        width = shutil.get_terminal_size((80, 20)).columns - 1
        self.stream.write("\r\033[K" + text[:width])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Remove the transient line (before printing anything else)."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def done(self, what: str) -> None:
        """One step finished: print ``what`` with the count and the time since the start."""
        self.count += 1
        if self.quiet:
            return
        self.clear()
        width = len(str(self.total))
        print(f"  [{self.count:>{width}}/{self.total}] {what} ({time.monotonic() - self.started:.1f}s)",
              file=self.stream, flush=True)

    def waiting(self, names: list[str]) -> None:
        """Show (on a terminal) what is still awaited."""
        if self.live:
            self._draw(f"  waiting for {len(names)}: {', '.join(names)} ({time.monotonic() - self.started:.0f}s)")

    def update(self, count: int, detail: str = "") -> None:
        """Show (on a terminal) a bar at ``count`` of ``total``; redrawn at most 20 times a second."""
        self.count = count
        now = time.monotonic()
        if not self.live or (now - self._last_draw < 0.05 and count < self.total):
            return
        self._last_draw = now
        self._draw(bar(count, self.total, label=self.label, detail=detail))


def bar(count: int, total: int, *, width: int = 30, label: str = "", detail: str = "") -> str:
    """``label [#########.........] 12/40 detail`` (a total of 0 shows an empty bar)."""
    frac = min(1.0, count / total) if total > 0 else 0.0
    filled = int(round(frac * width))
    text = f"[{'#' * filled}{'.' * (width - filled)}] {count}/{total}"
    return " ".join(x for x in (label, text, detail) if x)
