from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tessera.common import telemetry


class Spans:
    """Spans finished by this process, through the global tracer provider."""

    def __init__(self, provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
        self.provider = provider
        self.exporter = exporter

    def finished(self) -> list[ReadableSpan]:
        assert self.provider.force_flush(5000)
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="session")
def _tracing() -> Spans:
    exporter = InMemorySpanExporter()
    provider: TracerProvider = telemetry.setup_tracing("tessera-tests", exporter=exporter)  # type: ignore[assignment]
    assert trace.get_tracer_provider() is provider, "another tracer provider was installed first"
    return Spans(provider, exporter)


@pytest.fixture
def spans(_tracing: Spans) -> Iterator[Spans]:
    _tracing.finished()
    _tracing.exporter.clear()
    yield _tracing


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TESSERA_* setting of the calling shell reaches the test."""
    for k in list(os.environ):
        if k.startswith("TESSERA_"):
            monkeypatch.delenv(k)
