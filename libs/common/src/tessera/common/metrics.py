"""Metrics shared by every process: the meter provider, its exporters, and a Prometheus ``/metrics`` endpoint.

``setup_metrics("control-store", port=0)`` installs (once per process) a global MeterProvider with the same
resource as tracing, and

- serves the Prometheus text exposition format on ``http://host:port/metrics`` when a port is given
  (``TESSERA_METRICS_PORT``; 0 picks a free one). The text is written here from the SDK's own collection, so
  no Prometheus client library is needed;
- exports over OTLP (or to the console) as ``OTEL_METRICS_EXPORTER``, ``OTEL_EXPORTER_OTLP_PROTOCOL`` and
  ``OTEL_METRIC_EXPORT_INTERVAL`` say (unset: OTLP when an OTLP endpoint is configured).

This module imports neither grpc nor NATS (the gRPC servers' interceptor is in :mod:`tessera.common.rpc`).
Instruments are made with the plain OpenTelemetry metrics API (``opentelemetry.metrics.get_meter``), in the
domain modules as well: the API package has no SDK or transport in it, and is a no-op until this module
installs a provider. Names follow the OTel semantic conventions where they have one
(``rpc.server.call.duration`` in seconds, the current convention that replaced ``rpc.server.duration`` in ms;
``messaging.client.sent.messages`` / ``messaging.client.consumed.messages``) and ``tessera.*`` otherwise.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics

if TYPE_CHECKING:  # the SDK is imported when a provider is installed: importing this module (rpc does) stays cheap
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExporter, MetricReader, MetricsData

log = logging.getLogger(__name__)

#: Histogram boundaries (seconds) for calls and operations that take from a fraction of a millisecond to minutes.
SECONDS_BUCKETS: Sequence[float] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                    10.0, 30.0, 60.0, 300.0)

_provider: MeterProvider | None = None
_server: MetricsServer | None = None
#: rpc.server.call.duration, made when the provider is installed (the gRPC servers' interceptor records into it)
rpc_duration: metrics.Histogram | None = None


def metric_exporters_from_env() -> list[MetricExporter]:
    """The metric exporters the OTEL_* environment asks for (none: an empty list)."""
    from tessera.common import telemetry

    out: list[MetricExporter] = []
    for choice in telemetry.exporter_choices("METRICS"):
        if choice == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            out.append(ConsoleMetricExporter())
        elif telemetry.otlp_protocol("METRICS") == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

            out.append(HttpExporter())
        else:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            out.append(OTLPMetricExporter())
    return out


def meter_provider_installed() -> bool:
    """Whether the application (or this module) has installed an SDK meter provider already."""
    from opentelemetry.sdk.metrics import MeterProvider

    return _provider is not None or isinstance(metrics.get_meter_provider(), MeterProvider)


def setup_metrics(
    service_name: str, *, port: int | None = None, host: str = "127.0.0.1",
    exporter: MetricExporter | None = None, readers: Iterable[MetricReader] = (),
) -> MeterProvider:
    """Install (once per process) and return the global meter provider.

    Args:
        service_name: the default ``service.name``; ``OTEL_SERVICE_NAME`` overrides it.
        port: serve ``/metrics`` on this port (0: a free one); None serves none.
        host: the interface the endpoint binds.
        exporter: export here periodically instead of the exporter from the environment (tests).
        readers: more readers (tests).
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader

    from tessera.common import telemetry

    global _provider, _server
    if _provider is not None:
        return _provider
    all_readers: list[MetricReader] = list(readers)
    if port is not None:
        pull = InMemoryMetricReader()
        all_readers.append(pull)
        _server = MetricsServer(pull, host, port, resource=telemetry.resource_for(service_name).attributes)
    exporters = [exporter] if exporter is not None else metric_exporters_from_env()
    all_readers += [PeriodicExportingMetricReader(e) for e in exporters]
    provider = MeterProvider(resource=telemetry.resource_for(service_name), metric_readers=all_readers)
    metrics.set_meter_provider(provider)
    _provider = provider
    global rpc_duration
    rpc_duration = metrics.get_meter("tessera.rpc").create_histogram(
        "rpc.server.call.duration", unit="s", description="Duration of incoming gRPC calls",
        explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
    if _server is not None:
        _server.start()
    return provider


def install_from_env(service_name: str) -> None:
    """Install a tracer provider and a meter provider configured from the OTEL_* environment, each only where the
    application has not installed its own (a driver: ``tessera.init()``), and only when the environment asks for
    an export (:func:`telemetry.exporter_choices`): a driver with nowhere to send spans keeps the API's no-op
    provider, so its calls record nothing and its tasks carry no trace context. Providers flush at exit."""
    from tessera.common import telemetry

    if not telemetry.tracer_provider_installed() and telemetry.exporter_choices("TRACES"):
        telemetry.setup_tracing(service_name)
    if not meter_provider_installed() and telemetry.exporter_choices("METRICS"):
        setup_metrics(service_name)


def metrics_address() -> str:
    """host:port of this process's ``/metrics`` endpoint, or '' when it serves none."""
    return _server.address if _server is not None else ""


def shutdown_metrics() -> None:
    """Export what is pending and stop the endpoint and the exporters (idempotent)."""
    global _provider, _server
    if _server is not None:
        _server.stop()
        _server = None
    if _provider is not None:
        try:
            _provider.shutdown(timeout_millis=5000)
        except Exception:  # an unreachable collector must not fail a clean exit
            log.warning("metrics exporter did not shut down cleanly", exc_info=True)
        _provider = None
    global rpc_duration
    rpc_duration = None


# ---------------------------------------------------------------------------- observed figures

Reading = float | int | Iterable[tuple[float | int, dict[str, str]]]


def observe(scope: str, name: str, read: Callable[[], Reading], *, kind: str = "gauge", unit: str = "1",
            description: str = "", meter_provider: metrics.MeterProvider | None = None) -> None:
    """Report ``read()`` at each collection as an observable instrument of ``kind`` (``gauge``, ``counter``
    for a running total, ``updown``). ``read`` returns a number, or (value, attributes) pairs (one series each).

    For a service's wiring: the domain keeps plain counters and collections, and what they hold is read only when
    a scrape or an export asks, so the hot paths record nothing.
    """

    def callback(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        try:
            value = read()
        except Exception:  # a figure that cannot be read now is skipped, not a failed scrape
            log.debug("metric %s could not be read", name, exc_info=True)
            return []
        if isinstance(value, int | float):
            return [metrics.Observation(value)]
        return [metrics.Observation(v, a) for v, a in value]

    meter = metrics.get_meter(scope, meter_provider=meter_provider)  # the global provider unless one is given
    make = {"gauge": meter.create_observable_gauge, "counter": meter.create_observable_counter,
            "updown": meter.create_observable_up_down_counter}[kind]
    make(name, callbacks=[callback], unit=unit, description=description)


# ---------------------------------------------------------------------------- Prometheus text

_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "%": "percent"}


def prometheus_name(name: str, unit: str, *, counter: bool) -> str:
    """The Prometheus name of an OTel metric, as the OTel-to-Prometheus compatibility spec maps it:
    invalid characters become ``_``, the unit is a suffix (``_seconds``, ``_bytes``; none for ``1`` and
    ``{annotations}``), and a monotonic counter ends in ``_total``."""
    out = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    if out[:1].isdigit():
        out = "_" + out
    suffix = _UNIT_SUFFIX.get(unit, "" if unit in ("", "1") or unit.startswith("{") else
                              re.sub(r"[^a-zA-Z0-9_]", "_", unit))
    if suffix and not out.endswith("_" + suffix):
        out = f"{out}_{suffix}"
    if counter and not out.endswith("_total"):
        out += "_total"
    return out


def _label_name(key: str) -> str:
    out = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    return "_" + out if out[:1].isdigit() else out


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(attrs: Any, extra: dict[str, str] | None = None) -> str:
    pairs = [(_label_name(k), _escape(v)) for k, v in sorted((attrs or {}).items())]
    pairs += list((extra or {}).items())
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else ""


def _num(v: float | int) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if math.isnan(v):
            return "NaN"
        return repr(v)
    return str(v)


def prometheus_text(data: MetricsData | None, resource: Any = None) -> str:
    """``data`` (cumulative, as a pull reader collects it) in the Prometheus text exposition format 0.0.4,
    with the resource as a ``target_info`` metric."""
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    lines: list[str] = []
    if resource:
        lines += ["# HELP target_info Target metadata", "# TYPE target_info gauge", f"target_info{_labels(resource)} 1"]
    seen: set[str] = set()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                d = m.data
                counter = isinstance(d, Sum) and d.is_monotonic
                name = prometheus_name(m.name, m.unit or "", counter=counter)
                kind = "histogram" if isinstance(d, Histogram) else "counter" if counter else "gauge"
                if name not in seen:  # one HELP/TYPE per family even when two scopes share it
                    seen.add(name)
                    lines.append(f"# HELP {name} {_escape(m.description or m.name)}")
                    lines.append(f"# TYPE {name} {kind}")
                if isinstance(d, Histogram):
                    for p in d.data_points:
                        cumulative = 0
                        for bound, count in zip([*p.explicit_bounds, math.inf], p.bucket_counts, strict=True):
                            cumulative += count
                            lines.append(f"{name}_bucket{_labels(p.attributes, {'le': _num(float(bound))})} {cumulative}")
                        lines.append(f"{name}_sum{_labels(p.attributes)} {_num(p.sum)}")
                        lines.append(f"{name}_count{_labels(p.attributes)} {p.count}")
                elif isinstance(d, Sum | Gauge):
                    for q in d.data_points:
                        lines.append(f"{name}{_labels(q.attributes)} {_num(q.value)}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on a small threaded HTTP server: each scrape collects the pull reader afresh."""

    def __init__(self, reader: InMemoryMetricReader, host: str, port: int, *, resource: Any = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.reader = reader
        self.resource = dict(resource or {})
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = prometheus_text(owner.reader.get_metrics_data(), owner.resource).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.host = host
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
