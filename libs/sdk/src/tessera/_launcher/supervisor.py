"""The background supervisor that ``tessera up`` leaves running.

It starts NATS and Redis (when managed), the control store, then the other
services; restarts any process that dies, with backoff, logging why (as
compose's ``restart: unless-stopped`` would); and on SIGTERM stops the services
gracefully, then Redis (which flushes its AOF) and NATS, and exits.

Run as ``python -m tessera._launcher.supervisor RUN_DIR``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tessera._launcher.rundir import Cluster, Proc, RunDir, module_of
from tessera.common import logfiles, names, procs  # not auth.py: the supervisor imports neither gRPC nor pydantic

log = logging.getLogger("tessera.supervisor")

GRACE_S = 10.0
POLL_S = 0.2
#: How often the processes' logs are rotated (past TESSERA_LOG_MAX_BYTES, keeping TESSERA_LOG_BACKUPS copies).
ROTATE_S = 10.0


def _env_int(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        return default


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Children get SIGTERM if the supervisor itself dies, so nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def otel_name(p: Proc) -> str:
    """The ``service.name`` of a process's spans: its service, except a gpu-scheduler run as a node's agent."""
    if p.service == "gpu-scheduler" and p.node_id:
        return "gpu-agent"
    return p.service or p.name


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


class Supervisor:
    def __init__(self, run: RunDir, cluster: Cluster | None = None) -> None:
        self.run = run
        cluster = cluster or run.read()
        if cluster is None:
            raise SystemExit(f"no cluster plan in {run.cluster_file}")
        self.cluster: Cluster = cluster
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.next_start: dict[str, float] = {}
        self.stopping = False

    # ------------------------------------------------------------------ commands

    def command(self, p: Proc) -> tuple[list[str], dict[str, str] | None]:
        if p.kind == "nats":
            d = self.run.data / "nats"
            d.mkdir(parents=True, exist_ok=True)
            return procs.nats_command(p.port, d, config=self._nats_config()), None
        if p.kind == "redis":
            d = self.run.data / p.name
            d.mkdir(parents=True, exist_ok=True)
            return procs.redis_command(p.port, d, config=self._redis_config()), None
        env = dict(os.environ)
        env.update(
            TESSERA_NATS_URL=self.cluster.nats_url,
            TESSERA_REDIS_URLS=",".join(self.cluster.redis_urls),
            TESSERA_CONTROL_STORE_ADDRESS=self.cluster.control_store_address,
            TESSERA_GRPC_HOST="127.0.0.1",
            TESSERA_GRPC_PORT=str(p.port),
            TESSERA_INSTANCE_ID=f"{p.name}-{p.port}",
            OTEL_SERVICE_NAME=otel_name(p),
        )
        env.pop("TESSERA_ADVERTISE_HOST", None)
        if p.metrics_port:
            env["TESSERA_METRICS_PORT"] = str(p.metrics_port)
        if p.http_port and p.service == "dashboard":
            env["TESSERA_DASHBOARD_PORT"] = str(p.http_port)
        if p.http_port and p.service == "serving":
            env["TESSERA_SERVING_HTTP_PORT"] = str(p.http_port)
        if self.cluster.auth:  # paths of the secrets, never the secrets (a child's environment is readable)
            env.pop("TESSERA_AUTH_TOKEN", None)
            env.update(TESSERA_AUTH_TOKEN_FILE=str(self.run.secret_file(names.TOKEN_FILE)))
            if any(q.kind == "nats" for q in self.cluster.procs):  # ours; a given NATS keeps the given credentials
                env.pop("TESSERA_NATS_PASSWORD", None)
                env.update(TESSERA_NATS_USER=names.NATS_USER,
                           TESSERA_NATS_PASSWORD_FILE=str(self.run.secret_file(names.NATS_PASSWORD_FILE)))
            if any(q.kind == "redis" for q in self.cluster.procs):
                env.pop("TESSERA_REDIS_PASSWORD", None)
                env.update(TESSERA_REDIS_PASSWORD_FILE=str(self.run.secret_file(names.REDIS_PASSWORD_FILE)))
        if p.node_id:
            env["TESSERA_NODE_ID"] = p.node_id
            env["TESSERA_OBJECT_STORE_SPILL_DIR"] = str(self.run.data / "spill")
        if p.object_store_memory:  # the capacity tessera up chose for this node (and printed)
            env["TESSERA_OBJECT_STORE_MEMORY"] = str(p.object_store_memory)
        return [sys.executable, "-m", module_of(p.service or p.name)], env

    def _nats_config(self) -> Path | None:
        """With --auth: a configuration file (0600) whose authorization block admits only Tessera's user."""
        if not self.cluster.auth:
            return None
        password = self.run.read_secret(names.NATS_PASSWORD_FILE)
        text = f'authorization {{\n  users = [\n    {{ user: "{names.NATS_USER}", password: "{password}" }}\n  ]\n}}\n'
        return self.run.write_secret("nats.conf", text)

    def _redis_config(self) -> Path | None:
        """With --auth: a configuration file (0600) with ``requirepass``, read before the command-line options."""
        if not self.cluster.auth:
            return None
        return self.run.write_secret("redis.conf", f"requirepass {self.run.read_secret(names.REDIS_PASSWORD_FILE)}\n")

    def start(self, p: Proc) -> None:
        cmd, env = self.command(p)
        out = self.output(p)
        child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT if out is not None else None, preexec_fn=_die_with_parent)
        self.children[p.name] = child
        p.pid = child.pid
        log.info("started %s (pid %d) on port %d", p.name, child.pid, p.port)

    def output(self, p: Proc) -> Any:
        """Where a child's stdout and stderr go (its log file in the run directory); None: this process's own."""
        return open(self.run.log(p.name), "ab")

    def save(self) -> None:
        self.run.write(self.cluster)

    # ------------------------------------------------------------------ life

    def boot(self) -> None:
        infra = [p for p in self.cluster.procs if p.kind in ("nats", "redis")]
        for p in infra:
            self.start(p)
        for p in infra:
            procs.wait_port("127.0.0.1", p.port, timeout=30, proc=self.children[p.name])
        services = [p for p in self.cluster.procs if p.kind == "service"]
        for p in services:  # the control store first: the others register with it
            self.start(p)
        self.save()

    def rotate_logs(self) -> None:
        """Rotate the logs of the processes it runs (and its own) past their size, as the settings say."""
        max_bytes = _env_int("TESSERA_LOG_MAX_BYTES", 64 * 2**20)
        backups = _env_int("TESSERA_LOG_BACKUPS", 5)
        for name in [*(p.name for p in self.cluster.procs), "supervisor"]:
            try:
                logfiles.rotate(self.run.log(name), max_bytes=max_bytes, backups=backups)
            except OSError as e:
                log.warning("could not rotate the log of %s: %s", name, e)

    def watch(self) -> None:
        rotated = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if now - rotated >= ROTATE_S:
                rotated = now
                self.rotate_logs()
            changed = False
            for p in self.cluster.procs:
                child = self.children.get(p.name)
                if child is not None and child.poll() is not None:
                    p.last_exit = _describe(child.returncode)
                    delay = min(0.5 * 2 ** min(p.restarts, 5), 10.0)
                    log.warning("%s (pid %d) %s; restarting in %.1fs (restart #%d)", p.name, child.pid, p.last_exit,
                                delay, p.restarts + 1)
                    del self.children[p.name]
                    self.next_start[p.name] = now + delay
                    p.pid = 0
                    changed = True
                elif child is None and now >= self.next_start.get(p.name, 0):
                    p.restarts += 1
                    self.start(p)
                    changed = True
            if changed:
                self.save()
            time.sleep(POLL_S)

    def shutdown(self) -> None:
        """Services first (SIGTERM, then SIGKILL after the grace), then Redis, then NATS."""
        order = [[p for p in self.cluster.procs if p.kind == k] for k in ("service", "redis", "nats")]
        for group in order:
            live = [(p, self.children.pop(p.name)) for p in group if p.name in self.children]
            for _p, c in live:
                if c.poll() is None:
                    c.terminate()
            deadline = time.monotonic() + GRACE_S
            for p, c in live:
                try:
                    c.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0fs: killing it", p.name, GRACE_S)
                    c.kill()
                    c.wait(5)
                p.pid = 0
                log.info("stopped %s (%s)", p.name, _describe(c.returncode))
        self.save()

    def request_stop(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping the cluster", signal.Signals(signum).name)
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s", stream=sys.stderr)
    run = RunDir(Path(args[0]))
    sup = Supervisor(run)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    run.pid_file.write_text(str(os.getpid()))
    sup.cluster.supervisor_pid = os.getpid()
    try:
        sup.boot()
        sup.watch()
    except Exception:
        log.exception("supervisor failed")
        return 1
    finally:
        sup.shutdown()
        run.pid_file.unlink(missing_ok=True)
        log.info("cluster stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
