"""``ActorPool``: spread calls over a fixed set of actors, one call per actor at a time (Ray's ``ray.util.ActorPool``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tessera import _api
from tessera.client.objects import ObjectRef

#: What a submitted function returns: one ref, or a list of them (a call with several returns).
Future = Any


class ActorPool:
    """Run ``fn(actor, value)`` for many values over ``actors``: each call goes to an idle actor, or waits
    for one; results come back in submission order (``get_next``) or as they finish (``get_next_unordered``).

    Example::

        pool = ActorPool([Worker.remote(), Worker.remote()])
        list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3]))  # [2, 4, 6]
    """

    def __init__(self, actors: Iterable[Any]) -> None:
        self._idle: list[Any] = list(actors)
        self._busy: dict[int, tuple[Future, Any]] = {}  # submission index -> (its future, its actor)
        self._pending: list[tuple[Callable[[Any, Any], Future], Any]] = []  # submitted while no actor was idle
        self._submitted = 0  # index of the next submission that reaches an actor
        self._returned = 0  # index of the next result get_next returns

    # ------------------------------------------------------------------ submitting

    def map(self, fn: Callable[[Any, Any], Future], values: Iterable[Any]) -> Iterator[Any]:
        """The results of ``fn(actor, v)`` for each of ``values``, in their order. Results not yet taken
        from earlier submissions are dropped first (as Ray does)."""
        self._drop_outstanding()
        for v in values:
            self.submit(fn, v)
        return self._drain(self.get_next)

    def map_unordered(self, fn: Callable[[Any, Any], Future], values: Iterable[Any]) -> Iterator[Any]:
        """As :meth:`map`, with each result as soon as it is ready."""
        self._drop_outstanding()
        for v in values:
            self.submit(fn, v)
        return self._drain(self.get_next_unordered)

    def _drain(self, take: Callable[[], Any]) -> Iterator[Any]:
        while self.has_next():
            yield take()

    def _drop_outstanding(self) -> None:
        while self.has_next():
            try:
                self.get_next(timeout=0, ignore_if_timedout=True)
            except TimeoutError:
                pass

    def submit(self, fn: Callable[[Any, Any], Future], value: Any) -> None:
        """Call ``fn(actor, value)`` on an idle actor (``fn`` must return the call's ref), or once one is idle."""
        if not self._idle:
            self._pending.append((fn, value))
            return
        actor = self._idle.pop()
        future = fn(actor, value)
        refs = future if isinstance(future, list) else [future]
        if not refs or not all(isinstance(r, ObjectRef) for r in refs):
            self._idle.append(actor)
            raise TypeError(f"the function given to ActorPool.submit must return an ObjectRef (an actor call's "
                            f"result), got {type(future).__name__}")
        self._busy[self._submitted] = (future, actor)
        self._submitted += 1

    # ------------------------------------------------------------------ results

    def has_next(self) -> bool:
        """Whether a submitted call's result has not been taken yet."""
        return bool(self._busy)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order.

        Raises:
            StopIteration: nothing is outstanding.
            TimeoutError: it was not ready within ``timeout`` seconds (with ``ignore_if_timedout``, the call
                is dropped from the pool and its actor is free again).
            ValueError: after :meth:`get_next_unordered` took a later result (the order is lost).
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._returned not in self._busy:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        future, _ = self._busy[self._returned]
        refs = future if isinstance(future, list) else [future]
        timed_out = False
        if timeout is not None:
            ready, _ = _api.wait(refs, num_returns=len(refs), timeout=timeout)
            if len(ready) < len(refs):
                if not ignore_if_timedout:
                    raise TimeoutError(f"Timed out waiting for result after {timeout:g}s")
                timed_out = True
        index = self._returned
        self._returned += 1
        self._release(index)
        if timed_out:
            raise TimeoutError(f"Timed out waiting for result after {timeout:g}s: the call was dropped from the pool")
        return _api.get(future)

    def get_next_unordered(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The result of any outstanding call, the first to be ready.

        Raises:
            StopIteration: nothing is outstanding.
            TimeoutError: none was ready within ``timeout`` seconds.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        by_ref = {(f[0] if isinstance(f, list) else f): i for i, (f, _) in self._busy.items()}
        ready, _ = _api.wait(list(by_ref), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError(f"Timed out waiting for result after {timeout:g}s")
        index = by_ref[ready[0]]
        future, _ = self._busy[index]
        self._returned = max(self._returned, index + 1)
        self._release(index)
        return _api.get(future)

    def _release(self, index: int) -> None:
        """The call at ``index`` is done with: its actor takes the oldest waiting submission, or is idle."""
        _, actor = self._busy.pop(index)
        self._return(actor)

    def _return(self, actor: Any) -> None:
        self._idle.append(actor)
        if self._pending:
            self.submit(*self._pending.pop(0))

    # ------------------------------------------------------------------ the actors

    def has_free(self) -> bool:
        """Whether an actor is idle and no submission waits for one."""
        return bool(self._idle) and not self._pending

    def pop_idle(self) -> Any | None:
        """Take an idle actor out of the pool (None if none is free)."""
        return self._idle.pop() if self.has_free() else None

    def push(self, actor: Any) -> None:
        """Add ``actor`` to the pool (it takes a waiting submission at once, if any).

        Raises:
            ValueError: it is in the pool already.
        """
        if any(actor is a for a in self._idle) or any(actor is a for _, a in self._busy.values()):
            raise ValueError("Actor already belongs to current ActorPool")
        self._return(actor)
