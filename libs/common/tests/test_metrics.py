"""Metrics and the OpenTelemetry environment: the Prometheus text written from the SDK's collection, the
/metrics endpoint with gRPC call durations, OTEL_* exporters (OTLP over http/protobuf to a local receiver, the
console), JSON logs with trace ids, and the progress feedback of long commands.

A process installs its providers once, so whatever installs them runs in a child process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tessera.common import metrics, telemetry
from tessera.common.progress import Progress, bar


def _child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TESSERA_"))}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_prometheus_text_of_counters_histograms_and_gauges() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    c = meter.create_counter("tessera.things.done", unit="{thing}", description="Things done")
    c.add(2, {"kind": "a"})
    c.add(3, {"kind": 'b"q'})
    h = meter.create_histogram("rpc.server.call.duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 1.0])
    for v in (0.05, 0.5, 0.7, 5.0):
        h.record(v, {"rpc.method": "Get"})
    meter.create_observable_gauge("tessera.object_store.used", unit="By", callbacks=[lambda _o: [Observation(42)]])
    text = metrics.prometheus_text(reader.get_metrics_data(), {"service.name": "x"})
    lines = text.splitlines()
    assert 'target_info{service_name="x"} 1' in lines
    assert "# TYPE tessera_things_done_total counter" in lines
    assert 'tessera_things_done_total{kind="a"} 2' in lines
    assert 'tessera_things_done_total{kind="b\\"q"} 3' in lines
    assert "# TYPE rpc_server_call_duration_seconds histogram" in lines
    assert 'rpc_server_call_duration_seconds_bucket{rpc_method="Get",le="0.1"} 1' in lines
    assert 'rpc_server_call_duration_seconds_bucket{rpc_method="Get",le="1.0"} 3' in lines  # cumulative
    assert 'rpc_server_call_duration_seconds_bucket{rpc_method="Get",le="+Inf"} 4' in lines
    assert 'rpc_server_call_duration_seconds_count{rpc_method="Get"} 4' in lines
    assert any(line.startswith('rpc_server_call_duration_seconds_sum{rpc_method="Get"} 6.25') for line in lines)
    assert "# TYPE tessera_object_store_used_bytes gauge" in lines
    assert "tessera_object_store_used_bytes 42" in lines


def test_prometheus_names_follow_the_otel_mapping() -> None:
    assert metrics.prometheus_name("messaging.client.sent.messages", "{message}", counter=True) == \
        "messaging_client_sent_messages_total"
    assert metrics.prometheus_name("tessera.object_store.spilled", "By", counter=False) == \
        "tessera_object_store_spilled_bytes"
    assert metrics.prometheus_name("x.duration_seconds", "s", counter=False) == "x_duration_seconds"


def test_metrics_endpoint_times_each_grpc_call_by_method_and_status() -> None:
    out = _child("""
        import asyncio, urllib.request
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from tessera.common import metrics, rpc

        async def main():
            metrics.setup_metrics("probe", port=0)
            server = rpc.create_server(token="")
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for _ in range(3):
                    await stub.Check(health_pb2.HealthCheckRequest())
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND
            # context.abort sends the status before the handler's frame unwinds, so the client can see
            # NOT_FOUND a moment before the interceptor records it: read /metrics until it is there (10 s)
            url = f"http://{metrics.metrics_address()}/metrics"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
                if 'rpc_grpc_status_code="5"' in text or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
            print(text)
            await server.stop(None)
            metrics.shutdown_metrics()

        asyncio.run(main())
    """)
    assert out.returncode == 0, out.stderr
    labels = 'rpc_grpc_status_code="{}",rpc_method="Check",rpc_service="grpc.health.v1.Health",rpc_system="grpc"'
    assert f"rpc_server_call_duration_seconds_count{{{labels.format(0)}}} 3" in out.stdout
    assert f"rpc_server_call_duration_seconds_count{{{labels.format(5)}}} 1" in out.stdout  # NOT_FOUND
    assert 'service_name="probe"' in out.stdout


class _Receiver:
    """A small OTLP/HTTP receiver: what was POSTed to /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.posts.append((self.path, self.headers["Content-Type"], body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.httpd.shutdown()
    r.httpd.server_close()


DRIVER = """
    from opentelemetry import metrics as api, trace
    from tessera.common import metrics
    metrics.install_from_env("tessera-driver")
    with trace.get_tracer("t").start_as_current_span("driver-work") as span:
        print(format(span.get_span_context().trace_id, "032x"))
    api.get_meter("t").create_counter("tessera.test.runs").add(4)
"""


def test_otlp_over_http_protobuf_from_the_environment(receiver: _Receiver) -> None:
    out = _child(DRIVER, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                 OTEL_METRICS_EXPORTER="otlp", OTEL_BSP_SCHEDULE_DELAY="50", OTEL_SERVICE_NAME="my-driver")
    assert out.returncode == 0, out.stderr
    trace_id = out.stdout.strip()
    paths = {p for p, _, _ in receiver.posts}
    assert paths == {"/v1/traces", "/v1/metrics"}  # flushed at exit
    assert all(ct == "application/x-protobuf" for _, ct, _ in receiver.posts)
    spans = [s for p, _, b in receiver.posts if p == "/v1/traces"
             for rs in ExportTraceServiceRequest.FromString(b).resource_spans
             for ss in rs.scope_spans for s in ss.spans]
    assert [(s.name, s.trace_id.hex()) for s in spans] == [("driver-work", trace_id)]
    points = {m.name: m.sum.data_points[0].as_int for p, _, b in receiver.posts if p == "/v1/metrics"
              for rm in ExportMetricsServiceRequest.FromString(b).resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}
    assert points == {"tessera.test.runs": 4}
    service = {a.value.string_value for p, _, b in receiver.posts if p == "/v1/traces"
               for rs in ExportTraceServiceRequest.FromString(b).resource_spans
               for a in rs.resource.attributes if a.key == "service.name"}
    assert service == {"my-driver"}


def test_exporters_none_sends_nothing_even_with_an_endpoint(receiver: _Receiver) -> None:
    out = _child(DRIVER, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                 OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    assert out.returncode == 0, out.stderr
    assert receiver.posts == []


def test_console_exporters_print_spans_and_metrics() -> None:
    out = _child(DRIVER, OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="console")
    assert out.returncode == 0, out.stderr
    assert '"name": "driver-work"' in out.stdout
    assert '"name": "tessera.test.runs"' in out.stdout and '"value": 4' in out.stdout


def test_nothing_is_installed_when_nothing_is_exported() -> None:
    out = _child("""
        from opentelemetry import metrics as api, trace
        from tessera.common import metrics
        metrics.install_from_env("tessera-driver")
        print(type(trace.get_tracer_provider()).__name__, type(api.get_meter_provider()).__name__)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ProxyTracerProvider", "_ProxyMeterProvider"]


def test_an_application_provider_is_left_alone() -> None:
    out = _child("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        mine = TracerProvider()
        trace.set_tracer_provider(mine)
        from tessera.common import metrics
        metrics.install_from_env("tessera-driver")
        assert trace.get_tracer_provider() is mine
        print("kept")
    """, OTEL_TRACES_EXPORTER="console")
    assert out.returncode == 0 and out.stdout.strip() == "kept", out.stderr


@pytest.mark.parametrize(("var", "value", "message"), [
    ("OTEL_TRACES_EXPORTER", "otlp,zipkin",
     "OTEL_TRACES_EXPORTER='otlp,zipkin' is not supported: use one of otlp, console, none (or a comma-separated list)"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json",
     "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported: use one of grpc, http/protobuf"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp",
     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='udp' is not supported: use one of grpc, http/protobuf"),
])
def test_an_unsupported_exporter_is_named(monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError) as e:
        telemetry.span_exporters_from_env()
    assert str(e.value) == message


def test_exporter_lists_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    assert telemetry.exporter_choices("TRACES") == []  # no collector configured: nothing is exported
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4317")
    assert telemetry.exporter_choices("TRACES") == ["otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", " Console , otlp,console")
    assert telemetry.exporter_choices("TRACES") == ["console", "otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.exporter_choices("TRACES") == []
    # metrics: the shared endpoint (usually Jaeger, which takes no metrics) is not enough, their own is
    for k in ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert telemetry.exporter_choices("METRICS") == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:4318/v1/metrics")
    assert telemetry.exporter_choices("METRICS") == ["otlp"]


def test_json_logs_carry_trace_and_span_ids() -> None:
    out = _child("""
        import logging
        from opentelemetry import trace
        from tessera.common import telemetry
        telemetry.setup_logging("object-store", "INFO", "json")
        telemetry.setup_tracing("object-store")
        logging.getLogger("x").info("outside")
        with trace.get_tracer("t").start_as_current_span("s") as span:
            c = span.get_span_context()
            print(format(c.trace_id, "032x"), format(c.span_id, "016x"))
            logging.getLogger("tessera.x").warning("inside %d", 7)
    """)
    assert out.returncode == 0, out.stderr
    trace_id, span_id = out.stdout.split()
    outside, inside = (json.loads(line) for line in out.stderr.splitlines())
    assert outside["message"] == "outside" and "trace_id" not in outside and outside["service"] == "object-store"
    assert inside["message"] == "inside 7" and inside["level"] == "WARNING" and inside["logger"] == "tessera.x"
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_only_on_a_terminal_and_prints_each_step() -> None:
    pipe, tty = io.StringIO(), _Tty()
    for stream in (pipe, tty):
        p = Progress(2, stream=stream)
        p.waiting(["a", "b"])
        p.done("a SERVING")
        p.waiting(["b"])
        p.done("b SERVING")
        p.clear()
    assert "\r" not in pipe.getvalue()
    assert [line.split(" (")[0] for line in pipe.getvalue().splitlines()] == ["  [1/2] a SERVING", "  [2/2] b SERVING"]
    assert "waiting for 2: a, b" in tty.getvalue() and "[2/2] b SERVING" in tty.getvalue()
    quiet = io.StringIO()
    q = Progress(1, stream=quiet, quiet=True)
    q.update(1)
    q.done("x")
    assert quiet.getvalue() == ""
    assert bar(3, 4, width=8, label="tune") == "tune [######..] 3/4"
