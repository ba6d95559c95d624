"""Tracing and logging setup shared by every process.

``setup_tracing("control-store")`` installs a global TracerProvider whose resource
carries ``service.name`` (``OTEL_SERVICE_NAME`` wins when set) and
``service.namespace=tessera``. Spans are exported over OTLP/gRPC when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, the protocol
Jaeger speaks on 4317. ``shutdown_tracing()`` flushes; call it on exit so the last
spans are not lost.

A process started on behalf of a traced request (a GPU job) continues that trace
through its environment: the starter puts :func:`traceparent_env` into the child's
environment (``TRACEPARENT``/``TRACESTATE``, the W3C headers as variables) and the
child runs under :func:`context_from_env`.
"""

from __future__ import annotations

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
    resource = Resource.create(
        {
            "service.name": otel_service_name(service_name),
            "service.namespace": "tessera",
            "service.version": _version(),
        }
    )
    provider = TracerProvider(resource=resource)
    if exporter is None and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    _exported[0] = exporter is not None
    return provider


_exported = [False]


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
        return True


def setup_logging(service_name: str, level: str = "INFO") -> None:
    """Log lines to stderr with the service name and the active trace id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceIdFilter())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service_name} %(name)s trace=%(trace_id)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
