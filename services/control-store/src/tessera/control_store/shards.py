"""Redis shards: keys are spread over several Redis instances by a hash of the key.

Every per-key operation goes to ``shard(key)``; batch operations are grouped per
shard and sent as one pipeline or one script call per shard, concurrently.
Per-shard index structures (e.g. the set of all nodes) are read from all shards.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
import redis.exceptions

from tessera.common.errors import UnavailableError

T = TypeVar("T")

_packing_classes: dict[type, type] = {}


def _hiredis_packing(cls: type[aioredis.connection.AbstractConnection]) -> type:
    """``cls`` with commands packed by hiredis (C) rather than redis-py's per-argument Python loop.

    redis-py's synchronous client already packs with hiredis; its asyncio client
    does not, which makes a script call with thousands of arguments cost
    milliseconds of CPU. Arguments hiredis refuses fall back to redis-py's packer,
    which converts or rejects them exactly as before.
    """
    if cls not in _packing_classes:
        def pack_command(self: Any, *args: Any) -> list[bytes]:
            if isinstance(args[0], str):
                args = (*args[0].encode().split(), *args[1:])
            elif b" " in args[0]:
                args = (*args[0].split(), *args[1:])
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                return cls.pack_command(self, *args)  # type: ignore[arg-type]

        _packing_classes[cls] = type(f"HiredisPacking{cls.__name__}", (cls,), {"pack_command": pack_command})
    return _packing_classes[cls]


class ShardedRedis:
    """A fixed list of Redis connections addressed by a hash (crc32 mod N) of the record id.

    Every structure of one record (its hash, its location set, ...) is placed by the
    same id, so one record always lives on one shard.
    """

    def __init__(self, urls: Sequence[str], *, socket_timeout: float = 5.0, password: str = "") -> None:
        if not urls:
            raise ValueError("at least one Redis URL is required")
        self.urls = list(urls)
        self.clients: list[aioredis.Redis] = []
        for u in urls:
            extra = {"password": password} if password else {}  # else a password in the URL, if any
            pool = aioredis.ConnectionPool.from_url(u, socket_timeout=socket_timeout,
                                                    socket_connect_timeout=socket_timeout, health_check_interval=30,
                                                    **extra)
            pool.connection_class = _hiredis_packing(pool.connection_class)
            self.clients.append(aioredis.Redis.from_pool(pool))
        self.n = len(self.clients)

    def index(self, key: bytes) -> int:
        return zlib.crc32(key) % self.n if self.n > 1 else 0

    def shard(self, key: bytes) -> aioredis.Redis:
        return self.clients[self.index(key)]

    def group(self, keys: Sequence[bytes]) -> dict[int, list[int]]:
        """Positions of ``keys`` (record ids) grouped by shard index."""
        out: dict[int, list[int]] = defaultdict(list)
        if self.n == 1:
            out[0] = list(range(len(keys)))
            return out
        for i, k in enumerate(keys):
            out[zlib.crc32(k) % self.n].append(i)
        return out

    async def each(self, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> list[T]:
        """Run ``fn`` on every shard concurrently."""
        return await guard(asyncio.gather(*(fn(c) for c in self.clients)))

    async def ping(self) -> None:
        await self.each(lambda c: c.ping())

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()


async def guard(aw: Awaitable[T]) -> T:
    """Await a Redis operation, turning connection failures into UnavailableError."""
    try:
        return await aw
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        raise UnavailableError(f"Redis unavailable: {e}") from e


def register(client: aioredis.Redis, src: str) -> Any:
    return client.register_script(src)
