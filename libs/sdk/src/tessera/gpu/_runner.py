"""``python -m tessera.gpu._runner``: the process a node agent starts for one job.

Reads ``TESSERA_GPU_ENTRY`` (``package.module:function`` or ``path/to/file.py:function``)
and ``TESSERA_GPU_ARGS`` (a JSON list of strings), imports the function and calls it.
Exit code 0 when it returns, 1 when it raises (the traceback goes to the job's log).

With ``TESSERA_GPU_WARM=1`` the runner starts ahead of any job: it imports torch and the SDK,
then waits for one JSON line on stdin, ``{"env": {...}}``, the job's environment, and runs it.
A node agent keeps one such runner ready, so that a job started or migrated onto the node does
not pay for the interpreter and torch imports (seconds) on its critical path.

With ``TRACEPARENT`` in the job's environment (the node agent passes the trace of the
request that started the job) the function runs under a span of that trace, so the
job's own calls (object store, control store) join it; the spans are flushed on exit.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.common.telemetry import context_from_env, setup_tracing, shutdown_tracing
from tessera.gpu import _job


def load_entry(entry: str) -> Callable[..., Any]:
    mod_name, sep, func = entry.rpartition(":")
    if not sep or not mod_name or not func:
        raise ValueError(f"entry point {entry!r} must be MODULE:FUNCTION or FILE.py:FUNCTION")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        sys.path.insert(0, str(path.resolve().parent))  # as `python FILE.py`: its folder's modules import
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise AttributeError(f"{mod_name} has no function {func!r}")
    return fn  # type: ignore[no-any-return]


def _die_with_agent() -> None:
    """SIGTERM this process when the node agent that started it dies (set here, not in a fork
    hook: the agent is multi-threaded, and Python code between fork and exec is not safe there)."""
    agent = int(os.environ.get("TESSERA_GPU_AGENT_PID", "0") or 0)
    if not agent:
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != agent:  # it died before the line above
        os._exit(1)


def _warm_up() -> None:
    """Pay, ahead of any job, for what a training job's first steps import lazily: torch, the SDK, the
    modules the first optimizer pulls in (torch._dynamo and its dependencies: hundreds of modules,
    seconds) and the autograd engine; and the tracing exporter a job with a trace context sets up."""
    import tessera.gpu  # noqa: F401

    try:
        import torch
    except ImportError:
        pass
    else:
        w = torch.zeros(4, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        (w * 2.0).sum().backward()
        opt.step()
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        pass


def _wait_for_job() -> bool:
    _warm_up()
    fd = int(os.environ.get("TESSERA_GPU_REPORT_FD", "-1") or -1)
    if fd >= 0:  # the runner is ready: its agent may hand it a job
        os.write(fd, (json.dumps({"event": "ready", "pid": os.getpid()}) + "\n").encode())

    line = sys.stdin.readline()
    if not line.strip():
        return False
    desc = json.loads(line)
    os.environ.pop("TESSERA_GPU_WARM", None)
    os.environ.update({str(k): str(v) for k, v in desc.get("env", {}).items()})
    return True


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    _die_with_agent()
    if os.environ.get("TESSERA_GPU_WARM") == "1" and not _wait_for_job():
        return 0
    entry = os.environ.get("TESSERA_GPU_ENTRY", "")
    args = json.loads(os.environ.get("TESSERA_GPU_ARGS", "[]"))
    fn = load_entry(entry)
    parent = context_from_env()
    if parent is None:
        fn(*args)
        return 0
    from opentelemetry import trace

    setup_tracing("gpu-job")
    span = trace.get_tracer("tessera.gpu").start_span(
        f"gpu job {entry.rsplit(':', 1)[-1]}", context=parent,
        attributes={"tessera.gpu.job_id": os.environ.get("TESSERA_GPU_JOB_ID", ""), "tessera.gpu.entry_point": entry})

    def end() -> None:
        if span.is_recording():
            span.end()
            shutdown_tracing()

    _job.on_exit(end)  # a job stopped at a boundary leaves through os._exit
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a killed job still ends (and exports) its span
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
            fn(*args)
    finally:
        end()
    return 0


if __name__ == "__main__":
    sys.exit(main())
