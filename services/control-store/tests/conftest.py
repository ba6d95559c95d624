"""Fixtures of the control-store tests: the domain over real Redis shards, and the service as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids, procs
from tessera.common.registry import control_store_stub
from tessera.common.rpc import health_status
from tessera.control_store.shards import ShardedRedis
from tessera.control_store.store import ControlStore
from tessera.testing import NatsServer, RedisServer, redis_server, track

# ---------------------------------------------------------------------- the domain


class Clock:
    """An injected clock in milliseconds that tests move by hand."""

    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@dataclass
class Published:
    """What the store handed to its ``publish`` callable."""

    events: list[tuple[str, pb.ChangeEvent]] = field(default_factory=list)

    async def __call__(self, subject: str, data: bytes) -> None:
        self.events.append((subject, pb.ChangeEvent.FromString(data)))

    def subjects(self) -> list[str]:
        return [s for s, _ in self.events]

    def clear(self) -> None:
        self.events.clear()


@pytest.fixture(params=[1, 2], ids=["1shard", "2shards"])
def shard_urls(request: pytest.FixtureRequest) -> list[str]:
    if request.param == 1:
        return [request.getfixturevalue("redis_url")]
    return list(request.getfixturevalue("redis_urls2"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture
async def db(shard_urls: list[str]) -> AsyncIterator[ShardedRedis]:
    d = ShardedRedis(shard_urls)
    yield d
    await d.close()


@pytest.fixture
async def store(db: ShardedRedis, published: Published, clock: Clock) -> ControlStore:
    return ControlStore(db, publish=published, node_timeout_s=10.0, clock=clock)


Snapshot = list[dict[bytes, bytes]]


@pytest.fixture
def snapshot(db: ShardedRedis) -> Callable[[], Snapshot]:
    """Every key of every shard with its serialized value: equal snapshots mean nothing changed."""

    def take() -> Snapshot:
        out: Snapshot = []
        for url in db.urls:
            with redis.Redis.from_url(url) as r:
                out.append({k: r.dump(k) for k in sorted(r.keys("*"))})
        return out

    return take


@pytest.fixture
def ids_on_shard(db: ShardedRedis) -> Callable[[str, int, int], list[bytes]]:
    """``n`` fresh ids of ``kind`` that the store places on shard ``shard``."""

    def make(kind: str, shard: int, n: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < n:
            i = ids.new_id(kind)
            if db.n == 1 or zlib.crc32(i) % db.n == shard:
                out.append(i)
        return out

    return make


@pytest.fixture
def job_id() -> bytes:
    return ids.new_id("job_id")


@pytest.fixture
def function_id() -> bytes:
    return ids.new_id("function_id")


@pytest.fixture
def spec(job_id: bytes, function_id: bytes) -> Callable[..., pb.TaskSpec]:
    """A valid TaskSpec; keyword arguments override its fields."""

    def make(task_id: bytes | None = None, **kw: object) -> pb.TaskSpec:
        base: dict[str, object] = dict(task_id=ids.new_id("task_id") if task_id is None else task_id, job_id=job_id,
                                       function_id=function_id, function_name="mod.fn", num_returns=1)
        base.update(kw)
        return pb.TaskSpec(**base)  # type: ignore[arg-type]

    return make


# ---------------------------------------------------------------------- the service as a process


def _env(nats_url: str, redis_urls: list[str], port: int, instance_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(
        TESSERA_NATS_URL=nats_url,
        TESSERA_REDIS_URLS=",".join(redis_urls),
        TESSERA_GRPC_PORT=str(port),
        TESSERA_CONTROL_STORE_ADDRESS=f"127.0.0.1:{port}",
        TESSERA_INSTANCE_ID=instance_id,
        TESSERA_HEARTBEAT_INTERVAL_S="0.5",
        TESSERA_SHUTDOWN_GRACE_S="1",
        TESSERA_LOG_LEVEL="INFO",
        OTEL_TRACES_SAMPLER="always_off",
    )
    return env


@dataclass
class ControlStoreProcess:
    """One ``python -m tessera.control_store`` replica."""

    address: str
    instance_id: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stub(self, timeout: float = 10.0) -> tuple[object, object]:
        return control_store_stub(self.address, timeout=timeout)


class Launcher:
    """Starts control-store processes against one NATS and a list of Redis shards; stops them all at the end."""

    def __init__(self, nats_url: str, redis_urls: list[str], log_dir: Path) -> None:
        self.nats_url = nats_url
        self.redis_urls = redis_urls
        self.log_dir = log_dir
        self.started: list[ControlStoreProcess] = []

    def start(self, instance_id: str = "cs-1", *, wait: bool = True, **env: str) -> ControlStoreProcess:
        """Start a replica; keyword arguments are extra environment variables."""
        port = procs.free_port()
        log_path = self.log_dir / f"{instance_id}-{port}.log"
        proc = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=log_path,
                           env={**_env(self.nats_url, self.redis_urls, port, instance_id), **env})
        track(proc)
        cs = ControlStoreProcess(f"127.0.0.1:{port}", instance_id, proc, log_path)
        self.started.append(cs)
        if wait:
            self.wait_serving(cs)
        return cs

    @staticmethod
    def wait_serving(cs: ControlStoreProcess, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cs.proc.poll() is not None:
                raise AssertionError(f"control store exited with {cs.proc.returncode}:\n{cs.log()[-4000:]}")
            if health_status(cs.address, timeout=0.5) == "SERVING":
                return
            time.sleep(0.05)
        raise AssertionError(f"control store not SERVING within {timeout}s:\n{cs.log()[-4000:]}")

    def stop_all(self) -> None:
        for cs in self.started:
            if cs.proc.poll() is None:
                procs.stop(cs.proc, timeout=10)


@pytest.fixture(scope="session")
def _cs_redis() -> Iterator[RedisServer]:
    """The Redis of the shared control-store process (kept apart from the per-test flushed servers)."""
    with redis_server() as s:
        yield s


@pytest.fixture(scope="session")
def _cs_logs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tessera-cs-logs-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def control_store_proc(nats_srv: NatsServer, _cs_redis: RedisServer, _cs_logs: Path) -> Iterator[ControlStoreProcess]:
    """A control-store process shared by the session; tests use fresh ids and namespaces."""
    launcher = Launcher(nats_srv.url, [_cs_redis.url], _cs_logs)
    try:
        yield launcher.start("cs-shared")
    finally:
        launcher.stop_all()


@pytest.fixture
def control_store(control_store_proc: ControlStoreProcess) -> str:
    """host:port of a SERVING control store."""
    assert control_store_proc.proc.poll() is None, control_store_proc.log()[-4000:]
    return control_store_proc.address


@pytest.fixture
def launcher(nats_srv: NatsServer, own_redis: RedisServer, tmp_path: Path) -> Iterator[Launcher]:
    """Control-store processes of one test, over a Redis of their own."""
    ln = Launcher(nats_srv.url, [own_redis.url], tmp_path)
    try:
        yield ln
    finally:
        ln.stop_all()
