"""A first-in, first-out queue that tasks and actors share, kept by an actor (Ray's ``ray.util.queue``).

Pass the :class:`Queue` itself to tasks and actors: every copy talks to the same actor. A blocking ``put``
or ``get`` waits in the caller, asking the actor again until the item fits or arrives or the timeout
passes, so the actor never holds a call open and serves every caller in turn.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from tessera import _api

__all__ = ["Empty", "Full", "Queue"]

#: A blocking put/get asks the actor again after this long, doubling up to POLL_MAX_S.
POLL_FIRST_S = 0.001
POLL_MAX_S = 0.05


class Empty(queue.Empty):
    """Raised by ``get`` (and ``get_nowait``, ``get_nowait_batch``) when there is nothing to take."""


class Full(queue.Full):
    """Raised by ``put`` (and ``put_nowait``, ``put_nowait_batch``) when there is no room."""


class _QueueActor:
    """The queue's state; each call returns at once (a would-block answers so, and the caller retries)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: deque[Any] = deque()

    def qsize(self) -> int:
        return len(self.items)

    def put_nowait(self, item: Any) -> bool:
        if self.maxsize > 0 and len(self.items) >= self.maxsize:
            return False
        self.items.append(item)
        return True

    def put_nowait_batch(self, items: list[Any]) -> int:
        """Add all of ``items``, or none: the number of items queued before when they do not all fit, else -1."""
        if self.maxsize > 0 and len(items) + len(self.items) > self.maxsize:
            return len(self.items)
        self.items.extend(items)
        return -1

    def get_nowait(self) -> tuple[bool, Any]:
        if not self.items:
            return False, None
        return True, self.items.popleft()

    def get_nowait_batch(self, num_items: int) -> tuple[bool, Any]:
        """``num_items`` items, or (False, how many there are) when there are fewer."""
        if num_items > len(self.items):
            return False, len(self.items)
        return True, [self.items.popleft() for _ in range(num_items)]


class Queue:
    """A queue kept by an actor, for tasks, actors and the driver alike (Ray's ``ray.util.queue.Queue``).

    Args:
        maxsize: the most items it holds; 0 or less: no limit.
        actor_options: options of the actor that keeps it (``num_cpus``, ``resources``, ``name``, ...).
    """

    def __init__(self, maxsize: int = 0, actor_options: dict[str, Any] | None = None) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"maxsize must be an int, got {type(maxsize).__name__}")
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"actor_options must be a dict, got {type(actor_options).__name__}")
        from tessera._remote import ActorClass

        self.maxsize = maxsize
        self.actor = ActorClass(_QueueActor, {}).options(**(actor_options or {})).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """How many items it holds."""
        return int(_api.get(self.actor.qsize.remote()))

    def qsize(self) -> int:
        """How many items it holds."""
        return self.size()

    def empty(self) -> bool:
        return self.size() == 0

    def full(self) -> bool:
        return self.maxsize > 0 and self.size() >= self.maxsize

    # ------------------------------------------------------------------ put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add ``item``; when full, wait for room (up to ``timeout`` seconds; None: for ever) if ``block``.

        Raises:
            Full: no room (at once without ``block``, else after ``timeout``).
            ValueError: a negative ``timeout``.
        """
        if not block:
            self.put_nowait(item)
            return
        _check_timeout(timeout)
        if not _poll(lambda: _api.get(self.actor.put_nowait.remote(item)), timeout):
            raise Full(f"the queue stayed full (maxsize {self.maxsize}) for {timeout:g}s")

    def put_nowait(self, item: Any) -> None:
        """Add ``item`` now, or raise Full."""
        if not _api.get(self.actor.put_nowait.remote(item)):
            raise Full(f"the queue is full (maxsize {self.maxsize})")

    def put_nowait_batch(self, items: Iterable[Any]) -> None:
        """Add all of ``items`` now, in order, or none of them and raise Full."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        batch = list(items)
        before = _api.get(self.actor.put_nowait_batch.remote(batch))
        if before >= 0:
            raise Full(f"Cannot add {len(batch)} items to queue of size {before} and maxsize {self.maxsize}.")

    # ------------------------------------------------------------------ get

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take the oldest item; when empty, wait for one (up to ``timeout`` seconds; None: for ever) if ``block``.

        Raises:
            Empty: nothing came (at once without ``block``, else within ``timeout``).
            ValueError: a negative ``timeout``.
        """
        if not block:
            return self.get_nowait()
        _check_timeout(timeout)
        got: list[Any] = []

        def take() -> bool:
            ok, item = _api.get(self.actor.get_nowait.remote())
            if ok:
                got.append(item)
            return bool(ok)

        if not _poll(take, timeout):
            raise Empty(f"the queue stayed empty for {timeout:g}s")
        return got[0]

    def get_nowait(self) -> Any:
        """Take the oldest item now, or raise Empty."""
        ok, item = _api.get(self.actor.get_nowait.remote())
        if not ok:
            raise Empty("the queue is empty")
        return item

    def get_nowait_batch(self, num_items: int) -> list[Any]:
        """Take the ``num_items`` oldest items now, or none of them and raise Empty."""
        if not isinstance(num_items, int) or isinstance(num_items, bool):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        ok, out = _api.get(self.actor.get_nowait_batch.remote(num_items))
        if not ok:
            raise Empty(f"Cannot get {num_items} items from queue of size {out}.")
        return list(out)

    # ------------------------------------------------------------------ life

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """Stop the queue's actor (its items go with it). ``force`` and ``grace_period_s`` are taken for
        Ray's signature: the actor holds no call open, so it stops at once either way."""
        if self.actor is not None:
            _api.kill(self.actor)
            self.actor = None


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


def _poll(attempt: Any, timeout: float | None) -> bool:
    """Call ``attempt`` until it returns True (then True) or ``timeout`` seconds pass (then False)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = POLL_FIRST_S
    while True:
        if attempt():
            return True
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
        else:
            time.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)
