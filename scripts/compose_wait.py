"""Wait until the compose stack's containers are ready, by asking each the way its healthcheck would.

podman does not run compose healthchecks by itself and podman-compose ignores
``condition: service_healthy``, so scripts/compose_up.sh starts the services in
dependency order and calls this between the steps:

    python scripts/compose_wait.py nats redis               # NATS /healthz, Redis PING
    python scripts/compose_wait.py control-store            # grpc.health.v1 Check == SERVING
    python scripts/compose_wait.py serving=2 object-store   # at least 2 serving replicas SERVING

Every container of a named service must be ready (and at least N of them when given as
SERVICE=N). A container that exits, or a timeout, fails with the container's last log lines.
Each container is reached at its address on the compose network (root podman: the host
routes to it); Tessera services on their TESSERA_GRPC_PORT. Under podman, a ready container
then runs its own compose healthcheck once (`podman healthcheck run`: `tessera-healthcheck`
inside the image), which must pass too and marks it healthy in `podman ps`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from tessera.common.rpc import health_status

ENGINE = os.environ.get("ENGINE", "podman")
PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "tessera")


@dataclass
class Container:
    name: str
    service: str
    state: str
    ip: str
    env: dict[str, str]


def containers(project: str = PROJECT) -> list[Container]:
    """The project's containers (running or not), from the engine."""
    ids = subprocess.run([ENGINE, "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.split()
    if not ids:
        return []
    found = json.loads(subprocess.run([ENGINE, "inspect", *ids], check=True, capture_output=True, text=True,
                                      timeout=60).stdout)
    out = []
    for c in found:
        nets = (c.get("NetworkSettings") or {}).get("Networks") or {}
        ip = next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), "")
        env = dict(e.split("=", 1) for e in (c["Config"].get("Env") or []) if "=" in e)
        out.append(Container(name=c["Name"].lstrip("/"), service=c["Config"]["Labels"].get("com.docker.compose.service", ""),
                             state=c["State"]["Status"], ip=ip, env=env))
    return out


def redis_password() -> str:
    """The stack's Redis password (scripts/compose_secrets.sh), or '' when there is none."""
    path = os.path.join(os.environ.get("TESSERA_SECRETS_DIR", "./deploy/secrets"), "redis_password")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def ready(c: Container) -> bool:
    if c.state != "running" or not c.ip:
        return False
    try:
        if c.service == "nats":
            url = f"http://{c.ip}:{os.environ.get('NATS_MONITOR_PORT', '8222')}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        if c.service == "redis":
            with socket.create_connection((c.ip, int(os.environ.get("REDIS_PORT", "6379"))), timeout=2) as s:
                f = s.makefile("rb")
                password = redis_password()
                if password:  # requirepass (scripts/compose_secrets.sh): AUTH first
                    s.sendall(b"AUTH " + password.encode() + b"\r\n")
                    if not f.readline().startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return f.readline().startswith(b"+PONG")
        if c.service == "jaeger":
            url = f"http://{c.ip}:{os.environ.get('JAEGER_HEALTH_PORT', '13133')}/status"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
    except OSError:
        return False
    port = c.env.get("TESSERA_GRPC_PORT")
    return bool(port) and health_status(f"{c.ip}:{port}", timeout=2.0) == "SERVING"


_checked: set[str] = set()


def healthcheck_passes(c: Container) -> bool:
    """The container's own healthcheck (podman only; run once per container)."""
    if ENGINE != "podman" or c.name in _checked:
        return True
    r = subprocess.run([ENGINE, "healthcheck", "run", c.name], capture_output=True, text=True, timeout=60)
    if r.returncode == 0 or "no healthcheck" in (r.stdout + r.stderr).lower():
        _checked.add(c.name)
        return True
    return False


def logs(name: str, lines: int = 40) -> str:
    r = subprocess.run([ENGINE, "logs", "--tail", str(lines), name], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def wait(wanted: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending: list[str] = []
    while True:
        cs = containers()
        pending = []
        for service, at_least in wanted.items():
            mine = [c for c in cs if c.service == service]
            for c in mine:
                if c.state in ("exited", "dead", "stopped"):
                    raise SystemExit(f"compose_wait: {c.name} ({service}) is {c.state}:\n{logs(c.name)}")
            up = [c for c in mine if ready(c) and healthcheck_passes(c)]
            if len(up) < max(at_least, len(mine), 1):
                pending.append(f"{service} ({len(up)}/{max(at_least, len(mine), 1)} ready)")
        if not pending:
            return
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {c.name}\n{logs(c.name)}" for c in cs
                               if any(p.startswith(c.service + " ") for p in pending))
            raise SystemExit(f"compose_wait: not ready after {timeout:g}s: {', '.join(pending)}\n{detail}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("services", nargs="+", metavar="SERVICE[=N]")
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args(argv)
    wanted = {s.split("=")[0]: int(s.split("=")[1]) if "=" in s else 1 for s in args.services}
    t0 = time.monotonic()
    wait(wanted, args.timeout)
    print(f"compose_wait: ready in {time.monotonic() - t0:.1f}s: {' '.join(args.services)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
