"""Tracing and logging setup shared by every process.

``setup_tracing("control-store")`` installs a global TracerProvider whose resource
carries ``service.name`` (``OTEL_SERVICE_NAME`` wins when set) and
``service.namespace=tessera``. Where spans go follows the OpenTelemetry environment:
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console`` or ``none``; unset means OTLP only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT`` is set, so a process with no
collector configured does not retry one forever), ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or
``..._TRACES_PROTOCOL``: ``grpc``, the default, as Jaeger speaks on 4317, or
``http/protobuf`` on 4318), and the ``OTEL_BSP_*`` variables of the batch span processor.
``shutdown_tracing()`` flushes; call it on exit so the last spans are not lost.
Metrics are set up beside tracing by :mod:`tessera.common.metrics`.

A process started on behalf of a traced request (a GPU job) continues that trace
through its environment: the starter puts :func:`traceparent_env` into the child's
environment (``TRACEPARENT``/``TRACESTATE``, the W3C headers as variables) and the
child runs under :func:`context_from_env`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from tessera.common.config import otel_service_name

_provider: TracerProvider | None = None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tessera-common")
    except Exception:  # pragma: no cover - only without package metadata
        return "0"


def setup_tracing(service_name: str, *, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install (once per process) and return the global tracer provider.

    Args:
        service_name: the default ``service.name``; ``OTEL_SERVICE_NAME`` overrides it.
        exporter: export here instead of the OTLP endpoint from the environment (tests).
    """
    global _provider
    if _provider is not None:
        if exporter is not None:
            _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
            _exported[0] = True
        return _provider
    provider = TracerProvider(resource=resource_for(service_name))
    exporters = [exporter] if exporter is not None else span_exporters_from_env()
    # The batch delay is the SDK's OTEL_BSP_SCHEDULE_DELAY when set, else half a second (the SDK's 5 s default
    # leaves a short-lived command's spans unexported for too long); the other OTEL_BSP_* variables are read by
    # the SDK itself.
    delay = None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else 500
    for e in exporters:
        provider.add_span_processor(BatchSpanProcessor(e, schedule_delay_millis=delay))
    trace.set_tracer_provider(provider)
    _provider = provider
    _exported[0] = bool(exporters)
    return provider


_exported = [False]

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")


def otlp_protocol(signal: str) -> str:
    """``OTEL_EXPORTER_OTLP_<signal>_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else grpc."""
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = os.environ.get(var, "").strip().lower()
        if raw:
            if raw not in PROTOCOLS:
                raise ValueError(f"{var}={raw!r} is not supported: use one of {', '.join(PROTOCOLS)}")
            return raw
    return "grpc"


def exporter_choices(signal: str) -> list[str]:
    """What ``signal`` (TRACES or METRICS) is exported with: ``OTEL_<signal>_EXPORTER``, a comma-separated list
    of otlp and console (none: nothing). Unset, it is otlp when an OTLP endpoint for the signal is configured and
    nothing otherwise: the spec's default of otlp to localhost would have every process without a collector retry
    one forever. For traces the shared ``OTEL_EXPORTER_OTLP_ENDPOINT`` counts; for metrics only
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` does, because the shared endpoint is usually Jaeger, which takes no
    metrics (``OTEL_METRICS_EXPORTER=otlp`` sends them to the shared endpoint).

    Raises:
        ValueError: an exporter this process does not have, naming the ones it has.
    """
    var = f"OTEL_{signal}_EXPORTER"
    raw = os.environ.get(var, "").strip().lower()
    if not raw:
        endpoint = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        if signal != "METRICS":
            endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    bad = [n for n in names if n not in EXPORTERS]
    if bad or not names:
        raise ValueError(f"{var}={raw!r} is not supported: use one of {', '.join(EXPORTERS)} (or a comma-separated list)")
    return [] if "none" in names else names


def span_exporters_from_env() -> list[SpanExporter]:
    """The span exporters the OTEL_* environment asks for (none: an empty list)."""
    out: list[SpanExporter] = []
    for choice in exporter_choices("TRACES"):
        if choice == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        elif otlp_protocol("TRACES") == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

            out.append(HttpSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())
    return out


def resource_for(service_name: str) -> Resource:
    """The resource of this process's telemetry: ``service.name`` (``OTEL_SERVICE_NAME`` wins), namespace and
    version, merged with ``OTEL_RESOURCE_ATTRIBUTES``."""
    return Resource.create(
        {
            "service.name": otel_service_name(service_name),
            "service.namespace": "tessera",
            "service.version": _version(),
        }
    )


def tracer_provider_installed() -> bool:
    """Whether the application (or this module) has installed an SDK tracer provider already."""
    return _provider is not None or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def spans_exported() -> bool:
    """Whether this process exports its spans (an OTLP endpoint or a test's exporter): then a request made in
    a trace takes a path that carries the trace (gRPC), not one that does not (an object store's Unix socket)."""
    return _exported[0]


def shutdown_tracing() -> None:
    """Flush and stop the exporter (idempotent)."""
    global _provider
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)
        _provider.shutdown()
        _provider = None


def flush_tracing(timeout_millis: int = 2000) -> None:
    """Export the spans ended so far now (a process that may be killed at any time: a worker)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=timeout_millis)


def current_trace_id() -> str:
    """Hex trace id of the active span, or '' when there is none."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


ENV_TRACEPARENT, ENV_TRACESTATE = "TRACEPARENT", "TRACESTATE"


def traceparent_env() -> dict[str, str]:
    """The active trace context as environment variables (empty when no span is active)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    out = {}
    if carrier.get("traceparent"):
        out[ENV_TRACEPARENT] = carrier["traceparent"]
        if carrier.get("tracestate"):
            out[ENV_TRACESTATE] = carrier["tracestate"]
    return out


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the active span, or '' when there is none (cheap when untraced)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> Context | None:
    """The trace context a ``traceparent`` names, or None when it is empty or invalid."""
    return context_from_env({ENV_TRACEPARENT: traceparent}) if traceparent else None


def context_from_env(env: Mapping[str, str] | None = None) -> Context | None:
    """The trace context that ``TRACEPARENT``/``TRACESTATE`` in ``env`` (default: this process's) name,
    or None when there is none."""
    e = os.environ if env is None else env
    if not e.get(ENV_TRACEPARENT):
        return None
    carrier = {"traceparent": e[ENV_TRACEPARENT]}
    if e.get(ENV_TRACESTATE):
        carrier["tracestate"] = e[ENV_TRACESTATE]
    ctx = propagate.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


class _TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "-"
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors: the time (RFC 3339, UTC), level, service, logger, message,
    and the active span's trace_id and span_id (absent outside a span) so a line leads to its trace."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id, span_id = getattr(record, "trace_id", "-"), getattr(record, "span_id", "-")
        if trace_id != "-":
            out["trace_id"], out["span_id"] = trace_id, span_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service_name: str, level: str = "INFO", log_format: str = "text") -> None:
    """Log lines to stderr with the service name and the active trace id: as text, or (``log_format="json"``,
    ``TESSERA_LOG_FORMAT=json``) as JSON objects with trace_id and span_id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service_name))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service_name} %(name)s trace=%(trace_id)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
