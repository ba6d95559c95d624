"""Test infrastructure as a package: real servers, never mocks.

:func:`nats_server` and :func:`redis_server` start the same binaries that
``tessera up`` runs, on free ports, and stop them on exit. The pytest plugin
(:mod:`tessera.testing.plugin`, loaded automatically) turns them into fixtures, and fails
the session if a server a test started outlives it: a test that starts a server some
other way records it with :func:`track`.
"""

from tessera.testing._leaks import track
from tessera.testing._servers import NatsServer, RedisServer, nats_server, redis_server

__all__ = ["NatsServer", "RedisServer", "nats_server", "redis_server", "track"]
