"""The e2e fixtures: an OTLP/gRPC trace receiver (what Jaeger listens with on 4317)
and a whole Tessera stack brought up by the real launcher, exporting to it.

With TESSERA_E2E_STACK=compose the ``stack`` fixture starts nothing: it yields a
:class:`ComposeStack`, the compose stack already running (scripts/compose_up.sh), reached at
its published addresses (.env: the control store on 127.0.0.1:50051, Jaeger's UI and query
API on 127.0.0.1:16686) and at its containers' addresses (asked of the engine: podman or docker).
The compose tests (e2e-tests/test_compose.py, marker ``compose``) run in both modes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from stacks import Cluster, poll_until, running

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
def stack(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[Cluster | ComposeStack]:
    if STACK_MODE == "compose":  # already running: started and stopped by scripts/compose_test.sh
        yield ComposeStack.from_env()
        return
    with running(tmp_path_factory, "run", otlp_endpoint=otlp.endpoint, timeout=120) as c:
        yield c


@pytest.fixture
def poll() -> Callable[..., Any]:
    return poll_until


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Cluster]]:
    """``launch(name, *up_args, **env)`` brings a cluster up; every one it started goes down after the module."""
    with contextlib.ExitStack() as started:

        def up(name: str, *args: str, timeout: float = 150, **env: str) -> Cluster:
            return started.enter_context(running(tmp_path_factory, name, *args, timeout=timeout, **env))

        yield up
