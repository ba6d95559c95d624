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
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
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
from tessera.object_store.manager import CREATED, ObjectEntry, ObjectManager
from tessera.object_store.transfer import UnauthenticatedError, split_range

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


@dataclass(frozen=True)
class Located:
    """What the cluster knows of an object: whether it exists, and its copies on other nodes."""

    known: bool
    peers: list[str] = field(default_factory=list)  # object-store (gRPC) addresses of other holders
    size: int = 0
    owner: str = ""
    transfer: dict[str, str] = field(default_factory=dict)  # peer address -> its data (socket) address, if any


class Directory(Protocol):
    """Where copies are: the cluster's view (the control store), and its announcements."""

    async def add_locations(self, entries: list[tuple[bytes, int, str]]) -> None: ...

    async def remove_locations(self, object_ids: list[bytes]) -> list[bytes]:
        """Forget this node's copies; returns the ids now without any copy (lost)."""
        ...

    async def locate(self, object_id: bytes) -> Located:
        """Whether the cluster knows the object, and which other nodes hold a copy."""
        ...

    async def forget_copy(self, object_id: bytes, address: str) -> list[bytes]:
        """A peer could not serve its copy: drop that location; returns lost ids."""
        ...

    async def announce(self, kind: str, entries: list[tuple[bytes, int, str]]) -> None: ...

    def refresh(self, address: str) -> None:
        """The peer at ``address`` could not be reached on its data socket: re-read its record
        at the next lookup (it may have restarted with another data port)."""
        ...


#: fetch(address, object_id) -> chunks of the object from that peer.
Fetch = Callable[[str, bytes], AsyncIterator[Chunk]]


class RangeFetch(Protocol):
    """Fill ``dest`` with the bytes ``[start, start + len(dest))`` of an object of ``total_size`` bytes,
    from the holder whose data socket is at ``address`` (every chunk checked)."""

    async def __call__(self, address: str, object_id: bytes, start: int, dest: memoryview,
                       total_size: int) -> None: ...


#: A pull over the data sockets uses this many connections per holder for objects of
#: at least STREAM_MIN bytes each: one stream is one core's worth of copying.
STREAMS_PER_HOLDER = 4
STREAM_MIN = 32 * 1024**2

POLL_S = 0.05
#: How many freed ids a node remembers, so a copy that arrives after its free (a late pull, a task's return
#: stored after its owner dropped it) is dropped at once.
FREED_MEMORY = 100_000
#: Largest chunk a client may ask ReadObject for (gRPC messages are bounded).
MAX_READ_CHUNK = 16 * 2**20
STOP_PULLS_S = 10.0  # how long stop() waits for cancelled pulls to wind down
FLUSH_S = 0.005  # let a burst of seals share one location report
FLUSH_MAX = 512


class NodeObjectStore:
    def __init__(self, manager: ObjectManager, node_id: bytes, *, directory: Directory, fetch: Fetch,
                 inline_threshold: int, chunk_bytes: int, transfer: RangeFetch | None = None,
                 streams_per_holder: int = STREAMS_PER_HOLDER) -> None:
        self.manager = manager
        self.node_id = node_id
        self.directory = directory
        self.fetch = fetch
        self.transfer = transfer
        self.streams_per_holder = streams_per_holder
        self.inline_threshold = inline_threshold
        self.chunk_bytes = chunk_bytes
        self.pulls = 0
        self.transfer_pulls = 0  # pulls completed over the data sockets
        self.transfer_fallbacks = 0  # pulls the data sockets could not complete (then tried over gRPC)
        self.transfer_bytes_received = 0
        self.transfer_bytes_served = 0
        self._secondary: set[bytes] = set()  # copies pulled from a peer: the primary lives elsewhere
        self._sealed: dict[bytes, asyncio.Event] = {}
        self._pulling: dict[bytes, asyncio.Task[None]] = {}
        self._outbox: list[tuple[str, bytes, int, str]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._freed: OrderedDict[bytes, str] = OrderedDict()  # object id -> why it was freed (bounded)
        self.frees = 0
        self._stream_ids = itertools.count(1)  # sessions of WriteObject/ReadObject streams
        #: told (object id, sessions that pin it) when a pinned object is freed: it goes once they release it
        self.freed_pinned: list[Callable[[bytes, list[str]], None]] = []

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
        pulls = list(self._pulling.values())
        for t in pulls:
            t.cancel()
        if pulls:  # a cancelled pull aborts its object once nothing writes into it any more
            await asyncio.wait(pulls, timeout=STOP_PULLS_S)
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
            self._freed[oid] = self._freed.get(oid) or reason or "freed"  # the first word on it stays
            self._freed.move_to_end(oid)
            pull = self._pulling.pop(oid, None)
            if pull is not None:
                pull.cancel()
            n += self.manager.free(oid)
            e = self.manager.get_entry(oid)
            if e is not None and e.doomed and e.pins:
                for tell in self.freed_pinned:
                    tell(oid, list(e.pins))
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

    async def write(self, object_id: bytes, size: int, owner: str,
                    chunks: AsyncIterator[tuple[int, bytes | memoryview, int]], *, durable: bool = False) -> None:
        """Create ``object_id`` and fill it from ``chunks`` ((offset, data, CRC-32C), in order), then seal it.

        For clients that cannot map the arena. Anything wrong (a failed CRC, a gap,
        too many or too few bytes, the stream broken or cancelled) aborts the object:
        nothing half-written stays.

        Raises:
            DataLossError: a chunk failed its CRC check (its bytes were damaged on the way).
            InvalidArgumentError: the chunks do not follow each other, or do not add up to ``size``.
            InvalidArgumentError, AlreadyExistsError, ResourceExhaustedError: as ObjectManager.create.
        """
        ids.check_id("object_id", object_id)
        session = f"write-{next(self._stream_ids)}"
        offset = self.manager.create(object_id, size, owner, session=session)
        written = 0
        try:
            await asyncio.to_thread(self.manager.arena.prepare_write, offset, size)
            async for at, data, crc in chunks:
                n = len(data)
                if at != written:
                    raise InvalidArgumentError(f"chunk at {at} of {object_id.hex()}: expected the chunk at {written}")
                if written + n > size:
                    raise InvalidArgumentError(f"chunks of {object_id.hex()} carry more than its {size} bytes")
                if crc32c(data) != crc:
                    raise DataLossError(f"chunk at {at} of {object_id.hex()} failed its CRC check")
                self.manager.arena.view(offset + written, n)[:] = data
                written += n
            if written != size:
                raise InvalidArgumentError(f"the stream of {object_id.hex()} ended after {written} of {size} bytes")
            self.manager.seal(object_id, durable=durable)
        finally:
            self.manager.release_session(session)  # aborts the object unless it was sealed

    async def read(self, object_id: bytes, timeout_s: float, chunk_bytes: int = 0) -> AsyncIterator[Chunk]:
        """Wait for ``object_id`` as :meth:`get` does, then its chunks, pinned until the stream ends.

        Each chunk's data is a view of the arena, valid until the next chunk is requested.

        Raises:
            NotFoundError: not here within ``timeout_s``, and unknown to the cluster.
            DeadlineExceededError: known (being written or made elsewhere) but not here within ``timeout_s``.
        """
        ids.check_id("object_id", object_id)
        if not 0 <= chunk_bytes <= MAX_READ_CHUNK:
            raise InvalidArgumentError(f"chunk_size must be at most {MAX_READ_CHUNK} bytes, got {chunk_bytes}")
        session = f"read-{next(self._stream_ids)}"
        try:
            (loc,) = await self.get([object_id], session, timeout_s)
        except DeadlineExceededError:
            if self.manager.get_entry(object_id) is None and not (await self.directory.locate(object_id)).known:
                raise NotFoundError(f"object {object_id.hex()} is not in this store and the cluster does not know it "
                                    f"(waited {timeout_s:g}s)") from None
            raise
        if loc.inline is not None:  # small: get() copied it out and holds no pin
            yield Chunk(loc.size, 0, loc.inline, crc32c(loc.inline), loc.owner)
            return
        try:
            assert loc.offset is not None
            size = chunk_bytes or self.chunk_bytes
            for off in range(0, loc.size, size):
                view = self.manager.arena.view(loc.offset + off, min(size, loc.size - off))
                yield Chunk(loc.size, off, view, crc32c(view), loc.owner)
        finally:
            self.manager.release(object_id, session)

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
            located = await self.directory.locate(oid)
            known = located.known
            if located.peers and self.manager.get_entry(oid) is None:  # (it may have arrived during the lookup)
                await self._pull_dedup(oid, located, deadline)
                continue
            # not (yet) anywhere: wait for a local seal or a copy elsewhere
            ev = self._sealed.setdefault(oid, asyncio.Event())
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, POLL_S if not known else 4 * POLL_S))
            except TimeoutError:
                pass

    async def _pull_dedup(self, oid: bytes, located: Located, deadline: float) -> None:
        task = self._pulling.get(oid)
        if task is None:
            task = asyncio.create_task(self._pull(oid, located))
            self._pulling[oid] = task
            task.add_done_callback(lambda _t: self._pulling.pop(oid, None))
        remaining = max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            raise DeadlineExceededError(oid.hex()) from None
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not task.cancelled() or (me is not None and me.cancelling()):
                raise  # this get itself is cancelled
            # the pull was cancelled under it: the object was freed meanwhile, or the store is stopping
            self._check_not_freed(oid)
            raise UnavailableError(f"the pull of {oid.hex()} was cancelled: the object store is stopping") from None

    async def _pull(self, oid: bytes, located: Located) -> None:
        peers = list(located.peers)
        if self.transfer is not None and located.size > 0:
            holders = [a for a in peers if located.transfer.get(a)]
            if holders:
                gone: list[str] = []
                try:
                    if await self._pull_transfer(oid, located, holders, gone):
                        self.pulls += 1
                        self.transfer_pulls += 1
                        self._secondary.add(oid)
                    return
                except (UnavailableError, DataLossError, NotFoundError, FailedPreconditionError,
                        UnauthenticatedError, DeadlineExceededError, InvalidArgumentError, OSError) as e:
                    self.transfer_fallbacks += 1
                    log.warning("pull of %s over the data sockets failed (%s); trying gRPC", oid.hex(), e)
                    peers = [a for a in peers if a not in gone]
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

    async def _pull_transfer(self, oid: bytes, located: Located, holders: list[str], gone: list[str]) -> bool:
        """Pull ``oid`` over the data sockets, its range split over ``holders`` (several streams
        each for a large object); False if it was here already.

        A part whose holder fails goes to another holder; a holder that no longer has
        the object is forgotten (and added to ``gone``). When no holder is left the
        last error is raised and the object is aborted: nothing half-written stays.
        """
        assert self.transfer is not None
        if self.manager.get_entry(oid) is not None:
            return False
        size = located.size
        offset = self.manager.create(oid, size, located.owner)
        try:
            streams = max(1, min(self.streams_per_holder, size // STREAM_MIN))
            todo = split_range(size, len(holders) * streams)
            alive = list(holders)
            last: BaseException | None = None
            await asyncio.to_thread(self.manager.arena.prepare_write, offset, size)
            with self.manager.arena.view(offset, size) as dest:
                while todo:
                    if not alive:
                        assert last is not None
                        raise last
                    jobs = [(part, alive[i % len(alive)]) for i, part in enumerate(todo)]
                    results = await asyncio.gather(
                        *(self.transfer(located.transfer[a], oid, s, dest[s:e], size) for (s, e), a in jobs),
                        return_exceptions=True)
                    todo = []
                    for (part, address), r in zip(jobs, results, strict=True):
                        if r is None:
                            continue
                        if not isinstance(r, Exception):  # a cancellation: stop here
                            raise r
                        last = r
                        todo.append(part)
                        if address in alive:
                            alive.remove(address)
                            log.warning("transfer of %s from %s failed: %s", oid.hex(), address, r)
                            if isinstance(r, UnavailableError):
                                self.directory.refresh(address)
                            if isinstance(r, NotFoundError):
                                gone.append(address)
                                lost = await self.directory.forget_copy(oid, address)
                                if lost:
                                    await self.directory.announce("lost", [(x, 0, "") for x in lost])
            self.manager.seal(oid)
            self.transfer_bytes_received += size
            self._drop_if_freed(oid)
            return True
        except BaseException:
            e = self.manager.get_entry(oid)
            if e is not None and e.state == CREATED and e.offset == offset:
                self.manager.abort(oid)
            raise

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

    def open_range(self, oid: bytes, offset: int, length: int, session: str) -> ObjectEntry:
        """Pin a local sealed object for a peer's transfer of ``[offset, offset + length)`` (a spilled
        one is restored first): its bytes stay at ``entry.offset`` until :meth:`close_range`."""
        ids.check_id("object_id", oid)
        e = self.manager.get_entry(oid)
        if e is None:
            raise NotFoundError(f"object {oid.hex()} is not in this store")
        if offset < 0 or length <= 0 or offset + length > e.size:
            raise InvalidArgumentError(f"range [{offset}, {offset + length}) is outside object {oid.hex()} of "
                                       f"{e.size} bytes")
        return self.manager.pin(oid, session)

    def close_range(self, oid: bytes, session: str, sent: int) -> None:
        self.manager.release(oid, session)
        self.transfer_bytes_served += sent

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
