"""`tessera node` and `tessera status --address` refuse bad input with one line that says what to fix,
start nothing and never hang."""

from __future__ import annotations

import os
import subprocess
import sys

from tessera.common import procs

TESSERA = [sys.executable, "-m", "tessera._launcher.cli"]


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    return subprocess.run([*TESSERA, *args], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_node_needs_the_cluster_it_joins() -> None:
    r = run("node")
    assert r.returncode == 2
    assert "set TESSERA_CONTROL_STORE_ADDRESS and TESSERA_NATS_URL" in r.stderr


def test_node_refuses_a_bad_node_id_and_clashing_ports() -> None:
    cluster = {"TESSERA_CONTROL_STORE_ADDRESS": "127.0.0.1:1", "TESSERA_NATS_URL": "nats://127.0.0.1:1"}
    r = run("node", "--node-id", "zz", **cluster)
    assert r.returncode == 2 and "--node-id must be hex, got 'zz'" in r.stderr
    r = run("node", "--node-id", "abcd", **cluster)
    assert r.returncode == 2 and "--node-id must be 16 bytes" in r.stderr
    r = run("node", "--agent-port", "50052", **cluster)
    assert r.returncode == 2 and "the ports must be distinct" in r.stderr


def test_status_of_an_address_nobody_answers_is_one_line() -> None:
    address = f"127.0.0.1:{procs.free_port()}"
    r = run("status", "--address", address)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert f"no Tessera cluster answered at {address}" in r.stderr
