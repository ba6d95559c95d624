"""pytest fixtures: ``nats`` and ``redis`` servers per session, cleaned per test.

- ``nats_url``: a fresh nats-server (JetStream on) shared by the session.
- ``redis_url``: a redis-server shared by the session, flushed before each test.
- ``redis_urls2``: two Redis shards, flushed before each test.
- ``own_redis``: a private redis-server for tests that kill or restart it.

When the session ends (after every fixture is torn down), a server the tests started that is
still running fails the session: each is named with its command line, then killed
(:mod:`tessera.testing._leaks` says what counts).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest
import redis

from tessera.testing import _leaks
from tessera.testing._servers import NatsServer, RedisServer, nats_server, redis_server

_LEAKS = pytest.StashKey[list[str]]()
#: How long a server still running at the end may take to exit before it counts as leaked: the last
#: fixture's SIGKILL (e.g. after `tessera down`) is delivered, but the process may not be gone yet.
SETTLE_S = 2.0


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if a server outlived it, after killing it: a leaked server holds its port and
    memory until someone notices, and the next run may talk to it instead of its own."""
    leaked = _leaks.TRACKER.leaked()
    deadline = time.monotonic() + SETTLE_S
    while leaked and time.monotonic() < deadline:  # a process killed a moment ago may not have exited yet
        time.sleep(0.1)
        leaked = [p for p in leaked if _leaks.running(p)]
    if not leaked:
        return
    _leaks.kill(leaked)
    lines = [f"pid {p.pid}: {p.command}" for p in leaked]
    session.config.stash[_LEAKS] = lines
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if session.config.pluginmanager.get_plugin("terminalreporter") is None:
        print(_message(lines), file=sys.stderr)


def _message(lines: list[str]) -> str:
    return "\n".join([f"{len(lines)} server(s) started by the tests outlived the session (now killed):",
                      *lines])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_LEAKS, [])
    if lines:
        terminalreporter.section("leaked servers", sep="=", red=True, bold=True)
        terminalreporter.line(_message(lines), red=True)


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
