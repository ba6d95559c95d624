"""Memory ready ahead of the next large object: a bounded stretch of the arena allocated and mapped in advance.

A fresh arena has no memory behind it (pages are taken on first write, see
:class:`~tessera.object_store.arena.Arena`). The first large object written into
it, by a client's put or by a pull from another node, then pays for the file
system allocating and zeroing every 4 KiB page and for mapping it, which on
tmpfs costs more than copying the bytes. The allocator carves blocks from the
front of the arena and reuses the lowest holes first, so the pages that new
objects will take next are those just above the highest block ever allocated
(:attr:`~tessera.object_store.allocator.Allocator.high_water`).

:class:`Warmer` keeps ``headroom`` bytes above that mark allocated and mapped in
the store's process (:meth:`~tessera.object_store.arena.Arena.warm`), in pieces,
on a thread of the lowest scheduling priority, and follows the mark as it rises.
It starts with the first object: a store never written to holds no memory at all
(an idle cluster costs what its processes do). It costs at most ``headroom`` bytes
of memory beyond what objects have used and never changes what memory holds.
Nothing here imports gRPC or NATS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

from tessera.common.errors import TesseraError
from tessera.object_store.arena import Arena

log = logging.getLogger(__name__)

#: Bytes warmed per call: small enough that a stop waits little, large enough that a call's cost is the pages.
PIECE = 64 * 1024**2
#: How often an idle warmer looks at the allocator's mark again.
POLL_S = 0.25


def headroom_for(requested: int, capacity: int) -> int:
    """The headroom kept for an arena of ``capacity`` bytes: ``requested``, at most half the arena."""
    return max(0, min(requested, capacity // 2))


class Warmer:
    """Keeps ``[high_water(), high_water() + headroom)`` of ``arena`` warm (see the module)."""

    def __init__(self, arena: Arena, high_water: Callable[[], int], headroom: int, *, piece: int = PIECE,
                 poll_s: float = POLL_S) -> None:
        self.arena = arena
        self.high_water = high_water
        self.headroom = headroom
        self.piece = piece
        self.poll_s = poll_s
        self.warmed = 0  # [0, warmed) has been warmed or used
        self.failed: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def target(self) -> int:
        mark = self.high_water()
        return min(self.arena.size, mark + self.headroom) if mark else 0  # nothing before the first object

    def start(self) -> None:
        if self.headroom <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="arena-warmer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop, and wait (up to ``timeout`` seconds) for the piece being warmed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the arena warmer did not stop within %gs", timeout)

    def step(self) -> bool:
        """Warm the next piece below :meth:`target`; False when there is none."""
        # blocks below the mark were written by objects already: their pages exist (mapped or not here)
        start = max(self.warmed, self.high_water())
        end = min(self.target(), start + self.piece)
        if end <= start:
            return False
        self.arena.warm(start, end - start)
        self.warmed = end
        return True

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # the lowest priority: foreground work goes first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.is_set():
            try:
                busy = self.step()
            except (TesseraError, OSError, ValueError) as e:  # a full file system, or the arena closed under it
                self.failed = str(e)
                log.warning("arena warmer stopped: %s", e)
                return
            if not busy:
                self._stop.wait(self.poll_s)
