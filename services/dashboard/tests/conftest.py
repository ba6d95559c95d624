"""Fixtures of the dashboard tests: a real control store (a process, over real NATS and Redis) that a test
can stop and start again on the same port, and the dashboard service as a process in front of it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tessera.common import procs
from tessera.common.rpc import health_status
from tessera.testing import NatsServer, redis_server, track


def _env(nats_url: str, redis_url: str, cs_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_", "JAEGER_"))}
    env.update(TESSERA_NATS_URL=nats_url, TESSERA_REDIS_URLS=redis_url,
               TESSERA_CONTROL_STORE_ADDRESS=f"127.0.0.1:{cs_port}", TESSERA_GRPC_HOST="127.0.0.1",
               TESSERA_HEARTBEAT_INTERVAL_S="0.5", TESSERA_SHUTDOWN_GRACE_S="1", OTEL_TRACES_SAMPLER="always_off",
               **extra)
    return env


def _wait_serving(proc: subprocess.Popen[bytes], address: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while health_status(address, timeout=0.5) != "SERVING":
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, f"{address} not SERVING:\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.1)


@dataclass
class Store:
    """A control-store process that can be stopped and started again on its port."""

    nats_url: str
    redis_url: str
    port: int
    logs: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.logs / f"control-store-{time.monotonic_ns()}.log"
        self.proc = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=log,
                                env=_env(self.nats_url, self.redis_url, self.port, TESSERA_GRPC_PORT=str(self.port)))
        track(self.proc)
        _wait_serving(self.proc, self.address, log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            procs.stop(self.proc, timeout=10)


@pytest.fixture(scope="module")
def store(nats_srv: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with redis_server() as redis:
        s = Store(nats_srv.url, redis.url, procs.free_port(), tmp_path_factory.mktemp("dashboard-logs"))
        s.start()
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture
def service_env(store: Store) -> Callable[..., dict[str, str]]:
    """The environment of a service process in front of ``store``, with ``extra`` variables."""
    return lambda **extra: _env(store.nats_url, store.redis_url, store.port, **extra)


@dataclass
class Dashboard:
    url: str
    address: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def dashboard(store: Store) -> Iterator[Dashboard]:
    port, http = procs.free_port(), procs.free_port()
    log = store.logs / "dashboard.log"
    proc = procs.start([sys.executable, "-m", "tessera.dashboard"], log_path=log,
                       env=_env(store.nats_url, store.redis_url, store.port, TESSERA_GRPC_PORT=str(port),
                                TESSERA_DASHBOARD_PORT=str(http), JAEGER_UI_URL="http://jaeger.test:16686"))
    track(proc)
    try:
        _wait_serving(proc, f"127.0.0.1:{port}", log)
        yield Dashboard(f"http://127.0.0.1:{http}", f"127.0.0.1:{port}", proc, log)
    finally:
        procs.stop(proc, timeout=10)
