"""Trace context through a child's environment and a task's ``traceparent`` (tessera.common.telemetry)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tessera.common.telemetry import (
    ENV_TRACEPARENT,
    context_from_env,
    context_from_traceparent,
    current_traceparent,
    traceparent_env,
)

tracer = TracerProvider().get_tracer("test")


def test_nothing_to_pass_without_an_active_span() -> None:
    assert traceparent_env() == {}
    assert current_traceparent() == ""
    assert context_from_env({}) is None
    assert context_from_traceparent("") is None


def test_a_span_travels_through_the_environment_and_back() -> None:
    with tracer.start_as_current_span("parent") as span:
        env = traceparent_env()
        tp = current_traceparent()
    ids = span.get_span_context()
    assert env == {ENV_TRACEPARENT: tp}
    assert tp.startswith(f"00-{ids.trace_id:032x}-{ids.span_id:016x}-")
    for ctx in (context_from_env(env), context_from_traceparent(tp)):
        assert ctx is not None
        got = trace.get_current_span(ctx).get_span_context()
        assert (got.trace_id, got.span_id, got.is_remote) == (ids.trace_id, ids.span_id, True)
        with tracer.start_as_current_span("child", context=ctx) as child:
            assert child.parent is not None and child.parent.span_id == ids.span_id


def test_a_malformed_traceparent_is_no_context() -> None:
    assert context_from_env({ENV_TRACEPARENT: "not a traceparent"}) is None
    assert context_from_traceparent("00-" + "0" * 32 + "-" + "0" * 16 + "-01") is None  # all-zero ids are invalid
