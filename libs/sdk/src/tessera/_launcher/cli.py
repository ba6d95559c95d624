"""``tessera`` — bring a cluster up and look after it.

    tessera up [--redis-shards N] [--timeout S] [--auth]   start everything; return once all six services are SERVING
    tessera up --services control-store,object-store,task-scheduler   only these services (tasks and actors)
    tessera status [--json]                       what runs where, and its health
    tessera logs SERVICE [-n N] [-f]              a process's log (a service, nats, redis-0, supervisor)
    tessera logs --task ID | --actor ID [--err]   a task's or an actor's output (stdout, or stderr)
    tessera down [--timeout S]                    stop everything gracefully; leave no process behind
    tessera list RESOURCE [--filter K=V] [--json] a running cluster's nodes, tasks, actors, objects, jobs, pipelines
    tessera summary tasks|actors|objects          tasks per function, actors per class, objects per reference type
    tessera timeline [-o FILE] [--job HEX]        the recorded tasks as a Chrome trace
    tessera --version                             the installed version
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tessera._launcher.rundir import SERVICES, Cluster, Proc, RunDir, alive, kill
from tessera.common import ids, procs
from tessera.common.config import Settings
from tessera.common.errors import InvalidArgumentError
from tessera.common.progress import Progress
from tessera.common.rpc import health_status, stream_channel
from tessera.common.sizing import StoreSize, human, object_store_size

EXIT_OK, EXIT_FAIL, EXIT_NOT_RUNNING, EXIT_UNHEALTHY = 0, 1, 2, 3


def tessera_version() -> str:
    """The installed version of the ``tessera`` package (the SDK and this command)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tessera")
    except PackageNotFoundError:  # pragma: no cover - only run from a source tree without metadata
        return "unknown"


#: Services that run once per node; the others run once per cluster.
PER_NODE = ("object-store", "task-scheduler")
#: What ``tessera up --services`` must include, whatever else it names: the others register with it.
REQUIRED = ("control-store",)


def parse_services(text: str) -> tuple[str, ...]:
    """``--services``: comma-separated names of SERVICES, in SERVICES' order; ValueError on an unknown or missing one."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(SERVICES))
    if unknown:
        raise ValueError(f"unknown service {', '.join(map(repr, unknown))}; known: {', '.join(SERVICES)}")
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise ValueError(f"the services must include {', '.join(missing)}")
    return tuple(n for n in SERVICES if n in names)


def store_size(settings: Settings, nodes: int) -> StoreSize:
    """The arena capacity of each of ``nodes`` object stores on this machine: TESSERA_OBJECT_STORE_MEMORY,
    else Ray's default split between them (they share one machine's memory and /dev/shm).

    Raises InvalidArgumentError (the message says why) when the requested size cannot fit.
    """
    return object_store_size(settings.object_store_memory, settings.object_store_arena_dir, share=nodes)


def _plan(run: RunDir, settings: Settings, redis_shards: int, nodes: int = 1, gpus_per_node: int = 0,
          services: Sequence[str] = SERVICES, object_store_memory: int = 0) -> Cluster:
    env = os.environ
    ps: list[Proc] = []
    if env.get("TESSERA_NATS_URL"):
        nats_url = settings.nats_url
    else:
        port = procs.free_port()
        ps.append(Proc("nats", "nats", port, address=f"127.0.0.1:{port}"))
        nats_url = f"nats://127.0.0.1:{port}"
    if env.get("TESSERA_REDIS_URLS"):
        redis_urls = list(settings.redis_urls)
    else:
        redis_urls = []
        for i in range(redis_shards):
            port = procs.free_port()
            ps.append(Proc(f"redis-{i}", "redis", port, address=f"127.0.0.1:{port}"))
            redis_urls.append(f"redis://127.0.0.1:{port}/0")
    node_ids = [ids.new_id("node_id").hex() for _ in range(nodes)]
    for name in services:
        if name in PER_NODE:
            for i, node in enumerate(node_ids):
                port = procs.free_port()
                ps.append(Proc(name if i == 0 else f"{name}-{i}", "service", port, service=name, node_id=node,
                               address=f"127.0.0.1:{port}", metrics_port=procs.free_port(),
                               object_store_memory=object_store_memory if name == "object-store" else 0))
        else:
            port = procs.free_port()
            ps.append(Proc(name, "service", port, service=name, address=f"127.0.0.1:{port}",
                           metrics_port=procs.free_port(),
                           http_port=http_port(name, settings)))
    if gpus_per_node and "gpu-scheduler" in services:  # a node agent per node (the gpu-scheduler with the node's id)
        for i, node in enumerate(node_ids):
            port = procs.free_port()
            ps.append(Proc(f"gpu-agent-{i}", "service", port, service="gpu-scheduler", node_id=node,
                           address=f"127.0.0.1:{port}", metrics_port=procs.free_port()))
    cs = next(p for p in ps if p.name == "control-store")
    return Cluster(run_dir=str(run.path), nats_url=nats_url, redis_urls=redis_urls,
                   control_store_address=cs.address, procs=ps, started=time.time())


def http_port(service: str, settings: Settings) -> int:
    """The port of ``service``'s HTTP server (0: it has none): the dashboard's, or serving's front end, whose
    fixed default (TESSERA_SERVING_HTTP_PORT, 8000 in every container) is kept only when set explicitly here,
    so that two clusters on one machine do not both ask for it."""
    if service == "dashboard":
        return dashboard_port(settings)
    if service == "serving":
        return settings.serving_http_port if os.environ.get("TESSERA_SERVING_HTTP_PORT") else procs.free_port()
    return 0


def dashboard_port(settings: Settings) -> int:
    """The dashboard's port: TESSERA_DASHBOARD_PORT (8265, as Ray's) when it is free here, else a free one (another
    cluster on this machine has it)."""
    port = settings.dashboard_port
    if port and not procs.port_open("127.0.0.1", port):
        return port
    return procs.free_port()


def dashboard_url(cluster: Cluster) -> str:
    """Where the dashboard ``tessera up`` started serves, or "" when it started none."""
    p = next((p for p in cluster.procs if p.service == "dashboard" and p.http_port), None)
    return f"http://{p.address.rsplit(':', 1)[0]}:{p.http_port}" if p else ""


def _health(p: Proc) -> str:
    if p.kind == "service":
        return health_status(p.address, timeout=1.0)
    host, port = p.address.rsplit(":", 1)
    return "UP" if procs.port_open(host, int(port)) else "DOWN"


def _mib(n: int) -> str:
    return human(n)


def _agent_detail(p: Proc) -> dict[str, object]:
    """A node agent's figures: resources in use, queued and running tasks, workers, actors."""
    import grpc

    from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as tpb
    from tessera.api.task_scheduler.v1 import task_scheduler_pb2_grpc as tpb_grpc

    try:
        with stream_channel(p.address) as ch:
            s = tpb_grpc.TaskSchedulerServiceStub(ch).GetStatus(tpb.GetStatusRequest(), timeout=2.0)
    except grpc.RpcError:
        return {}
    cpus = s.resources_total.get("CPU", 0.0)
    free = s.resources_available.get("CPU", 0.0)
    gpus = f", GPU {s.resources_total['GPU'] - s.resources_available.get('GPU', 0):g}/{s.resources_total['GPU']:g}" \
        if "GPU" in s.resources_total else ""
    return {"node": p.node_id[:8], "queued": s.queued, "running": s.running, "workers": s.workers,
            "detail": f"node {p.node_id[:8]} CPU {cpus - free:g}/{cpus:g}{gpus}, {s.running} running, "
                      f"{s.queued + s.waiting} queued, {s.workers} workers, {s.actors} actors, {s.tasks_finished} done"}


def _detail(p: Proc, health: str) -> dict[str, object]:
    """Per-node figures: the object store's used / capacity, spilled, object count; the node agent's load."""
    if p.service == "task-scheduler" and health == "SERVING":
        return _agent_detail(p)
    if p.service != "object-store" or health != "SERVING":
        return {}
    import grpc

    from tessera.api.object_store.v1 import object_store_pb2 as opb
    from tessera.api.object_store.v1 import object_store_pb2_grpc as opb_grpc

    try:
        with stream_channel(p.address) as ch:
            s = opb_grpc.ObjectStoreServiceStub(ch).GetStats(opb.GetStatsRequest(), timeout=2.0)
    except grpc.RpcError:
        return {}
    return {"node": p.node_id[:8], "used": s.used, "capacity": s.capacity, "spilled": s.spilled_bytes,
            "objects": s.objects,
            "detail": f"node {p.node_id[:8]} {_mib(s.used)}/{_mib(s.capacity)} used "
                      f"({100 * s.used / max(1, s.capacity):.0f}% of capacity), {_mib(s.spilled_bytes)} spilled, "
                      f"{s.objects} objects"}


def _row(p: Proc) -> dict[str, object]:
    health = _health(p)
    row: dict[str, object] = {"name": p.name, "kind": p.kind, "pid": p.pid, "address": p.address,
                              "metrics": metrics_url(p.address, p.metrics_port),
                              "health": health, "restarts": p.restarts, "last_exit": p.last_exit, "detail": ""}
    row.update(_detail(p, health))
    return row


def _rows(cluster: Cluster) -> list[dict[str, object]]:
    """A row per process, all asked at once."""
    with ThreadPoolExecutor(max_workers=max(1, len(cluster.procs)), thread_name_prefix="status") as pool:
        return list(pool.map(_row, cluster.procs))


def metrics_url(address: str, port: int | str) -> str:
    """The URL of a process's Prometheus endpoint: the host of its gRPC ``address`` and the metrics ``port``
    (or a whole host:port); '' when it serves none."""
    if not port:
        return ""
    if isinstance(port, str) and ":" in port:
        return f"http://{port}/metrics"
    return f"http://{address.rsplit(':', 1)[0]}:{port}/metrics"


def _table(rows: Sequence[dict[str, object]]) -> str:
    cols = ["name", "pid", "address", "metrics", "health", "restarts", "last_exit", "detail"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"(no log at {path})"


# ---------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    run = RunDir(settings.run_dir)
    if run.supervisor_pid():
        print(f"Tessera is already up (run directory {run.path}):")
        cluster = run.read()
        if cluster:
            print(_table(_rows(cluster)))
        return EXIT_OK
    size = None
    if "object-store" in args.services:
        try:
            size = store_size(settings, args.nodes)
        except InvalidArgumentError as e:  # refused before anything starts
            print(f"cannot start the object store: {e}", file=sys.stderr)
            return EXIT_FAIL
    run.prepare()
    run.clear()
    if args.gpus_per_node:
        os.environ["TESSERA_GPUS_PER_NODE"] = str(args.gpus_per_node)  # the supervisor and its children inherit it
    cluster = _plan(run, settings, args.redis_shards or settings.redis_shards, args.nodes,
                    args.gpus_per_node or settings.gpus_per_node, args.services,
                    object_store_memory=size.capacity if size else 0)
    run.remove_secrets()
    if args.auth:  # a fresh token and passwords; services get their files' paths (see the supervisor)
        run.generate_secrets()
        cluster.auth = True
    run.write(cluster)
    sup = subprocess.Popen([sys.executable, "-m", "tessera._launcher.supervisor", str(run.path)],
                           stdin=subprocess.DEVNULL, stdout=open(run.log("supervisor"), "ab"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    print(f"starting Tessera in {run.path} ...", flush=True)
    deadline = time.monotonic() + args.timeout
    services = [p for p in cluster.procs if p.kind == "service"]
    pending = {p.name for p in services}
    progress = Progress(len(services))
    with ThreadPoolExecutor(max_workers=len(services), thread_name_prefix="health") as pool:
        while pending and time.monotonic() < deadline:
            if sup.poll() is not None:
                progress.clear()
                print(f"the supervisor exited ({sup.returncode}):\n{_tail(run.log('supervisor'), 20)}", file=sys.stderr)
                return EXIT_FAIL
            waiting = [p for p in services if p.name in pending]  # asked all at once: one slow reply delays no other
            for p, health in zip(waiting, pool.map(lambda q: health_status(q.address, timeout=0.5), waiting),
                                 strict=True):
                if health == "SERVING":
                    pending.discard(p.name)
                    progress.done(f"{p.name} SERVING at {p.address}")
            if pending:
                progress.waiting(sorted(pending))
                time.sleep(0.1)
    progress.clear()
    if pending:
        print(f"not SERVING within {args.timeout:g}s: {', '.join(sorted(pending))}", file=sys.stderr)
        for name in sorted(pending):
            print(f"--- {name} log:\n{_tail(run.log(name), 15)}", file=sys.stderr)
        _down(run, timeout=30)
        return EXIT_FAIL
    cluster = run.read() or cluster
    print(_table(_rows(cluster)))
    if size is not None:
        print()
        for p in cluster.procs:
            if p.service == "object-store":
                print(f"object store capacity of node {p.node_id[:8]}: {size.describe()}")
    if url := dashboard_url(cluster):
        print(f"\nDashboard: {url}")
    print(f"\nTessera is up: control store at {cluster.control_store_address}; `tessera down` stops it.")
    return EXIT_OK


def _remote_status(address: str, as_json: bool) -> int:
    """``tessera status --address``: what the control store at ``address`` (or behind the gateway there) lists."""
    from tessera.client import Client

    try:
        with Client(address, timeout=10.0) as c:
            instances = c.instances()
            nodes = c.nodes()
    except Exception as e:
        why = e.details() if hasattr(e, "details") else str(e)  # a grpc.RpcError, or a ConnectionError
        print(f"no Tessera cluster answered at {address}: {why} (check the address, and TESSERA_AUTH_TOKEN_FILE when "
              "the cluster requires a token)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    with ThreadPoolExecutor(max_workers=max(1, len(instances)), thread_name_prefix="status") as pool:
        health = list(pool.map(lambda i: health_status(i.address, timeout=3.0), instances))
    rows: list[dict[str, object]] = [
        {"name": i.service, "pid": i.pid, "address": i.address, "metrics": metrics_url(i.address, i.metrics_address),
         "health": h, "restarts": "", "last_exit": "",
         "detail": f"host {i.hostname}" + (f", HTTP {i.http_address}" if i.http_address else "")}
        for i, h in sorted(zip(instances, health, strict=True), key=lambda x: (x[0].service, x[0].address))]
    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    alive = [n for n in nodes if n.state == cpb.NODE_STATE_ALIVE]
    healthy = bool(rows) and all(r["health"] == "SERVING" for r in rows)
    dashboards = [f"http://{i.http_address}" for i in instances if i.service == "dashboard" and i.http_address]
    if as_json:
        print(json.dumps({"running": True, "healthy": healthy, "address": address, "processes": rows,
                          "dashboard_url": dashboards[0] if dashboards else "",
                          "nodes": [{"node_id": n.node_id.hex(), "address": n.address, "alive": n in alive,
                                     "object_store_address": n.object_store_address} for n in nodes]}, indent=2))
    else:
        print(_table(rows))
        print(f"\n{len(nodes)} node(s) ({len(alive)} alive): " + ", ".join(n.node_id.hex()[:8] for n in nodes))
        for url in dashboards:
            print(f"Dashboard: {url}")
    return EXIT_OK if healthy else EXIT_UNHEALTHY


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "address", ""):
        return _remote_status(args.address, args.json)
    run = RunDir(settings.run_dir)
    cluster = run.read()
    sup = run.supervisor_pid()
    if cluster is None or not sup:
        if args.json:
            print(json.dumps({"running": False, "run_dir": str(run.path)}))
        else:
            print(f"Tessera is not running (run directory {run.path})")
        return EXIT_NOT_RUNNING
    from tessera.common.bus import redact  # NATS's client, only here: `tessera up` does without it

    rows = _rows(cluster)
    healthy = all(r["health"] in ("SERVING", "UP") for r in rows)
    if args.json:
        print(json.dumps({"running": True, "healthy": healthy, "run_dir": str(run.path), "supervisor_pid": sup,
                          "control_store_address": cluster.control_store_address, "nats_url": redact(cluster.nats_url),
                          "redis_urls": [redact(u) for u in cluster.redis_urls], "auth": cluster.auth,
                          "dashboard_url": dashboard_url(cluster), "processes": rows}, indent=2))
    else:
        print(_table(rows))
        if url := dashboard_url(cluster):
            print(f"\nDashboard: {url}")
    return EXIT_OK if healthy else EXIT_UNHEALTHY


def _worker_logs(args: argparse.Namespace) -> int:
    """``tessera logs --task/--actor/--worker``: a worker's output, from its node agent."""
    import grpc

    from tessera._state import get_log

    try:
        for line in get_log(task_id=args.task, actor_id=args.actor, worker_id=args.worker, node_id=args.node,
                            suffix="err" if args.err else "out", tail=args.lines, follow=args.follow,
                            address=args.address):
            print(line, flush=args.follow)
    except ValueError as e:
        print(f"tessera logs: {e}", file=sys.stderr)
        return 2
    except LookupError as e:
        print(f"tessera logs: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (grpc.RpcError, OSError) as e:
        what = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)  # type: ignore[attr-defined]
        print(f"tessera logs: cannot read the cluster at {args.address or 'this machine'}: {what}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    if args.task or args.actor or args.worker:
        if args.service:
            print("tessera logs: give a service, or one of --task, --actor and --worker", file=sys.stderr)
            return 2
        return _worker_logs(args)
    if not args.service:
        print("tessera logs: give a service (a service name, nats, redis-N or supervisor), or one of --task, "
              "--actor and --worker", file=sys.stderr)
        return 2
    run = RunDir(settings.run_dir)
    path = run.log(args.service)
    if not path.exists():
        known = sorted(p.stem for p in run.logs.glob("*.log")) if run.logs.exists() else []
        print(f"no log for {args.service!r} in {run.logs}" + (f"; known: {', '.join(known)}" if known else ""),
              file=sys.stderr)
        return EXIT_FAIL
    print(_tail(path, args.lines), flush=True)
    if args.follow:
        with open(path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            try:
                while True:
                    line = f.readline()
                    if line:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    else:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                pass
    return EXIT_OK


def _down(run: RunDir, *, timeout: float) -> bool:
    """Stop the supervisor (which stops everything); kill whatever is left. True if something ran."""
    cluster = run.read()
    pid = run.supervisor_pid()
    if pid:
        kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            kill(pid)
    leftovers = [p.pid for p in (cluster.procs if cluster else []) if p.pid and alive(p.pid)]
    for p in leftovers:
        kill(p)
    run.clear()
    run.remove_secrets()
    return bool(pid or leftovers)


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    run = RunDir(settings.run_dir)
    if _down(run, timeout=args.timeout):
        print("Tessera is down")
    else:
        print(f"Tessera was not running (run directory {run.path})")
    return EXIT_OK


#: Entry-point group through which a service distribution adds a subcommand (``tessera compile``,
#: ``tessera gpu ...``): ``register(subparsers) -> handler``, where ``handler(args) -> exit code``.
PLUGIN_GROUP = "tessera.cli"
#: The launcher's own subcommands (a plugin cannot replace them).
BUILTIN = ("up", "status", "logs", "down", "memory", "node", "list", "summary", "timeline")


def _plugins(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Callable[[argparse.Namespace], int]]:
    from importlib.metadata import entry_points

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name in handlers or ep.name in BUILTIN:
            continue
        try:
            register = ep.load()
        except Exception as e:  # a broken plugin must not take the launcher down
            print(f"tessera: ignoring subcommand {ep.name!r}: {e}", file=sys.stderr)
            continue
        handlers[ep.name] = register(sub)
    return handlers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera", description="Run a Tessera cluster on this machine.")
    ap.add_argument("--version", action="version", version=f"tessera {tessera_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start NATS, Redis and the six services; wait until all are SERVING")
    up.add_argument("--redis-shards", type=int, default=0, help="Redis shards to start (default TESSERA_REDIS_SHARDS or 1)")
    up.add_argument("--nodes", type=int, default=1, help="nodes to emulate on this machine (each with its own object store)")
    up.add_argument("--gpus-per-node", type=int, default=0,
                    help="virtual GPU slots per node (where NVML finds none); runs a gpu-scheduler node agent per node")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for SERVING")
    up.add_argument("--services", default=",".join(SERVICES),
                    help="comma-separated services to run (default all six; control-store is required), e.g. "
                         "control-store,object-store,task-scheduler for tasks and actors alone")
    up.add_argument("--auth", action="store_true",
                    help="require credentials: a random gRPC token and NATS/Redis passwords in <run_dir>/secrets")
    st = sub.add_parser("status", help="processes, addresses and health")
    st.add_argument("--json", action="store_true")
    st.add_argument("--address", default="",
                    help="a running cluster's control store or gateway (host:port; e.g. a compose stack's "
                         "localhost:50051): its registered services and nodes, instead of this machine's `tessera up`")
    lg = sub.add_parser("logs", help="print a process's log, or a task's, an actor's or a worker's output")
    lg.add_argument("service", nargs="?", default="", help="a service name, nats, redis-N or supervisor")
    lg.add_argument("--task", metavar="ID", help="the output of this task (hex id) on the worker that ran it")
    lg.add_argument("--actor", metavar="ID", help="the output of this actor's worker (hex id)")
    lg.add_argument("--worker", metavar="ID", help="the output of this worker (hex id; with --node)")
    lg.add_argument("--node", metavar="ID", help="the node of --worker (hex id)")
    lg.add_argument("--err", action="store_true", help="stderr instead of stdout (--task, --actor, --worker)")
    lg.add_argument("--address", default=None,
                    help="a cluster's control store (--task, --actor, --worker; default: this machine's)")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("-f", "--follow", action="store_true")
    dn = sub.add_parser("down", help="stop everything")
    dn.add_argument("--timeout", type=float, default=30.0)
    import tessera._memory as _memory
    from tessera._launcher import node as _node
    from tessera._launcher import state_cli as _state

    _memory.register(sub)
    _node.register(sub)
    _state.register(sub)
    argv = sys.argv[1:] if argv is None else argv
    # A service's subcommand is loaded (imported) only when it may be the one asked for.
    plugins = {} if argv[:1] and argv[0] in BUILTIN else _plugins(sub)
    args = ap.parse_args(argv)
    if args.command in plugins:
        return int(plugins[args.command](args) or 0)
    if args.command == "memory":
        return _memory.cmd_memory(args)
    if args.command == "node":
        return _node.cmd_node(args)
    if args.command == "list":
        return _state.cmd_list(args)
    if args.command == "summary":
        return _state.cmd_summary(args)
    if args.command == "timeline":
        return _state.cmd_timeline(args)
    if args.command == "up" and not 0 <= args.redis_shards <= 64:
        ap.error("--redis-shards must be between 1 and 64")
    if args.command == "up" and not 1 <= args.nodes <= 16:
        ap.error("--nodes must be between 1 and 16")
    if args.command == "up" and not 0 <= args.gpus_per_node <= 64:
        ap.error("--gpus-per-node must be between 0 and 64")
    if args.command == "up":
        try:
            args.services = parse_services(args.services)
        except ValueError as e:
            ap.error(f"--services: {e}")
    try:
        settings = Settings()
    except Exception as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return EXIT_FAIL
    return {"up": cmd_up, "status": cmd_status, "logs": cmd_logs, "down": cmd_down}[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
