"""Generator tasks (Ray's names): ``num_returns="streaming"`` gives an :class:`ObjectRefGenerator`,
``num_returns="dynamic"`` one ref whose value is a :class:`DynamicObjectRefGenerator`.

A generator task sends each value it yields to its owner as soon as it is made, so the
consumer reads the first item while the task still runs. An exception the task raises
mid-stream becomes its next item (``get`` of that ref raises it); then the generator
stops. The items are owned and reference counted like any return value: an item
whose refs are all gone is freed, and so are the items a dropped generator never
handed out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from tessera.client.objects import ObjectRef


class ObjectRefGenerator:
    """The refs of a streaming generator task's values, in order, each ready as the task yields it.

    Iterable (``for ref in gen``) and async-iterable (``async for ref in gen``); ``next`` blocks until the
    next value is ready, and raises StopIteration once the task has ended and every value was handed out.
    """

    def __init__(self, task_id: bytes, core: Any) -> None:
        self._task_id = task_id
        self._core = core
        self._done = False

    def __iter__(self) -> Iterator[ObjectRef]:
        return self

    def __next__(self) -> ObjectRef:
        return self._next_sync(None)

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next ref, waiting at most ``timeout_s`` seconds (None: until it comes); GetTimeoutError after
        that (Ray's name)."""
        if self._done:
            raise StopIteration
        oid = self._core.stream_next(self._task_id, timeout_s)
        if oid is None:
            self._done = True
            raise StopIteration
        return ObjectRef(oid)

    def __aiter__(self) -> AsyncIterator[ObjectRef]:
        return self

    async def __anext__(self) -> ObjectRef:
        if self._done:
            raise StopAsyncIteration
        if not self._core.stream_ready(self._task_id):  # wait off the event loop
            await asyncio.to_thread(self._core.stream_next_ready, self._task_id)
        try:
            return self._next_sync(0)
        except StopIteration:
            raise StopAsyncIteration from None

    def is_finished(self) -> bool:
        """Whether every value was handed out (the next ``next`` raises StopIteration)."""
        return self._done

    def task_id(self) -> bytes:
        """The generator task's id."""
        return self._task_id

    def _task_ref(self) -> _TaskRef:
        """What ``tessera.cancel`` needs of a ref: an id whose first bytes are the task's."""
        return _TaskRef(self._task_id + (1).to_bytes(4, "big"))

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._task_id.hex()})"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("an ObjectRefGenerator cannot be passed to another task or actor: pass the refs it yields")

    def __del__(self) -> None:
        core = self._core
        if core is not None and not self._done:
            try:
                core.stream_dropped(self._task_id)
            except Exception:  # interpreter teardown
                pass


class _TaskRef:
    """An object id that is not a ref (it counts nothing): the task it names is all that is used."""

    __slots__ = ("id",)

    def __init__(self, oid: bytes) -> None:
        self.id = oid


class DynamicObjectRefGenerator:
    """The value of a ``num_returns="dynamic"`` task's ref: the refs of every value it yielded, in order."""

    def __init__(self, refs: list[ObjectRef]) -> None:
        self._refs = list(refs)

    def __iter__(self) -> Iterator[ObjectRef]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"
