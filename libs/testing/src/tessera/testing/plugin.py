"""pytest fixtures: ``nats`` and ``redis`` servers per session, cleaned per test.

- ``nats_url``: a fresh nats-server (JetStream on) shared by the session.
- ``redis_url``: a redis-server shared by the session, flushed before each test.
- ``redis_urls2``: two Redis shards, flushed before each test.
- ``own_redis``: a private redis-server for tests that kill or restart it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tessera.testing._servers import NatsServer, RedisServer, nats_server, redis_server


@pytest.fixture(scope="session")
def nats_srv() -> Iterator[NatsServer]:
    with nats_server() as s:
        yield s


@pytest.fixture
def nats_url(nats_srv: NatsServer) -> str:
    return nats_srv.url


@pytest.fixture(scope="session")
def _redis_pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    with redis_server() as a, redis_server() as b:
        yield a, b


def _flush(*servers: RedisServer) -> None:
    for s in servers:
        with redis.Redis.from_url(s.url) as r:
            r.flushall()


@pytest.fixture
def redis_url(_redis_pair: tuple[RedisServer, RedisServer]) -> str:
    _flush(_redis_pair[0])
    return _redis_pair[0].url


@pytest.fixture
def redis_urls2(_redis_pair: tuple[RedisServer, RedisServer]) -> list[str]:
    _flush(*_redis_pair)
    return [s.url for s in _redis_pair]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s
