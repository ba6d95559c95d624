"""Actors restart on another node when their node dies, up to max_restarts (Ray's semantics).

A one-node cluster (`tessera up`) is joined by two nodes started here with `tessera node` (so that they
can be killed for good: nothing restarts them). Both offer a custom resource the head node lacks, so an
actor that needs it can only restart on the other one. The control store marks a silent node DEAD after
TESSERA_NODE_TIMEOUT_S (short here); the global scheduler then restarts its actors.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stacks

import tessera
from tessera.exceptions import ActorDiedError
from tessera.util.scheduling_strategies import NodeAffinitySchedulingStrategy

#: Seconds of silence after which the control store marks a node DEAD.
NODE_TIMEOUT_S = "2"


@tessera.remote
class Counter:
    def __init__(self, start: Any = None) -> None:
        self.n = 0 if start is None else int(start[0])  # (an array: a ref to it is resolved before this runs)

    def incr(self) -> tuple[str, int]:
        self.n += 1
        return os.environ["TESSERA_NODE_ID"], self.n

    def slow(self, s: float) -> str:
        time.sleep(s)
        return "finished"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nodes:
    """Nodes started here with `tessera node`, each in its own process group (killed for good with it)."""

    def __init__(self, cluster: stacks.Cluster, tmp: Path) -> None:
        self.cluster, self.tmp = cluster, tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str) -> None:
        info = self.cluster.info()
        run_dir = self.tmp / node_id[:8]
        run_dir.mkdir()
        env = {**self.cluster.env, "TESSERA_RUN_DIR": str(run_dir), "TESSERA_NATS_URL": info["nats_url"],
               "TESSERA_CONTROL_STORE_ADDRESS": info["control_store_address"],
               "TESSERA_NODE_RESOURCES": '{"spare": 2}'}
        log = (run_dir / "node.log").open("wb")
        self.procs[node_id] = subprocess.Popen(
            [str(stacks.BIN / "tessera"), "node", "--node-id", node_id, "--no-gpu-agent",
             "--object-store-port", str(free_port()), "--agent-port", str(free_port())],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, node_id: str) -> None:
        """SIGKILL the node's every process (its supervisor, agent, object store and workers)."""
        p = self.procs.pop(node_id)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def close(self) -> None:
        for nid in list(self.procs):
            self.kill(nid)


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in tessera.nodes() if n["Alive"] and n["Resources"].get("spare")}


def test_an_actor_restarts_on_another_node_until_it_has_no_restarts_left(tmp_path_factory: pytest.TempPathFactory) \
        -> None:
    with stacks.running(tmp_path_factory, "restart", "--nodes", "1", TESSERA_NUM_CPUS="2",
                        TESSERA_NODE_TIMEOUT_S=NODE_TIMEOUT_S) as c:
        extra = Nodes(c, tmp_path_factory.mktemp("restart-nodes"))
        b, d = os.urandom(16).hex(), os.urandom(16).hex()
        try:
            extra.start(b)
            extra.start(d)
            with c.driving("e2e-actor-restart"):
                stacks.poll_until(lambda: alive_nodes() == {b, d}, timeout=60, what="the two extra nodes")
                _scenario(extra, b, d)
        finally:
            extra.close()


def _scenario(extra: Nodes, b: str, d: str) -> None:
    # its constructor takes a ref the driver drops at once: kept for the restart, which runs the constructor again
    keeper = Counter.options(resources={"spare": 1}, max_restarts=1, name="keeper", lifetime="detached",
                             scheduling_strategy=NodeAffinitySchedulingStrategy(b, soft=True)).remote(
        tessera.put(np.full(2**17, 10, dtype=np.int64)))
    assert tessera.get(keeper.incr.remote(), timeout=60) == (b, 11)
    assert tessera.get(keeper.incr.remote(), timeout=30) == (b, 12)
    once = Counter.options(resources={"spare": 1}, max_restarts=0,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(d, soft=True)).remote()
    assert tessera.get(once.incr.remote(), timeout=60) == (d, 1)

    # node B dies: the call in flight fails, and the next call reaches a new instance on node D
    inflight = keeper.slow.remote(60)
    time.sleep(1.0)  # it runs
    t_kill = time.monotonic()
    extra.kill(b)
    with pytest.raises(ActorDiedError, match=f"node {b}"):
        tessera.get(inflight, timeout=30)
    failed_s = time.monotonic() - t_kill
    assert tessera.get(keeper.incr.remote(), timeout=45) == (d, 11)  # fresh state: the constructor ran again
    restarted_s = time.monotonic() - t_kill
    rec = tessera.get(tessera.get_actor("keeper").incr.remote(), timeout=30)  # it kept its name
    assert rec == (d, 12)
    print(f"\nnode killed -> call in flight failed: {failed_s:.1f}s; -> first call on the restarted actor: "
          f"{restarted_s:.1f}s (node timeout {NODE_TIMEOUT_S}s)")

    # node D dies: neither actor has a restart left
    inflight = keeper.slow.remote(60)
    time.sleep(1.0)
    extra.kill(d)
    with pytest.raises(ActorDiedError):
        tessera.get(inflight, timeout=30)
    for handle in (keeper, once):
        with pytest.raises(ActorDiedError, match=f"its node {d} died, and it has no restarts left"):
            tessera.get(handle.incr.remote(), timeout=45)
    with pytest.raises(ValueError):
        tessera.get_actor("keeper")  # a dead actor's name is free again
