"""Clusters brought up by the real launcher (`tessera up`) for the e2e tests: one way to start
them, to reach their processes and to take them down, whatever the test module."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tessera.testing import track

BIN = Path(sys.executable).parent


def clean_env(run_dir: Path, *, otlp_endpoint: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without TESSERA_*/OTEL_* settings, pointed at ``run_dir``; traces go
    to ``otlp_endpoint`` when one is given, nowhere otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_RUN_DIR=str(run_dir), TESSERA_HEARTBEAT_INTERVAL_S="0.5")
    if otlp_endpoint:
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
    else:
        env.update(OTEL_TRACES_EXPORTER="none")
    env.update(extra)
    return env


def poll_until(check: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """``check()``'s first truthy result, tried every ``interval`` seconds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    from tessera._launcher.rundir import alive as _alive

    return _alive(pid)


class Cluster:
    """A cluster brought up by `tessera up` in its own run directory: the CLI, its plan and its processes."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.env = env

    def cli(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "tessera"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def info(self) -> dict[str, Any]:
        """The launcher's plan (cluster.json): processes as last recorded, addresses, NATS and Redis URLs."""
        return dict(json.loads((self.run_dir / "cluster.json").read_text()))

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json", timeout=60).stdout))

    def proc(self, name: str) -> dict[str, Any]:
        """Process ``name`` as `tessera status` sees it now (with its health)."""
        return next(p for p in self.status()["processes"] if p["name"] == name)

    def record(self, name: str) -> dict[str, Any]:
        """Process ``name`` as the supervisor last recorded it, without health probes."""
        return dict(next(p for p in self.info()["procs"] if p["name"] == name))

    def pid(self, name: str) -> int:
        """The pid the supervisor last recorded for ``name`` (0 while it is down)."""
        return int(self.record(name)["pid"])

    def address(self, service: str) -> str:
        return str(self.info()["services"][service]["address"])

    def node_ids(self) -> list[str]:
        return list(dict.fromkeys(p["node_id"] for p in self.info()["procs"] if p.get("node_id")))

    def pids(self) -> list[int]:
        info = self.info()
        return [info["supervisor_pid"], *(p["pid"] for p in info["procs"] if p["pid"])]

    def recorded_pids(self) -> list[int]:
        """:meth:`pids`, or none while the launcher has written no readable plan (e.g. ``up`` failed early)."""
        try:
            return self.pids()
        except (OSError, ValueError, KeyError):
            return []

    def track(self) -> list[int]:
        """Record the stack's processes for the session's leak check (tessera.testing); returns their pids."""
        pids = self.recorded_pids()
        for pid in pids:
            track(pid)
        return pids

    def point_here(self) -> pytest.MonkeyPatch:
        """Point this process's SDK (``tessera.init()``) at the cluster; ``.undo()`` puts the environment back."""
        env = pytest.MonkeyPatch()
        env.setenv("TESSERA_RUN_DIR", str(self.run_dir))
        env.delenv("TESSERA_ADDRESS", raising=False)
        return env

    @contextlib.contextmanager
    def driving(self, name: str, **env: str) -> Iterator[None]:
        """This process as a driver of the cluster (``tessera.init(name=name)``, with ``env`` set), until left."""
        import tessera

        patch = self.point_here()
        for k, v in env.items():
            patch.setenv(k, v)
        tessera.init(name=name)
        try:
            yield
        finally:
            tessera.shutdown()
            patch.undo()

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

    def down(self, pids: list[int]) -> None:
        """`tessera down`, then kill -9 whatever of ``pids``, or of the processes the plan names now
        (restarted since), is still alive."""
        pids = list(dict.fromkeys([*pids, *self.track()]))
        try:
            self.cli("down", timeout=90)
        finally:
            for pid in pids:
                if alive(pid):
                    os.kill(pid, 9)


C = TypeVar("C", bound=Cluster)


@contextlib.contextmanager
def running(tmp_path_factory: pytest.TempPathFactory, name: str, *up_args: str, cls: type[C] = Cluster,  # type: ignore[assignment]
            timeout: float = 150, otlp_endpoint: str | None = None, **env: str) -> Iterator[C]:
    """A cluster of ``cls`` brought up with ``tessera up *up_args`` in a fresh run directory, taken
    down (and its processes killed if need be) on leaving."""
    run_dir = tmp_path_factory.mktemp(name)
    c = cls(run_dir, clean_env(run_dir, otlp_endpoint=otlp_endpoint, **env))
    pids: list[int] = []
    try:  # a failed or timed-out `up` may have started some processes: they are taken down too
        r = c.cli("up", *up_args, "--timeout", str(int(timeout)), timeout=timeout + 60)
        pids = c.track()
        assert r.returncode == 0, f"tessera up {' '.join(up_args)} failed:\n{r.stdout}\n{r.stderr}"
        yield c
    finally:
        c.down(pids)
