"""The run directory: what ``tessera up`` started, where, and its logs and data.

``cluster.json`` holds the plan (addresses and ports, chosen by ``up``) and the
live state kept by the supervisor (pids, restarts, last exit). It is written
atomically; the SDK reads ``control_store_address`` from it.

With ``tessera up --auth``, ``secrets/`` (mode 0700) holds the gRPC token and the
NATS and Redis passwords, one per file (mode 0600), and the generated NATS and
Redis configuration files that carry the passwords. Services get the files' paths
(``TESSERA_*_FILE``), never the secrets themselves; clients on this machine read
the token from there (:func:`tessera.common.auth.client_token`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tessera.common import names  # not auth.py: the supervisor imports neither gRPC nor pydantic
from tessera.common.names import CLUSTER_FILE, SERVICES
from tessera.common.procs import alive


def module_of(service: str) -> str:
    return "tessera." + service.replace("-", "_")


@dataclass
class Proc:
    """One process the supervisor runs."""

    name: str
    kind: str  # "nats" | "redis" | "service"
    port: int
    service: str = ""  # the service it runs (kind "service"); several per-node copies share one
    node_id: str = ""  # hex, for per-node processes (object-store)
    pid: int = 0
    restarts: int = 0
    last_exit: str = ""
    address: str = ""
    object_store_memory: int = 0  # bytes of the arena tessera up chose (object-store); 0: the store's default
    metrics_port: int = 0  # port of its Prometheus /metrics endpoint (services); 0: none
    http_port: int = 0  # port of its HTTP server (the dashboard, serving); 0: none


@dataclass
class Cluster:
    run_dir: str
    nats_url: str
    redis_urls: list[str]
    control_store_address: str
    procs: list[Proc] = field(default_factory=list)
    supervisor_pid: int = 0
    started: float = 0.0
    auth: bool = False  # started with --auth: credentials in <run_dir>/secrets

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return {p.name: asdict(p) for p in self.procs if p.kind == "service"}

    @property
    def nodes(self) -> list[str]:
        """Node ids (hex) in start order; node 0 is the head node."""
        return list(dict.fromkeys(p.node_id for p in self.procs if p.node_id))

    def proc(self, name: str) -> Proc:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_json(self) -> str:
        d = asdict(self)
        d["services"] = self.services
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        d = json.loads(text)
        d.pop("services", None)
        d["procs"] = [Proc(**p) for p in d.get("procs", [])]
        return cls(**d)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.cluster_file = path / CLUSTER_FILE
        self.pid_file = path / "supervisor.pid"
        self.logs = path / "logs"
        self.data = path / "data"
        self.secrets = path / names.SECRETS_DIR

    def prepare(self) -> None:
        for d in (self.path, self.logs, self.data):
            d.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def read(self) -> Cluster | None:
        try:
            return Cluster.from_json(self.cluster_file.read_text())
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def write(self, cluster: Cluster) -> None:
        tmp = self.cluster_file.with_suffix(".tmp")
        tmp.write_text(cluster.to_json())
        os.replace(tmp, self.cluster_file)

    def supervisor_pid(self) -> int:
        """The live supervisor's pid, or 0."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0
        return pid if alive(pid) else 0

    def clear(self) -> None:
        for f in (self.cluster_file, self.pid_file):
            f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ secrets (tessera up --auth)

    def write_secret(self, name: str, text: str) -> Path:
        """Write ``text`` to ``secrets/name``, readable by this user only (created 0600, never wider).

        A file that already holds ``text`` is left as it is (a process may be reading it).
        """
        self.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        path = self.secrets / name
        try:
            if path.read_text() == text:
                return path
        except OSError:
            pass
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def generate_secrets(self) -> None:
        """A fresh random token and NATS and Redis passwords."""
        for name in (names.TOKEN_FILE, names.NATS_PASSWORD_FILE, names.REDIS_PASSWORD_FILE):
            self.write_secret(name, secrets.token_urlsafe(32) + "\n")

    def secret_file(self, name: str) -> Path:
        return self.secrets / name

    def read_secret(self, name: str) -> str:
        return (self.secrets / name).read_text().strip()

    def remove_secrets(self) -> None:
        shutil.rmtree(self.secrets, ignore_errors=True)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


__all__ = ["SERVICES", "Cluster", "Proc", "RunDir", "alive", "kill", "module_of"]
