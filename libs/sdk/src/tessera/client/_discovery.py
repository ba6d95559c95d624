from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

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


def find_cluster(address: str | None = None) -> ClusterInfo:
    """Resolve the control store's address: ``address``, else ``TESSERA_ADDRESS``, else the run directory."""
    address = address or os.environ.get("TESSERA_ADDRESS")
    if address:
        return ClusterInfo(control_store_address=address)
    path = current_settings().run_dir / CLUSTER_FILE
    if not path.exists():
        raise ClusterNotFoundError(
            f"no Tessera cluster found: start one with `tessera up`, or set TESSERA_ADDRESS (looked in {path})")
    return ClusterInfo.load(path)
