from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tessera.common import rpc
from tessera.common.config import current_settings
from tessera.common.names import CLUSTER_FILE as CLUSTER_FILE


class ClusterNotFoundError(ConnectionError):
    """No address was given and no running cluster was found."""


@dataclass
class ClusterInfo:
    """Where the pieces of a cluster are; written by ``tessera up`` to ``<run_dir>/cluster.json``."""

    control_store_address: str
    nats_url: str = ""
    redis_urls: list[str] = field(default_factory=list)
    services: dict[str, dict[str, object]] = field(default_factory=dict)
    run_dir: str = ""

    @classmethod
    def load(cls, path: Path) -> ClusterInfo:
        d = json.loads(path.read_text())
        return cls(
            control_store_address=d["control_store_address"],
            nats_url=d.get("nats_url", ""),
            redis_urls=list(d.get("redis_urls", [])),
            services=dict(d.get("services", {})),
            run_dir=str(path.parent),
        )


_connected: str | None = None


def connected_to(address: str | None) -> None:
    """The address ``tessera.init`` connected this process to (None: it disconnected): clients made without
    an address then use it, as they do in Ray after ``ray.init(address=...)``."""
    global _connected
    _connected = address


def find_cluster(address: str | None = None) -> ClusterInfo:
    """Resolve the control store's address: ``address``, else ``TESSERA_ADDRESS``, else the address
    ``tessera.init`` was given, else the run directory."""
    address = address or os.environ.get("TESSERA_ADDRESS") or _connected
    if address:
        _check_gateway(address)
        return ClusterInfo(control_store_address=address)
    path = current_settings().run_dir / CLUSTER_FILE
    if not path.exists():
        raise ClusterNotFoundError(
            f"no Tessera cluster found: start one with `tessera up`, or set TESSERA_ADDRESS (looked in {path})")
    return ClusterInfo.load(path)


_probed: dict[str, bool] = {}


def _check_gateway(address: str) -> None:
    """When ``address`` is a gateway (a driver outside the cluster's network, e.g. on the host of a compose
    stack), route this process's calls through it: the replicas' own addresses are not reachable from here."""
    if current_settings().gateway:  # configured explicitly (TESSERA_GATEWAY)
        return
    found = _probed.get(address)
    if found is None:
        found = _probed[address] = rpc.is_gateway(address)
    if found:
        rpc.use_gateway(address)
