"""Versioned records in sharded Redis: the storage layer under every table.

A record is a Redis hash ``{r: <protobuf bytes>, v: <version>}`` at
``<prefix>:<id hex>``. Creates are all-or-none per batch; updates are
read-modify-write with a compare-and-set on the version (a Lua script per shard),
so concurrent control-store replicas never lose each other's writes.
"""

from __future__ import annotations

import asyncio
from binascii import hexlify
from collections.abc import AsyncIterator, Callable, Sequence
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

# KEYS[1] = index set ('' for none), KEYS[2..n+1] = records; ARGV = n payloads then n index members.
# Writes every record whether it exists or not (its version goes up by one).
_PUT = """
local n = #KEYS - 1
for i = 2, #KEYS do
  redis.call('HSET', KEYS[i], 'r', ARGV[i - 1])
  redis.call('HINCRBY', KEYS[i], 'v', 1)
end
if KEYS[1] ~= '' then
  for i = 1, n do redis.call('SADD', KEYS[1], ARGV[n + i]) end
end
return 0
"""

# KEYS = records. Returns {payload, version} per key ({false, false} where missing).
_GET = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HMGET', KEYS[i], 'r', 'v') end
return out
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
        self._put = [c.register_script(_PUT) for c in db.clients]
        self._cas = [c.register_script(_CAS) for c in db.clients]
        self._get = [c.register_script(_GET) for c in db.clients]

    def key(self, ident: bytes) -> bytes:
        return self.prefix + hexlify(ident)

    def keys(self, ids: Sequence[bytes]) -> list[bytes]:
        prefix = self.prefix
        return [prefix + hexlify(i) for i in ids]

    async def scan_ids(self, *, batch: int = 1000) -> AsyncIterator[list[bytes]]:
        """Every record's id, a batch at a time, shard by shard (Redis SCAN: records created or deleted
        meanwhile may or may not appear; none that stays is missed)."""
        pattern = self.prefix + b"*"
        start = len(self.prefix)
        for client in self.db.clients:
            cursor: int = 0
            while True:
                cursor, keys = await guard(client.scan(cursor=cursor, match=pattern, count=batch))
                ids = []
                for k in keys:
                    try:
                        ids.append(bytes.fromhex(k[start:].decode()))
                    except ValueError:
                        continue  # not a record (an index or a table's own key)
                if ids:
                    yield ids
                if not cursor:
                    break

    async def create_many(self, ids: Sequence[bytes], payloads: Sequence[bytes]) -> None:
        """Create all records or none; ALREADY_EXISTS names the first id that exists."""
        keys = self.keys(ids)
        if len(set(keys)) != len(keys):
            seen: set[bytes] = set()
            dup = next(i for i, k in zip(ids, keys, strict=True) if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise AlreadyExistsError(f"{self.name[:-1]} {dup.hex()} appears twice in the request")
        groups = self.db.group(ids)

        async def run(shard: int, pos: list[int]) -> int:
            args: list[bytes | str]
            if len(pos) == len(ids):  # one shard holds them all: no regrouping
                rkeys, args = [self.index_key, *keys], list(payloads)
            else:
                rkeys, args = [self.index_key, *[keys[p] for p in pos]], [payloads[p] for p in pos]
            if self.index_key:  # index members, read by the script only for indexed tables
                args += [ids[p].hex() for p in pos]
            res = await self._create[shard](keys=rkeys, args=args)
            return pos[int(res) - 1] if int(res) else -1

        results = await guard(asyncio.gather(*(run(s, p) for s, p in groups.items())))
        conflicts = [r for r in results if r >= 0]
        if conflicts:
            # undo the shards that did write: the request must change nothing
            done = [p for (s, pos), r in zip(groups.items(), results, strict=True) if r < 0 for p in pos]
            if done:
                await self.delete_many([ids[p] for p in done])
            raise AlreadyExistsError(f"{self.name[:-1]} {ids[conflicts[0]].hex()} already exists")

    async def put_many(self, ids: Sequence[bytes], payloads: Sequence[bytes]) -> None:
        """Write all records, replacing any that exist (idempotent: re-running a task records it again)."""
        keys = self.keys(ids)

        async def run(shard: int, pos: list[int]) -> None:
            args: list[bytes | str] = [payloads[p] for p in pos]
            if self.index_key:
                args += [ids[p].hex() for p in pos]
            await self._put[shard](keys=[self.index_key, *[keys[p] for p in pos]], args=args)

        await guard(asyncio.gather(*(run(s, p) for s, p in self.db.group(ids).items())))

    async def get_raw_many(self, ids: Sequence[bytes]) -> list[tuple[bytes | None, int]]:
        """(serialized record, version) per id, in order; (None, 0) where missing.

        One script call per shard reads every record: Redis returns them as a single
        reply, which hiredis decodes at once, where a pipeline costs a Python round of
        reply handling per record.
        """
        if not ids:
            return []
        keys = self.keys(ids)
        out: list[tuple[bytes | None, int]] = [(None, 0)] * len(ids)

        async def run(shard: int, pos: list[int]) -> None:
            rkeys = keys if len(pos) == len(ids) else [keys[p] for p in pos]
            for p, (raw, ver) in zip(pos, await self._get[shard](keys=rkeys), strict=True):
                if raw is not None:
                    out[p] = (raw, int(ver))

        await guard(asyncio.gather(*(run(s, p) for s, p in self.db.group(ids).items())))
        return out

    async def get_many(self, ids: Sequence[bytes]) -> list[tuple[M | None, int]]:
        """(record, version) per id, in order; (None, 0) where missing."""
        parse = self.msg.FromString
        return [(None, 0) if raw is None else (parse(raw), ver) for raw, ver in await self.get_raw_many(ids)]

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
        return [rec for rec, _ in await self.update_raw_many(ids, mutate, what=what)]

    async def update_raw_many(self, ids: Sequence[bytes], mutate: Callable[[int, M], M | None], *,
                              what: str) -> list[tuple[M, bytes]]:
        """:meth:`update_many`, giving each record with the bytes now stored for it."""
        todo = list(range(len(ids)))
        result: list[tuple[M, bytes] | None] = [None] * len(ids)
        parse = self.msg.FromString
        for attempt in range(MAX_CAS_ATTEMPTS):
            got = await self.get_raw_many([ids[p] for p in todo])
            missing = [ids[p].hex() for p, (r, _) in zip(todo, got, strict=True) if r is None]
            if missing:
                raise NotFoundError(f"{what} {missing[0]} not found")
            cur = [parse(raw) for raw, _ in got]  # type: ignore[arg-type]
            new = [mutate(p, r) for p, r in zip(todo, cur, strict=True)]
            todo_w: list[int] = []
            payloads: list[bytes] = [b""] * len(todo)
            for q, p in enumerate(todo):
                rec = new[q]
                if rec is None:  # mutate() returning None: nothing to change
                    result[p] = (cur[q], got[q][0])  # type: ignore[assignment]
                else:
                    todo_w.append(q)
                    payloads[q] = rec.SerializeToString()
            w_ids = [ids[todo[q]] for q in todo_w]
            keys = self.keys(w_ids)
            groups = {s: [(todo_w[i], keys[i]) for i in pos] for s, pos in self.db.group(w_ids).items()}

            async def run(shard: int, items: list[tuple[int, bytes]], got: list[tuple[bytes | None, int]] = got,
                          payloads: list[bytes] = payloads) -> list[int]:
                failed = await self._cas[shard](
                    keys=[k for _, k in items],
                    args=[*[got[q][1] for q, _ in items], *[payloads[q] for q, _ in items]],
                )
                return [items[int(f) - 1][0] for f in failed]

            failed_sets = await guard(asyncio.gather(*(run(s, it) for s, it in groups.items() if it)))
            failed = {q for fs in failed_sets for q in fs}
            for q in todo_w:
                if q not in failed:
                    result[todo[q]] = (new[q], payloads[q])  # type: ignore[assignment]
            todo = [todo[q] for q in sorted(failed)]
            if not todo:
                return result  # type: ignore[return-value]
            await asyncio.sleep(0.001 * (attempt + 1))
        raise AbortedError(f"{what} {ids[todo[0]].hex()}: too many concurrent writers, retry")

    async def delete_many(self, ids: Sequence[bytes]) -> int:
        keys = self.keys(ids)

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
