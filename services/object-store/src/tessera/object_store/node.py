"""One node's object store: the object table plus waiting, pulling and announcing.

:class:`NodeObjectStore` sits between the gRPC servicer and the
:class:`~tessera.object_store.manager.ObjectManager` (memory). It waits for
objects to be sealed, pulls objects held by other nodes (deduplicating
concurrent pulls of one object and checking every chunk's CRC-32C), and reports
copies to the cluster through an injected :class:`Directory`: locations go to
the control store and events (sealed, evicted, spilled, restored, lost) to NATS,
batched off the hot path. No gRPC or NATS here: server.py wires those in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from crc32c import crc32c

from tessera.common import ids
from tessera.common.errors import (
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tessera.object_store.manager import ObjectEntry, ObjectManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    total_size: int
    offset: int
    data: bytes | memoryview
    crc32c: int
    owner: str = ""


@dataclass(frozen=True)
class Locator:
    object_id: bytes
    size: int
    owner: str
    offset: int | None = None  # in the arena
    inline: bytes | None = None


class Directory(Protocol):
    """Where copies are: the cluster's view (the control store), and its announcements."""

    async def add_locations(self, entries: list[tuple[bytes, int, str]]) -> None: ...

    async def remove_locations(self, object_ids: list[bytes]) -> list[bytes]:
        """Forget this node's copies; returns the ids now without any copy (lost)."""
        ...

    async def locate(self, object_id: bytes) -> tuple[bool, list[str]]:
        """(known to the cluster, object-store addresses of other nodes holding a copy)."""
        ...

    async def forget_copy(self, object_id: bytes, address: str) -> list[bytes]:
        """A peer could not serve its copy: drop that location; returns lost ids."""
        ...

    async def announce(self, kind: str, entries: list[tuple[bytes, int, str]]) -> None: ...


#: fetch(address, object_id) -> chunks of the object from that peer.
Fetch = Callable[[str, bytes], AsyncIterator[Chunk]]

POLL_S = 0.05
#: How many freed ids a node remembers, so a copy that arrives after its free (a late pull, a task's return
#: stored after its owner dropped it) is dropped at once.
FREED_MEMORY = 100_000
FLUSH_S = 0.005  # let a burst of seals share one location report
FLUSH_MAX = 512


class NodeObjectStore:
    def __init__(self, manager: ObjectManager, node_id: bytes, *, directory: Directory, fetch: Fetch,
                 inline_threshold: int, chunk_bytes: int) -> None:
        self.manager = manager
        self.node_id = node_id
        self.directory = directory
        self.fetch = fetch
        self.inline_threshold = inline_threshold
        self.chunk_bytes = chunk_bytes
        self.pulls = 0
        self._secondary: set[bytes] = set()  # copies pulled from a peer: the primary lives elsewhere
        self._sealed: dict[bytes, asyncio.Event] = {}
        self._pulling: dict[bytes, asyncio.Task[None]] = {}
        self._outbox: list[tuple[str, bytes, int, str]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._freed: OrderedDict[bytes, str] = OrderedDict()  # object id -> why it was freed (bounded)
        self.frees = 0

    # ------------------------------------------------------------------ events from memory management

    def has_other_copy(self, object_id: bytes) -> bool:
        """For the manager: a pulled copy may be evicted, a primary must be spilled."""
        return object_id in self._secondary

    def on_event(self, kind: str, entry: ObjectEntry) -> None:
        """Called synchronously by the manager; queued for the flusher."""
        if kind in ("evicted", "deleted", "lost", "aborted"):
            self._secondary.discard(entry.object_id)
        if kind == "sealed":
            ev = self._sealed.pop(entry.object_id, None)
            if ev is not None:
                ev.set()
        if kind in ("sealed", "evicted", "spilled", "restored", "deleted", "lost"):
            self._outbox.append((kind, entry.object_id, entry.size, entry.owner))
            self._wake.set()

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="object-events")

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
        for t in list(self._pulling.values()):
            t.cancel()
        await self._flush()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_S)
            try:
                await self._flush()
            except Exception as e:  # the control store or NATS may be restarting
                log.warning("could not report object changes: %s", e)
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _flush(self) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox[:FLUSH_MAX], self._outbox[FLUSH_MAX:]
            try:
                by_kind: dict[str, list[tuple[bytes, int, str]]] = {}
                for kind, oid, size, owner in batch:
                    by_kind.setdefault(kind, []).append((oid, size, owner))
                if "sealed" in by_kind:
                    await self.directory.add_locations(by_kind["sealed"])
                gone = by_kind.get("evicted", []) + by_kind.get("deleted", []) + by_kind.get("lost", [])
                lost: list[bytes] = []
                if gone:
                    lost = await self.directory.remove_locations([g[0] for g in gone])
                for kind in ("sealed", "evicted", "spilled", "restored"):
                    if kind in by_kind:
                        await self.directory.announce(kind, by_kind[kind])
                deleted = {g[0] for g in by_kind.get("deleted", [])}
                really_lost = list(dict.fromkeys(oid for oid in lost if oid not in deleted))
                if really_lost:
                    await self.directory.announce("lost", [(oid, 0, "") for oid in really_lost])
            except BaseException:
                self._outbox[:0] = batch
                raise

    # ------------------------------------------------------------------ reference counting

    def free(self, object_ids: list[bytes], reason: str = "") -> int:
        """Drop this node's copies of freed objects (a pinned one once its last view goes) and remember the
        ids, so a copy that arrives later is dropped too and a get fails at once. Returns copies dropped now."""
        for oid in object_ids:
            ids.check_id("object_id", oid)
        n = 0
        for oid in object_ids:
            self._freed[oid] = reason or "freed"
            self._freed.move_to_end(oid)
            pull = self._pulling.pop(oid, None)
            if pull is not None:
                pull.cancel()
            n += self.manager.free(oid)
            ev = self._sealed.pop(oid, None)
            if ev is not None:  # wake its waiters: they find it freed
                ev.set()
        while len(self._freed) > FREED_MEMORY:
            self._freed.popitem(last=False)
        self.frees += n
        return n

    def freed_reason(self, object_id: bytes) -> str | None:
        return self._freed.get(object_id)

    def _check_not_freed(self, object_id: bytes) -> None:
        why = self._freed.get(object_id)
        if why is not None:
            raise NotFoundError(freed_message(object_id, why))

    def _drop_if_freed(self, object_id: bytes) -> None:
        if object_id in self._freed:
            self.manager.free(object_id)

    # ------------------------------------------------------------------ writes

    def put_inline(self, object_id: bytes, data: bytes, owner: str, session: str, pin: bool, *,
                   durable: bool = False) -> None:
        ids.check_id("object_id", object_id)
        self.manager.put_inline(object_id, data, owner, durable=durable)
        if pin:
            self.manager.pin(object_id, session)
        self._drop_if_freed(object_id)

    def create(self, object_id: bytes, size: int, owner: str, session: str) -> int:
        """Allocate; if ``session`` ends before the seal, the object is aborted."""
        ids.check_id("object_id", object_id)
        return self.manager.create(object_id, size, owner, session=session)

    def seal(self, object_id: bytes, session: str, pin: bool, *, durable: bool = False) -> None:
        ids.check_id("object_id", object_id)
        self.manager.seal(object_id, durable=durable)
        if pin:
            self.manager.pin(object_id, session)
        self._drop_if_freed(object_id)

    # ------------------------------------------------------------------ reads

    async def get(self, object_ids: list[bytes], session: str, timeout_s: float) -> list[Locator]:
        """Wait for each object (pulling it from a peer if needed) and pin it for ``session``.

        Raises:
            DeadlineExceededError: not all objects became available within ``timeout_s``
                (the ones that did stay unpinned: nothing is half-returned).
        """
        ready = self.try_get(object_ids, session)
        if ready is not None:
            return ready
        deadline = time.monotonic() + timeout_s
        results = await asyncio.gather(*(self._await_local(oid, deadline) for oid in object_ids),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            missing = [oid.hex() for oid, r in zip(object_ids, results, strict=True) if isinstance(r, BaseException)]
            if all(isinstance(e, DeadlineExceededError) for e in errors):
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise DeadlineExceededError(f"object {missing[0]}{more} not available within {timeout_s:g}s")
            raise next(e for e in errors if not isinstance(e, DeadlineExceededError))
        return self._pin_all(object_ids, session)

    def try_get(self, object_ids: list[bytes], session: str) -> list[Locator] | None:
        """:meth:`get` without waiting: the objects pinned if every one is here and sealed (or spilled), else None.

        Most gets find their objects here; answering them without a coroutine keeps the local fast path fast.

        Raises:
            InvalidArgumentError: no ids, or an id of the wrong length.
        """
        if not object_ids:
            raise InvalidArgumentError("object_ids is empty")
        for oid in object_ids:
            ids.check_id("object_id", oid)
        for oid in object_ids:
            e = self.manager.get_entry(oid)
            if e is None or e.state not in ("sealed", "spilled") or e.doomed:  # (a freed one: get says so)
                return None
        return self._pin_all(object_ids, session)

    def _pin_all(self, object_ids: list[bytes], session: str) -> list[Locator]:
        out: list[Locator] = []
        pinned: list[bytes] = []
        try:
            for oid in object_ids:
                e = self.manager.pin(oid, session)
                pinned.append(oid)
                if e.size <= self.inline_threshold and e.offset is not None:
                    data = bytes(self.manager.arena.view(e.offset, e.size))
                    self.manager.release(oid, session)
                    pinned.pop()
                    out.append(Locator(oid, e.size, e.owner, inline=data))
                else:
                    out.append(Locator(oid, e.size, e.owner, offset=e.offset))
        except BaseException:
            for oid in pinned:
                self.manager.release(oid, session)
            raise
        return out

    async def _await_local(self, oid: bytes, deadline: float) -> None:
        while True:
            e = self.manager.get_entry(oid)
            if e is not None and e.state in ("sealed", "spilled") and not e.doomed:
                return
            self._check_not_freed(oid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(oid.hex())
            if e is not None:  # being written here: wait for its seal
                ev = self._sealed.setdefault(oid, asyncio.Event())
                try:
                    await asyncio.wait_for(ev.wait(), remaining)
                except TimeoutError:
                    raise DeadlineExceededError(oid.hex()) from None
                continue
            known, peers = await self.directory.locate(oid)
            if peers and self.manager.get_entry(oid) is None:  # (it may have arrived during the lookup)
                await self._pull_dedup(oid, peers, deadline)
                continue
            # not (yet) anywhere: wait for a local seal or a copy elsewhere
            ev = self._sealed.setdefault(oid, asyncio.Event())
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, POLL_S if not known else 4 * POLL_S))
            except TimeoutError:
                pass

    async def _pull_dedup(self, oid: bytes, peers: list[str], deadline: float) -> None:
        task = self._pulling.get(oid)
        if task is None:
            task = asyncio.create_task(self._pull(oid, peers))
            self._pulling[oid] = task
            task.add_done_callback(lambda _t: self._pulling.pop(oid, None))
        remaining = max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            raise DeadlineExceededError(oid.hex()) from None

    async def _pull(self, oid: bytes, peers: list[str]) -> None:
        last: Exception | None = None
        for address in peers:
            try:
                if await self._pull_from(oid, address):
                    self.pulls += 1
                    self._secondary.add(oid)
                return
            except (UnavailableError, DataLossError, NotFoundError, OSError) as e:
                last = e
                log.warning("pull of %s from %s failed: %s", oid.hex(), address, e)
                if isinstance(e, UnavailableError | NotFoundError):
                    lost = await self.directory.forget_copy(oid, address)
                    if lost:
                        await self.directory.announce("lost", [(x, 0, "") for x in lost])
        if last is not None:
            log.info("no peer could serve %s: %s", oid.hex(), last)

    async def _pull_from(self, oid: bytes, address: str) -> bool:
        """Pull ``oid`` from the peer at ``address``; False if it was here already."""
        if self.manager.get_entry(oid) is not None:
            return False
        offset: int | None = None
        written = 0
        try:
            async for chunk in self.fetch(address, oid):
                if offset is None:
                    if self.manager.get_entry(oid) is not None:
                        return False  # it arrived by another way meanwhile
                    offset = self.manager.create(oid, chunk.total_size, chunk.owner)
                if crc32c(chunk.data) != chunk.crc32c:
                    raise DataLossError(f"chunk at {chunk.offset} of {oid.hex()} from {address} failed its CRC check")
                if chunk.offset != written or written + len(chunk.data) > chunk.total_size:
                    raise DataLossError(f"chunks of {oid.hex()} from {address} arrived out of order")
                self.manager.arena.view(offset + written, len(chunk.data))[:] = chunk.data
                written += len(chunk.data)
            if offset is None:
                raise NotFoundError(f"{address} sent nothing for {oid.hex()}")
            entry = self.manager.get_entry(oid)
            if entry is None or written != entry.size:
                raise DataLossError(f"{oid.hex()} from {address}: got {written} bytes, expected "
                                    f"{entry.size if entry else '?'}")
            self.manager.seal(oid)
            self._drop_if_freed(oid)
            return True
        except BaseException:
            if offset is not None and self.manager.get_entry(oid) is not None:
                try:
                    self.manager.abort(oid)
                except FailedPreconditionError:
                    pass
            raise

    async def serve_pull(self, oid: bytes, chunk_bytes: int) -> AsyncIterator[Chunk]:
        """The chunks of a local sealed object, for a peer: views of the arena (no copy).

        The object stays pinned until the stream ends; each view is valid until the
        next chunk is requested.
        """
        ids.check_id("object_id", oid)
        session = f"pull-{id(object())}"
        e = self.manager.pin(oid, session)
        try:
            size = chunk_bytes or self.chunk_bytes
            assert e.offset is not None
            for off in range(0, e.size, size):
                n = min(size, e.size - off)
                view = self.manager.arena.view(e.offset + off, n)
                yield Chunk(e.size, off, view, crc32c(view), e.owner)
        finally:
            self.manager.release(oid, session)


def freed_message(object_id: bytes, reason: str) -> str:
    """The NOT_FOUND message of a get of a freed object (clients tell freed from owner-died by it)."""
    return f"object {object_id.hex()} was freed ({reason or 'freed'})"
