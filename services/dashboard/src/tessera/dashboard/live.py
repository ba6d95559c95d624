"""Change events fanned out to the open pages (each a server-sent event stream).

The control store announces every write on NATS (``tessera.events.<table>.<op>``); the wiring hands each
event's table here. A busy cluster writes thousands of task records a second, and a page needs to know only
*which* tables changed, so each listener gets the set of tables changed since it last looked, never a backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

#: The tables each page shows: a change elsewhere does not refresh it.
PAGE_TABLES: dict[str, frozenset[str]] = {
    "cluster": frozenset({"nodes", "instances", "kv"}),
    "tasks": frozenset({"tasks", "actors", "functions"}),
    "objects": frozenset({"objects", "kv"}),
    "gpu": frozenset({"kv"}),
    "serving": frozenset({"kv", "instances"}),
}


class Listener:
    """One open page's pending changes."""

    def __init__(self) -> None:
        self.changed: set[str] = set()
        self.ready = asyncio.Event()

    def add(self, table: str) -> None:
        self.changed.add(table)
        self.ready.set()

    def take(self) -> set[str]:
        out, self.changed = self.changed, set()
        self.ready.clear()
        return out


class Broadcaster:
    """Hands each change to every listener; a listener slower than the changes sees them merged."""

    def __init__(self) -> None:
        self._listeners: set[Listener] = set()
        self.published = 0

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def publish(self, table: str) -> None:
        self.published += 1
        for listener in self._listeners:
            listener.add(table)

    async def changes(self, *, heartbeat_s: float = 15.0) -> AsyncIterator[set[str]]:
        """The sets of tables changed, as they change; an empty set after ``heartbeat_s`` without a change
        (so that a proxy keeps the stream open and a closed browser is noticed)."""
        listener = Listener()
        self._listeners.add(listener)
        try:
            while True:
                try:
                    await asyncio.wait_for(listener.ready.wait(), timeout=heartbeat_s)
                except TimeoutError:
                    yield set()
                    continue
                yield listener.take()
        finally:
            self._listeners.discard(listener)
