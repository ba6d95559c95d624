"""Versioned records in sharded Redis: the storage layer under every table.

A record is a Redis hash ``{r: <protobuf bytes>, v: <version>}`` at
``<prefix>:<id hex>``. Creates are all-or-none per batch; updates are
read-modify-write with a compare-and-set on the version (a Lua script per shard),
so concurrent control-store replicas never lose each other's writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from google.protobuf.message import Message

from tessera.common.errors import AbortedError, AlreadyExistsError, NotFoundError
from tessera.control_store.shards import ShardedRedis, guard

M = TypeVar("M", bound=Message)

# KEYS[1] = index set ('' for none), KEYS[2..n+1] = records; ARGV = n payloads then n index members.
_CREATE = """
local n = #KEYS - 1
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return i - 1 end
end
for i = 2, #KEYS do
  redis.call('HSET', KEYS[i], 'r', ARGV[i - 1], 'v', 1)
end
if KEYS[1] ~= '' then
  for i = 1, n do redis.call('SADD', KEYS[1], ARGV[n + i]) end
end
return 0
"""

# KEYS = records; ARGV = n expected versions then n payloads. Writes those that match; returns failed positions.
_CAS = """
local n = #KEYS
local failed = {}
for i = 1, n do
  local v = redis.call('HGET', KEYS[i], 'v')
  if v == ARGV[i] then
    redis.call('HSET', KEYS[i], 'r', ARGV[n + i], 'v', tonumber(v) + 1)
  else
    failed[#failed + 1] = i
  end
end
return failed
"""

MAX_CAS_ATTEMPTS = 16


class Table(Generic[M]):
    """One table of versioned protobuf records."""

    def __init__(self, db: ShardedRedis, name: str, prefix: str, msg: type[M], *, indexed: bool = False) -> None:
        self.db = db
        self.name = name
        self.prefix = prefix.encode() + b":"
        self.msg = msg
        self.index_key = f"{prefix}:index".encode() if indexed else b""
        self._create = [c.register_script(_CREATE) for c in db.clients]
        self._cas = [c.register_script(_CAS) for c in db.clients]

    def key(self, ident: bytes) -> bytes:
        return self.prefix + ident.hex().encode()

    async def create_many(self, ids: Sequence[bytes], payloads: Sequence[bytes]) -> None:
        """Create all records or none; ALREADY_EXISTS names the first id that exists."""
        keys = [self.key(i) for i in ids]
        if len(set(keys)) != len(keys):
            seen: set[bytes] = set()
            dup = next(i for i, k in zip(ids, keys, strict=True) if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise AlreadyExistsError(f"{self.name[:-1]} {dup.hex()} appears twice in the request")
        groups = self.db.group(ids)

        async def run(shard: int, pos: list[int]) -> int:
            res = await self._create[shard](
                keys=[self.index_key, *(keys[p] for p in pos)],
                args=[*(payloads[p] for p in pos), *(ids[p].hex() for p in pos)],
            )
            return pos[int(res) - 1] if int(res) else -1

        results = await guard(asyncio.gather(*(run(s, p) for s, p in groups.items())))
        conflicts = [r for r in results if r >= 0]
        if conflicts:
            # undo the shards that did write: the request must change nothing
            done = [p for (s, pos), r in zip(groups.items(), results, strict=True) if r < 0 for p in pos]
            if done:
                await self.delete_many([ids[p] for p in done])
            raise AlreadyExistsError(f"{self.name[:-1]} {ids[conflicts[0]].hex()} already exists")

    async def get_many(self, ids: Sequence[bytes]) -> list[tuple[M | None, int]]:
        """(record, version) per id, in order; (None, 0) where missing."""
        keys = [self.key(i) for i in ids]
        out: list[tuple[M | None, int]] = [(None, 0)] * len(ids)

        async def run(shard: int, pos: list[int]) -> None:
            pipe = self.db.clients[shard].pipeline(transaction=False)
            for p in pos:
                pipe.hmget(keys[p], "r", "v")
            for p, (raw, ver) in zip(pos, await pipe.execute(), strict=True):
                if raw is not None:
                    out[p] = (self.msg.FromString(raw), int(ver))

        await guard(asyncio.gather(*(run(s, p) for s, p in self.db.group(ids).items())))
        return out

    async def get(self, ident: bytes, *, what: str) -> M:
        rec, _ = (await self.get_many([ident]))[0]
        if rec is None:
            raise NotFoundError(f"{what} {ident.hex()} not found")
        return rec

    async def require_many(self, ids: Sequence[bytes], *, what: str) -> list[M]:
        got = await self.get_many(ids)
        missing = [i.hex() for i, (r, _) in zip(ids, got, strict=True) if r is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NotFoundError(f"{what} {missing[0]} not found{more}")
        return [r for r, _ in got]  # type: ignore[misc]

    async def update_many(self, ids: Sequence[bytes], mutate: Callable[[int, M], M | None], *, what: str) -> list[M]:
        """Apply ``mutate(position, record) -> new record`` to each id atomically per record.

        ``mutate`` runs on a fresh read and may raise a domain error, in which case
        nothing is written (all ids are validated before any write). Concurrent
        writers are detected by version and the losers re-read and re-apply.
        """
        todo = list(range(len(ids)))
        result: list[M | None] = [None] * len(ids)
        for attempt in range(MAX_CAS_ATTEMPTS):
            got = await self.get_many([ids[p] for p in todo])
            missing = [ids[p].hex() for p, (r, _) in zip(todo, got, strict=True) if r is None]
            if missing:
                raise NotFoundError(f"{what} {missing[0]} not found")
            new = [mutate(p, r) for p, (r, _) in zip(todo, got, strict=True)]  # type: ignore[arg-type]
            for q, p in enumerate(todo):  # mutate() returning None: nothing to change
                if new[q] is None:
                    result[p] = got[q][0]
            todo_w = [q for q in range(len(todo)) if new[q] is not None]
            keys = [self.key(ids[todo[q]]) for q in range(len(todo))]
            groups = self.db.group([ids[todo[q]] for q in todo_w])
            groups = {s: [todo_w[i] for i in pos] for s, pos in groups.items()}

            async def run(shard: int, pos: list[int], new: list[M | None] = new, got: list[tuple[M | None, int]] = got,
                          keys: list[bytes] = keys) -> list[int]:
                failed = await self._cas[shard](
                    keys=[keys[q] for q in pos],
                    args=[*(got[q][1] for q in pos), *(new[q].SerializeToString() for q in pos)],  # type: ignore[union-attr]
                )
                return [pos[int(f) - 1] for f in failed]

            failed_sets = await guard(asyncio.gather(*(run(s, q) for s, q in groups.items())))
            failed = {q for fs in failed_sets for q in fs}
            for q, p in enumerate(todo):
                if q not in failed and new[q] is not None:
                    result[p] = new[q]
            todo = [todo[q] for q in sorted(failed)]
            if not todo:
                return result  # type: ignore[return-value]
            await asyncio.sleep(0.001 * (attempt + 1))
        raise AbortedError(f"{what} {ids[todo[0]].hex()}: too many concurrent writers, retry")

    async def delete_many(self, ids: Sequence[bytes]) -> int:
        keys = [self.key(i) for i in ids]

        async def run(shard: int, pos: list[int]) -> int:
            pipe = self.db.clients[shard].pipeline(transaction=True)
            pipe.delete(*(keys[p] for p in pos))
            if self.index_key:
                pipe.srem(self.index_key, *(ids[p].hex() for p in pos))
            return int((await pipe.execute())[0])

        if not keys:
            return 0
        return sum(await guard(asyncio.gather(*(run(s, p) for s, p in self.db.group(ids).items()))))

    async def all_ids(self) -> list[bytes]:
        """Every id in the index (indexed tables only)."""
        members = await self.db.each(lambda c: c.smembers(self.index_key))
        return sorted(bytes.fromhex(m.decode()) for ms in members for m in ms)

    async def all(self) -> list[M]:
        ids = await self.all_ids()
        return [r for r, _ in await self.get_many(ids) if r is not None]
