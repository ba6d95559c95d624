"""The control store runs as exactly one replica: a second one over the same Redis shards refuses to start
while the first answers, with a message that says why (what `--scale control-store=2` would do). One that
died is not in the way (services/control-store/tests/test_process.py replaces a killed one at once)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from stacks import Cluster, running

from tessera.common import procs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory, "cs1", "--services", "control-store") as c:
        yield c


def test_a_second_control_store_refuses_to_start(cluster: Cluster) -> None:
    info = cluster.info()
    port = procs.free_port()
    env = {**cluster.env, "TESSERA_REDIS_URLS": ",".join(info["redis_urls"]), "TESSERA_NATS_URL": info["nats_url"],
           "TESSERA_GRPC_HOST": "127.0.0.1", "TESSERA_GRPC_PORT": str(port),
           "TESSERA_CONTROL_STORE_ADDRESS": f"127.0.0.1:{port}"}
    r = subprocess.run([sys.executable, "-m", "tessera.control_store"], env=env, capture_output=True, text=True,
                       timeout=90)
    assert r.returncode != 0
    assert f"at {info['control_store_address']}) serves these Redis shards" in r.stderr, r.stderr[-2000:]
    assert cluster.cli("status").returncode == 0  # the first one is untouched

