"""The e2e fixtures: an OTLP/gRPC trace receiver (what Jaeger listens with on 4317)
and a whole Tessera stack brought up by the real launcher, exporting to it.

With TESSERA_E2E_STACK=compose the ``stack`` fixture starts nothing: it yields a
:class:`ComposeStack`, the compose stack already running (scripts/compose_up.sh), reached at
its published addresses (.env: the control store on 127.0.0.1:50051, Jaeger's UI and query
API on 127.0.0.1:16686) and at its containers' addresses (asked of the engine: podman or docker).
The compose tests (e2e-tests/test_compose.py, marker ``compose``) run in both modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

BIN = Path(sys.executable).parent
# "up" (default): `tessera up` per test module; "compose": the running compose stack.
STACK_MODE = os.environ.get("TESSERA_E2E_STACK", "up")


@dataclass
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    endpoint: str = ""

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Span(
                            service=service, name=s.name, kind=s.kind, trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                            attributes={a.key: a.value.string_value or a.value.int_value for a in s.attributes},
                        ))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    yield receiver
    server.stop(0)


@dataclass
class Stack:
    run_dir: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "tessera"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json", timeout=30)
        return json.loads(out.stdout)

    def proc(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["processes"] if p["name"] == name)

    def pids(self) -> list[int]:
        cluster = json.loads((self.run_dir / "cluster.json").read_text())
        return [cluster["supervisor_pid"], *(p["pid"] for p in cluster["procs"] if p["pid"])]


def poll_until(check: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ComposeStack:
    """The compose stack started outside the tests; addresses from the environment (defaults: .env's)."""

    control_store_address: str
    jaeger_url: str
    engine: str
    project: str

    @classmethod
    def from_env(cls) -> ComposeStack:
        e = os.environ.get
        return cls(control_store_address=e("TESSERA_E2E_CONTROL_STORE", "127.0.0.1:50051"),
                   jaeger_url=e("TESSERA_E2E_JAEGER_URL", "http://127.0.0.1:16686"),
                   engine=e("TESSERA_E2E_ENGINE", "podman"), project=e("COMPOSE_PROJECT_NAME", "tessera"))

    def containers(self) -> list[dict[str, Any]]:
        """The project's running containers: name, service, hostname and address on the compose network."""
        ids = subprocess.run([self.engine, "ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.split()
        if not ids:
            return []
        found = json.loads(subprocess.run([self.engine, "inspect", *ids], check=True, capture_output=True, text=True,
                                          timeout=60).stdout)
        return [{"name": c["Name"].lstrip("/"), "service": c["Config"]["Labels"].get("com.docker.compose.service", ""),
                 "hostname": c["Config"]["Hostname"], "id": c["Id"],
                 "ip": next((n["IPAddress"] for n in c["NetworkSettings"]["Networks"].values() if n.get("IPAddress")), "")}
                for c in found]

    def reachable(self, address: str) -> str:
        """A registered ``host:port`` (a replica advertises its container hostname) as the host reaches it."""
        host, _, port = address.rpartition(":")
        for c in self.containers():
            if host in (c["hostname"], c["name"], c["service"]) or c["id"].startswith(host):
                return f"{c['ip']}:{port}"
        return address


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[Stack | ComposeStack]:
    if STACK_MODE == "compose":  # already running: started and stopped by scripts/compose_test.sh
        yield ComposeStack.from_env()
        return
    run_dir = tmp_path_factory.mktemp("run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_RUN_DIR=str(run_dir), OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
               OTEL_BSP_SCHEDULE_DELAY="200", TESSERA_HEARTBEAT_INTERVAL_S="0.5")
    s = Stack(run_dir, env)
    up = s.cli("up", "--timeout", "120")
    assert up.returncode == 0, f"tessera up failed:\n{up.stdout}\n{up.stderr}"
    pids = s.pids()
    try:
        yield s
    finally:
        s.cli("down", timeout=60)
        for pid in pids:
            if procs_alive(pid):
                os.kill(pid, 9)


def procs_alive(pid: int) -> bool:
    from tessera._launcher.rundir import alive

    return alive(pid)




@pytest.fixture
def poll() -> Callable[..., Any]:
    return poll_until


class Cluster:
    """A cluster brought up by `tessera up` in its own run directory: the CLI, its plan and its processes."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.env = env

    def cli(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "tessera"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def info(self) -> dict[str, Any]:
        return dict(json.loads((self.run_dir / "cluster.json").read_text()))

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json", timeout=60).stdout))

    def proc(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["processes"] if p["name"] == name)

    def pid(self, name: str) -> int:
        """The pid the supervisor last recorded for ``name`` (0 while it is down), without health probes."""
        return int(next(p["pid"] for p in self.info()["procs"] if p["name"] == name))

    def node_ids(self) -> list[str]:
        return list(dict.fromkeys(p["node_id"] for p in self.info()["procs"] if p.get("node_id")))

    def pids(self) -> list[int]:
        info = self.info()
        return [info["supervisor_pid"], *(p["pid"] for p in info["procs"] if p["pid"])]

    def point_here(self) -> pytest.MonkeyPatch:
        """Point this process's SDK (``tessera.init()``) at the cluster; ``.undo()`` puts the environment back."""
        env = pytest.MonkeyPatch()
        env.setenv("TESSERA_RUN_DIR", str(self.run_dir))
        env.delenv("TESSERA_ADDRESS", raising=False)
        return env

    def kill(self, name: str) -> int:
        pid = self.pid(name)
        os.kill(pid, 9)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 60.0) -> float:
        """Wait until ``name`` runs again under a new pid and answers (SERVING, or UP for NATS/Redis); returns when."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.proc(name)
            if p["pid"] not in (0, old_pid) and p["health"] in ("SERVING", "UP"):
                return time.monotonic()
            time.sleep(0.2)
        raise AssertionError(f"{name} did not come back within {timeout:g}s")


def clean_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """This process's environment without TESSERA_*/OTEL_* settings, pointed at ``run_dir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_RUN_DIR=str(run_dir), OTEL_TRACES_EXPORTER="none", TESSERA_HEARTBEAT_INTERVAL_S="0.5", **extra)
    return env


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Cluster]]:
    """``launch(name, *up_args, **env)`` brings a cluster up; every one it started goes down after the module."""
    started: list[tuple[Cluster, list[int]]] = []

    def up(name: str, *args: str, timeout: float = 150, **env: str) -> Cluster:
        run_dir = tmp_path_factory.mktemp(name)
        c = Cluster(run_dir, clean_env(run_dir, **env))
        r = c.cli("up", *args, "--timeout", str(timeout), timeout=timeout + 30)
        assert r.returncode == 0, f"tessera up failed:\n{r.stdout}\n{r.stderr}"
        started.append((c, c.pids()))
        return c

    try:
        yield up
    finally:
        for c, pids in started:
            c.cli("down", timeout=90)
            for pid in pids:
                if procs_alive(pid):
                    os.kill(pid, 9)
