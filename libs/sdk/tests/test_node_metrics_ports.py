"""`tessera node` runs three processes in one container on one configured metrics port: each gets its own."""

from __future__ import annotations

from pathlib import Path

from tessera._launcher.node import NodeSupervisor, plan


def _ports(tmp_path: Path, value: str | None) -> list[str | None]:
    env = {"TESSERA_RUN_DIR": str(tmp_path), "TESSERA_NATS_URL": "nats://127.0.0.1:1",
           "TESSERA_CONTROL_STORE_ADDRESS": "127.0.0.1:1"}
    if value is not None:
        env["TESSERA_METRICS_PORT"] = value
    procs = plan(node_id="ab" * 16)
    sup = NodeSupervisor(procs, env=env)
    return [sup.command(p)[1].get("TESSERA_METRICS_PORT") for p in procs]  # type: ignore[union-attr]


def test_each_process_of_a_node_takes_the_next_port(tmp_path: Path) -> None:
    assert _ports(tmp_path, "9464") == ["9464", "9465", "9466"]  # object store, node agent, GPU agent


def test_free_ports_and_no_endpoint_pass_through(tmp_path: Path) -> None:
    assert _ports(tmp_path, "0") == ["0", "0", "0"]
    assert _ports(tmp_path, None) == [None, None, None]
