"""``tessera node``: one node of a cluster, as a unit: its object store, its task-scheduler node agent and
its GPU node agent, under one node id, sharing this host's (or container's) /dev/shm.

The head services (control store, global scheduler, compiler, gpu-scheduler, serving) run elsewhere; the
node reaches them through the usual settings (TESSERA_CONTROL_STORE_ADDRESS, TESSERA_NATS_URL, the
credential files). It runs in the foreground and logs to its own stdout (a container's log), restarts a
process that dies, with backoff, and on SIGTERM stops all three. Compose runs one per `node` replica
(``--scale node=N``); Kubernetes one per machine (a DaemonSet).

The processes are the same programs ``tessera up`` starts per node, with the same restart policy
(supervisor.py): a node under compose is the node of ``tessera up``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from tessera._launcher.rundir import Cluster, Proc, RunDir, module_of
from tessera._launcher.supervisor import Supervisor, otel_name
from tessera.common import ids
from tessera.common.errors import TesseraError

log = logging.getLogger("tessera.node")

#: The ports a node's processes listen on by default (one node per host or container).
OBJECT_STORE_PORT = 50052
AGENT_PORT = 50053
GPU_AGENT_PORT = 50057


def plan(*, node_id: str, object_store_port: int = OBJECT_STORE_PORT, agent_port: int = AGENT_PORT,
         gpu_agent_port: int = GPU_AGENT_PORT, gpu_agent: bool = True) -> list[Proc]:
    """The processes of one node."""
    ps = [Proc("object-store", "service", object_store_port, service="object-store", node_id=node_id),
          Proc("task-scheduler", "service", agent_port, service="task-scheduler", node_id=node_id)]
    if gpu_agent:
        ps.append(Proc("gpu-agent", "service", gpu_agent_port, service="gpu-scheduler", node_id=node_id))
    return ps


class NodeSupervisor(Supervisor):
    """The supervisor of ``tessera up``, for the processes of one node whose cluster runs elsewhere."""

    def __init__(self, procs: list[Proc], *, env: dict[str, str]) -> None:
        super().__init__(RunDir(Path(env.get("TESSERA_RUN_DIR", "/tmp/tessera-node"))), Cluster(
            run_dir="", nats_url=env.get("TESSERA_NATS_URL", ""), redis_urls=[],
            control_store_address=env.get("TESSERA_CONTROL_STORE_ADDRESS", ""), procs=procs))
        self.env = env

    def command(self, p: Proc) -> tuple[list[str], dict[str, str] | None]:
        env = dict(self.env)
        base = self.env.get("TESSERA_METRICS_PORT", "").strip()
        if base.isdigit() and int(base) > 0:  # one port for the node: its processes take it, +1, +2 (0: free ones)
            env["TESSERA_METRICS_PORT"] = str(int(base) + self.cluster.procs.index(p))
        env.update(TESSERA_NODE_ID=p.node_id, TESSERA_GRPC_PORT=str(p.port),
                   TESSERA_INSTANCE_ID=f"{socket.gethostname()}-{p.name}", OTEL_SERVICE_NAME=otel_name(p))
        if p.service == "task-scheduler":
            env["TESSERA_TASK_SCHEDULER_ROLE"] = "agent"  # the global scheduler is a head service
        return [sys.executable, "-m", module_of(p.service)], env

    def output(self, p: Proc) -> Any:
        return None  # the node's own stdout: the container's log

    def save(self) -> None:
        pass  # nothing to record: the control store knows the node


def register(sub: Any) -> None:
    nd = sub.add_parser("node", help="run one node (object store, node agent, GPU node agent) of a cluster that runs "
                                     "elsewhere, in the foreground (what a compose `node` or a Kubernetes DaemonSet runs)")
    nd.add_argument("--node-id", default="", help="hex node id (default TESSERA_NODE_ID, else a new one)")
    nd.add_argument("--object-store-port", type=int, default=OBJECT_STORE_PORT)
    nd.add_argument("--agent-port", type=int, default=AGENT_PORT)
    nd.add_argument("--gpu-agent-port", type=int, default=GPU_AGENT_PORT)
    nd.add_argument("--no-gpu-agent", action="store_true", help="run no GPU node agent on this node")


def cmd_node(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s node: %(message)s", stream=sys.stderr)
    env = dict(os.environ)
    missing = [k for k in ("TESSERA_CONTROL_STORE_ADDRESS", "TESSERA_NATS_URL") if not env.get(k)]
    if missing:
        print(f"tessera node: set {' and '.join(missing)} (the cluster this node joins)", file=sys.stderr)
        return 2
    node_id = args.node_id or env.get("TESSERA_NODE_ID", "")
    if node_id:
        try:
            raw = bytes.fromhex(node_id)
        except ValueError:
            print(f"tessera node: --node-id must be hex, got {node_id!r}", file=sys.stderr)
            return 2
        try:
            node_id = ids.check_id("node_id", raw, field="--node-id").hex()
        except TesseraError as e:
            print(f"tessera node: {e}", file=sys.stderr)
            return 2
    else:
        node_id = ids.new_id("node_id").hex()
    ports = [args.object_store_port, args.agent_port] + ([] if args.no_gpu_agent else [args.gpu_agent_port])
    if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
        print(f"tessera node: the ports must be distinct and in 1-65535, got {ports}", file=sys.stderr)
        return 2
    sup = NodeSupervisor(plan(node_id=node_id, object_store_port=args.object_store_port, agent_port=args.agent_port,
                              gpu_agent_port=args.gpu_agent_port, gpu_agent=not args.no_gpu_agent), env=env)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    log.info("node %s joining the cluster of %s", node_id[:8], env["TESSERA_CONTROL_STORE_ADDRESS"])
    try:
        sup.boot()
        sup.watch()
    except Exception:
        log.exception("node supervisor failed")
        return 1
    finally:
        sup.shutdown()
        log.info("node %s stopped", node_id[:8])
    return 0
