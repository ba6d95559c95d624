"""Names shared by the launcher, the services and the clients, in a module that imports nothing.

The supervisor that ``tessera up`` leaves running needs only these and
:mod:`tessera.common.procs`, so it stays a small process.
"""

from __future__ import annotations

#: The services, by their canonical (dashed) names: the six of the platform, then the dashboard (optional).
SERVICES: tuple[str, ...] = (
    "control-store",
    "object-store",
    "task-scheduler",
    "compiler",
    "gpu-scheduler",
    "serving",
    "dashboard",
)

#: The file in the run directory where ``tessera up`` writes what it started and where.
CLUSTER_FILE = "cluster.json"

#: Where ``tessera up --auth`` keeps its secrets, inside the run directory (mode 0700, files 0600).
SECRETS_DIR = "secrets"
TOKEN_FILE = "auth_token"
NATS_PASSWORD_FILE = "nats_password"
REDIS_PASSWORD_FILE = "redis_password"
#: The NATS user ``tessera up --auth`` creates.
NATS_USER = "tessera"

#: The control store's key-value namespace where every driver and worker publishes its reference table
#: (JSON: process, job_id, worker, time, rows of object_id/owned/refs/reference/stored, more), one key per
#: process ("<hostname>:<pid>"), refreshed when it changes and at least every REFS_HEARTBEAT_S.
REFS_NAMESPACE = "refs"
REFS_HEARTBEAT_S = 10.0
#: A table older than this belongs to a process that is gone (the default of ``TESSERA_REFS_STALE_S``; a table
#: says its own, as "stale_s").
REFS_STALE_S = 35.0

#: The control store's key-value namespace where each node agent keeps what its node offers to tasks (JSON:
#: node_id, address, hostname, total, available, time, stale_s), one key per node (its id in hex), rewritten
#: when it changes (at most twice a second) and at least every NODES_HEARTBEAT_S; removed when the agent
#: stops. ``tessera.nodes()``, ``cluster_resources()`` and ``available_resources()`` read it.
NODES_NAMESPACE = "nodes"
NODES_HEARTBEAT_S = 2.0

#: A task worker's environment variable holding its runtime_env (JSON; the SDK's get_runtime_context reads it).
RUNTIME_ENV_VAR = "TESSERA_RUNTIME_ENV"
#: Under the run directory: each node's unpacked runtime_env packages (a folder per node, then per package).
RUNTIME_RESOURCES_DIR = "runtime_resources"
