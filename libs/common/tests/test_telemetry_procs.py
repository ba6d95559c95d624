from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
from opentelemetry import trace

from tessera.common import procs, telemetry
from tessera.common.errors import DeadlineExceededError, FailedPreconditionError

# ------------------------------------------------------------------ telemetry


def test_tracing_is_installed_once_with_the_service_resource(spans) -> None:  # type: ignore[no-untyped-def]
    assert telemetry.setup_tracing("another-name") is spans.provider  # once per process
    res = spans.provider.resource.attributes
    assert res["service.name"] == "tessera-tests" and res["service.namespace"] == "tessera"
    assert res["service.version"]


def test_current_trace_id(spans) -> None:  # type: ignore[no-untyped-def]
    assert telemetry.current_trace_id() == ""
    with trace.get_tracer("test").start_as_current_span("op") as span:
        assert telemetry.current_trace_id() == format(span.get_span_context().trace_id, "032x")
    (done,) = [s for s in spans.finished() if s.name == "op"]
    assert done.context.trace_id == span.get_span_context().trace_id


def test_log_lines_carry_service_and_trace_id(spans, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        telemetry.setup_logging("object-store", "debug")
        assert root.level == logging.DEBUG
        log = logging.getLogger("tessera.test")
        log.info("outside")
        with trace.get_tracer("test").start_as_current_span("op") as span:
            log.warning("inside")
        err = capsys.readouterr().err.splitlines()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    tid = format(span.get_span_context().trace_id, "032x")
    assert err[-2].endswith("INFO object-store tessera.test trace=-: outside")
    assert err[-1].endswith(f"WARNING object-store tessera.test trace={tid}: inside")


# ------------------------------------------------------------------ procs


def test_find_binary() -> None:
    assert procs.find_binary("nats-server").endswith("nats-server")
    assert procs.find_binary("redis-server").endswith("redis-server")
    with pytest.raises(FailedPreconditionError, match="no-such-tool not found: pip install no-such-tool"):
        procs.find_binary("no-such-tool")


def test_free_port_and_wait_port() -> None:
    port = procs.free_port()
    assert not procs.port_open("127.0.0.1", port)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError, match=f"nothing listened on 127.0.0.1:{port} within 0.3s"):
        procs.wait_port("127.0.0.1", port, timeout=0.3)
    assert time.monotonic() - t0 < 2


def test_wait_port_fails_early_when_the_process_exits() -> None:
    proc = procs.start([sys.executable, "-c", "raise SystemExit(3)"])
    t0 = time.monotonic()
    with pytest.raises(FailedPreconditionError, match="exited with 3"):
        procs.wait_port("127.0.0.1", procs.free_port(), timeout=20, proc=proc)
    assert time.monotonic() - t0 < 10


def test_start_and_stop_a_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = procs.free_port()
    proc = procs.start(procs.redis_command(port, tmp_path), log_path=tmp_path / "redis.log")
    try:
        procs.wait_port("127.0.0.1", port, timeout=20, proc=proc)
        assert procs.port_open("127.0.0.1", port)
    finally:
        assert procs.stop(proc) == 0  # SIGTERM: a clean exit
    assert not procs.port_open("127.0.0.1", port)
    assert (tmp_path / "redis.log").exists()
    assert procs.stop(proc) == 0  # already stopped: idempotent


def test_stop_kills_what_ignores_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        t0 = time.monotonic()
        assert procs.stop(proc, timeout=0.3) == -9
        assert time.monotonic() - t0 < 5
    finally:  # it ignores SIGTERM: never leave it behind, whatever failed above
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
