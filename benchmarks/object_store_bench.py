"""Object-store benchmark: Tessera's object store beside Ray 2.60's, in one run.

    .venv/bin/python benchmarks/object_store_bench.py [--quick] [--json PATH] [--profile DIR]
        [--only same-node-get|node-to-node|remote-driver] [--sizes 1KB,1MB,...] [--ray-client-path DIR]

Tessera: ``tessera up --nodes 2`` in a temporary run directory (two object
stores, 2.5 GiB of shared memory each), driven from this process through the SDK
(``tessera.ObjectStoreClient``); ``tessera down`` at the end, also on error.
Ray: benchmarks/peers/ray_objects.py run with Ray's own venv (.venv-ray) once
Tessera is down, so the two never hold memory at the same time. Both columns
come from the same workload code (``Workload`` in that file); every size is
checked against the data put (exact checksums) on both systems.

Rows: 1 KB put, get and put+get loops (ops/s, p50); 1 MB / 100 MB / 1 GB puts
(GB/s: the first put, and the median after one untimed put) and gets (latency of
a get that returns a zero-copy view); a 1 GB get from a second process on the
same node; a same-node get from another process of 1 KB, 1 MB, 100 MB and 1 GB
(``--sizes`` picks its sizes); a 1 GB pull between two nodes over loopback; numpy's copy
of the same sizes as the physical limit of a put; 100 MB put and get through a driver that
maps no store memory (Tessera's RemoteObjectStoreClient, Ray Client), GB/s each way.
``--only ROW`` (same-node-get, node-to-node, remote-driver) measures one row alone, on both
systems. See benchmarks/README.md.

``--profile DIR`` then profiles Tessera (py-spy on the object-store processes,
pyinstrument in this client) for a loop of 1 KB puts and gets and for one 1 GB
node-to-node pull, and prints the top costs.

Nothing here asserts on timings: the figures are reported as measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_JSON = ROOT / "results" / "object_store.json"
RAY_PYTHON = REPO / ".venv-ray" / "bin" / "python"
RAY_PEER = ROOT / "peers" / "ray_objects.py"
GIB = 1024**3
NODE_MEMORY = int(2.5 * GIB)  # per node, for both systems: room for two 1 GB objects
RATE = 500  # py-spy samples per second (--profile)


def _load_workload() -> ModuleType:
    """benchmarks/peers/ray_objects.py as a module (it imports ray only in its main)."""
    spec = importlib.util.spec_from_file_location("ray_objects_workload", RAY_PEER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


wl = _load_workload()


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").exists() else 0
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": model, "memory_bytes": mem, "dev_shm_bytes": shm, "machine": platform.machine(),
            "system": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "loadavg_start": list(os.getloadavg())}


# ------------------------------------------------------------------ Tessera


def _release_pins(client: Any) -> None:
    """The SDK releases the pin of a dropped zero-copy view lazily, with its next call; do it now."""
    gc.collect()
    flush = getattr(client, "_flush_releases", None)
    if flush is not None:
        flush()


class TesseraSystem:
    """The workload's adapter: a client of node 0 (and one of node 1 for pulls)."""

    def __init__(self, cluster: dict[str, Any]) -> None:
        import tessera

        svc = cluster["services"]
        self.address0 = svc["object-store"]["address"]
        self.address1 = svc["object-store-1"]["address"]
        self.control_store = cluster["control_store_address"]
        self.c0 = tessera.ObjectStoreClient(self.address0, name="bench-node0")
        self.c1 = tessera.ObjectStoreClient(self.address1, name="bench-node1")

    def put(self, value: Any) -> Any:
        return self.c0.put(value)

    def get(self, ref: Any) -> Any:
        return self.c0.get(ref)

    def sync(self) -> None:
        """Small puts are sent to the store in the background: wait until they are all there."""
        flush = getattr(self.c0, "flush", None)
        if flush is not None:
            flush()

    def free(self, refs: list[Any]) -> None:
        self.sync()
        _release_pins(self.c0)
        self.c0.delete(refs)
        refs.clear()

    def _reader_process(self, job: dict[str, Any]) -> dict[str, Any]:
        """A second process (this file with --reader) connects to node 0's store and runs ``job``."""
        job["address"] = self.address0
        out = subprocess.run([sys.executable, __file__, "--reader"], input=json.dumps(job),
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise SystemExit(f"the reader process failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def reader(self, ref: Any, n: int) -> dict[str, Any]:
        return self._reader_process({"kind": "same", "ref": ref.hex(), "n": n})

    def reader_small(self, refs: list[Any], warmup: int) -> dict[str, Any]:
        return self._reader_process({"kind": "each", "refs": [r.hex() for r in refs], "warmup": warmup})

    def wait_located(self, ref: Any, timeout: float = 30.0) -> float:
        """Until the control store lists a copy of ``ref`` (node 0 reports seals in the background)."""
        from tessera.api.control_store.v1 import control_store_pb2 as cpb
        from tessera.common.registry import control_store_stub

        ch, stub = control_store_stub(self.control_store)
        t0 = time.perf_counter()
        with ch:
            while time.perf_counter() - t0 < timeout:
                objs = stub.GetObjects(cpb.GetObjectsRequest(object_ids=[ref.id])).objects
                if objs and objs[0].locations:
                    return time.perf_counter() - t0
                time.sleep(0.005)
        raise SystemExit(f"node 0 did not report {ref.hex()} to the control store within {timeout:g}s")

    def pull_once(self, value: Any, check: bool) -> dict[str, Any]:
        r = self.c0.put(value)
        located = self.wait_located(r)
        t0 = time.perf_counter()
        v = self.c1.get(r, timeout=300)
        dt = time.perf_counter() - t0
        cs = wl.checksum(v) if check else None
        del v
        _release_pins(self.c1)
        self.c1.delete([r])
        self.c0.delete([r])
        return {"get_s": dt, "checksum": cs, "located_s": located}

    def node_to_node(self, value: Any, reps: int) -> list[dict[str, Any]]:
        """Put on node 0; once the control store knows the copy, get through a client of node 1 (a pull)."""
        out = []
        for _ in range(reps):
            out.append(self.pull_once(value, True))
            log(f"   1 GB node to node: {1 / out[-1]['get_s']:.2f} GB/s")
            wl._settle(wl.SIZES["1GB"])
        return out

    def close(self) -> None:
        for c in (self.c0, self.c1):
            with contextlib.suppress(Exception):
                c.close()


class TesseraRemoteDriver:
    """The remote-driver row's adapter: a client that maps no arena and streams bytes over gRPC."""

    def __init__(self, address: str) -> None:
        from tessera.client._remote_objects import RemoteObjectStoreClient

        self.c = RemoteObjectStoreClient(address, name="bench-remote-driver")

    def put(self, value: Any) -> Any:
        return self.c.put(value)

    def get(self, ref: Any) -> Any:
        return self.c.get(ref)

    def free(self, refs: list[Any]) -> None:
        gc.collect()
        self.c.delete(refs)
        refs.clear()

    def close(self) -> None:
        self.c.close()


def remote_driver(w: Any, address: str) -> str:
    drv = TesseraRemoteDriver(address)
    try:
        w.remote_driver_row(drv)
    finally:
        drv.close()
    return (f"tessera.client._remote_objects.RemoteObjectStoreClient of node 0's store over loopback (WriteObject/"
            f"ReadObject streams of {drv.c.chunk_bytes / 2**20:g} MiB chunks; nothing mapped)")


def run_remote_only(plan: Any, src: np.ndarray, keep_logs: Path | None = None) -> dict[str, Any]:
    """--only remote-driver: one node, the remote-driver row alone."""
    memory = GIB
    log(f"== Tessera: tessera up (one node, {memory / GIB:.1f} GiB of shared memory), the remote-driver row only ...")
    with tessera_cluster(1, memory, keep_logs) as (cluster, _env):
        w = wl.Workload(plan, src, log=log)
        w.copy_rows(("100MB",))  # the machine's memcpy now: a gauge for the figures of this run
        desc = remote_driver(w, cluster["services"]["object-store"]["address"])
        return {"system": "tessera", "object_store_memory": memory, "up_s": cluster["up_s"], "remote_driver": desc,
                "metrics": w.m, "verified": w.verified}


def reader_main() -> int:
    """The second process of the same-node rows: a job (JSON) on stdin, the result (JSON) on stdout."""
    import tessera

    job = json.loads(sys.stdin.read())
    t0 = time.perf_counter()
    client = tessera.ObjectStoreClient(job["address"], name="bench-reader")
    connect = time.perf_counter() - t0
    if job["kind"] == "same":
        out = wl.timed_gets(client.get, tessera.ObjectRef(bytes.fromhex(job["ref"])), job["n"])
    else:
        out = wl.read_each(client.get, [tessera.ObjectRef(bytes.fromhex(h)) for h in job["refs"]], job["warmup"])
    out["connect_s"] = connect
    client.close()
    print(json.dumps(out), flush=True)
    return 0


@contextlib.contextmanager
def tessera_cluster(nodes: int, memory: int | None, keep_logs: Path | None = None,
                    up_args: Sequence[str] = ()) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """``tessera up --nodes N`` in a temporary run directory; ``tessera down`` (and cleanup) whatever happens.

    ``memory``: TESSERA_OBJECT_STORE_MEMORY; None: the stores' default size."""
    run_dir = Path(tempfile.mkdtemp(prefix="tessera-objbench-"))
    env = {**os.environ, "TESSERA_RUN_DIR": str(run_dir), "TESSERA_LOG_LEVEL": "WARNING"}
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "TESSERA_NATS_URL",
              "TESSERA_REDIS_URLS", "TESSERA_OBJECT_STORE_MEMORY"):
        env.pop(k, None)
    if memory is not None:
        env["TESSERA_OBJECT_STORE_MEMORY"] = str(memory)
    exe = Path(sys.executable).parent / "tessera"
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "tessera._launcher.cli"]
    cluster: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        up = subprocess.run([*cli, "up", "--nodes", str(nodes), "--timeout", "240", *up_args], env=env,
                            capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            raise SystemExit(f"tessera up failed ({up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
        cluster = json.loads((run_dir / "cluster.json").read_text())
        cluster["up_s"] = time.perf_counter() - t0
        cluster["up_stdout"] = up.stdout
        yield cluster, env
    finally:
        # the teardown runs to its end: a second Ctrl-C or SIGTERM meanwhile is ignored
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if keep_logs is not None and (run_dir / "logs").exists():
                shutil.copytree(run_dir / "logs", keep_logs, dirs_exist_ok=True)
            log("   tessera down ...")
            down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120)
            if down.returncode != 0:
                log(f"tessera down failed ({down.returncode}): {down.stderr[-2000:]}")
            for name, s in cluster.get("services", {}).items():  # arenas of our nodes, should a store have died
                if name.startswith("object-store") and s.get("node_id"):
                    Path(f"/dev/shm/tessera-{s['node_id']}.arena").unlink(missing_ok=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def _chunk_bytes() -> int:
    from tessera.common.config import Settings

    return int(Settings().object_store_chunk_bytes)


def run_tessera(plan: Any, profile_dir: Path | None, src: np.ndarray,
                keep_logs: Path | None = None, only: str | None = None) -> dict[str, Any]:
    import tessera

    log(f"== Tessera: tessera up --nodes 2, {NODE_MEMORY / GIB:.1f} GiB of shared memory per node ...")
    with tessera_cluster(2, NODE_MEMORY, keep_logs) as (cluster, env):
        svc = cluster["services"]
        log(f"   up in {cluster['up_s']:.1f} s; object stores at {svc['object-store']['address']} "
            f"(pid {svc['object-store']['pid']}) and {svc['object-store-1']['address']} "
            f"(pid {svc['object-store-1']['pid']})")
        system = TesseraSystem(cluster)
        try:
            w = wl.Workload(plan, src, log=log)
            if only is None:
                w.copy_rows()
                w.small_rows(system)
                w.large_rows(system)
                w.aligned_copy_row()
                w.reader_row(system)
            if only in (None, "same-node-get"):
                w.same_node_row(system)
            if only in (None, "node-to-node"):
                w.node_to_node_row(system)
            remote = remote_driver(w, system.address0) if only is None else f"skipped (--only {only})"
            stats = system.c0.stats()
            pulled = system.c1.stats()
            result: dict[str, Any] = {
                "system": "tessera", "version": getattr(tessera, "__version__", ""), "numpy": np.__version__,
                "object_store_memory": NODE_MEMORY, "up_s": cluster["up_s"],
                "inline_threshold": system.c0.inline_threshold,
                "reader": "a second Python process with its own ObjectStoreClient of node 0's store "
                          f"(its session over the store's {system.c0.transport})",
                "node_to_node": f"put through a client of node 0, get through a client of node 1 (a pull of "
                                f"{_chunk_bytes() / 2**20:g} MiB chunks over the stores' data sockets on loopback: "
                                f"{pulled.transfer_pulls} of {pulled.pulls} pulls, {pulled.transfer_fallbacks} fell "
                                f"back to gRPC), timed from the get once the control store lists the copy",
                "remote_driver": remote,
                "metrics": w.m, "verified": w.verified,
                "store_after": {"objects": stats.objects, "used": stats.used, "spills": stats.spills,
                                "evictions": stats.evictions},
            }
            if profile_dir is not None:
                result["profile"] = profile_tessera(system, cluster, src, profile_dir)
            return result
        finally:
            system.close()


# ------------------------------------------------------------------ profiling


def _pyspy() -> str | None:
    p = Path(sys.executable).parent / "py-spy"
    return str(p) if p.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def pyspy_record(pids: dict[str, int], out_dir: Path, tag: str, rate: int = RATE) -> Iterator[dict[str, Path]]:
    """py-spy (raw collapsed stacks per thread, full file names, busy samples only) on each pid meanwhile."""
    exe = _pyspy()
    paths = {name: out_dir / f"{tag}-{name}.txt" for name in pids}
    if exe is None:
        log("   (py-spy not found: no server-side profile; pip install py-spy into the venv)")
        yield {}
        return
    procs = [subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                               "--threads", "--full-filenames", "--nonblocking", "-o", str(paths[name])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for name, pid in pids.items()]
    time.sleep(1.0)  # py-spy attaches
    try:
        yield paths
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


#: Leaf frames of a thread that waits (py-spy's --nonblocking idle detection lets some through).
_IDLE = ("EpollSelector.select", "BaseSelector.select", "_worker (", "Thread.run (", "Condition.wait",
         "Event.wait", "_wait_for_tstate_lock", "Thread.join")

#: Who a frame belongs to, by its file: the first match wins. Frames of the standard library's
#: helpers (typing, contextlib, abc, weakref ...) are charged to the nearest caller that has an owner.
_OWNERS = (
    ("opentelemetry", "OpenTelemetry (tracing interceptors, spans, context)"),
    ("/wrapt/", "OpenTelemetry (tracing interceptors, spans, context)"),
    ("/grpc/", "grpc (Python and Cython layer)"),
    ("/google/protobuf/", "protobuf"),
    ("/object_store/", "Tessera object store"),
    ("/tessera/common/", "Tessera common (rpc, service)"),
    ("/tessera/", "Tessera other"),
    ("/asyncio/", "asyncio event loop"),
)


def _owner(frame: str) -> str | None:
    for needle, owner in _OWNERS:
        if needle in frame:
            return owner
    return None


def summarize_raw(path: Path, top: int = 12) -> dict[str, Any]:
    """Shares of the busy samples per thread, per owner and per function, from py-spy's raw output.

    py-spy gives proportions; the CPU time itself is measured from /proc (see ``cpu_s``).
    Time in Cython or C code that py-spy cannot see is charged to the Python frame that
    called it: the self time of asyncio's ``Handle._run`` is grpc's Cython server code
    (its callbacks and coroutine steps) run by the event loop.
    """
    if not path.exists():
        return {"error": f"no profile at {path}"}
    threads: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [f.strip() for f in stack.split(";")]
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            thread = frames.pop(0).split(": ", 1)[-1]
        if not frames or any(m in frames[-1] for m in _IDLE):
            continue
        total += count
        threads[thread] += count
        if frames[-1].startswith("Handle._run ("):
            owner = "grpc aio server (Cython, run as event-loop callbacks)"
        else:
            owner = next((o for o in map(_owner, reversed(frames)) if o), "other (C extensions, interpreter)")
        owners[owner] += count
        self_c[_short(frames[-1])] += count
        for f in {_short(f) for f in frames}:
            incl[f] += count

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100.0 * v / total, 1)) for name, v in c.most_common(k)] if total else []

    return {"busy_samples": total, "threads": pct(threads, 8), "by_owner": pct(owners, 10),
            "self": pct(self_c, top), "inclusive": pct(incl, 4 * top)}


def _short(frame: str) -> str:
    """'fn (/long/path/pkg/mod.py:123)' -> 'fn (pkg/mod.py:123)'."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    parts = where.rstrip(")").split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def _pyinstrument_top(profiler: Any, top: int = 12) -> list[tuple[str, float]]:
    """Self time per function, as % of the profiled wall time, from a pyinstrument session."""
    session = profiler.last_session
    self_t: Counter[str] = Counter()
    total = session.duration or 1.0

    def name(frame: Any) -> str:
        where = "/".join((frame.file_path_short or "").split("/")[-2:])
        return f"{frame.function} ({where}:{frame.line_no})"

    def walk(frame: Any, parent: str) -> None:
        synthetic = frame.function.startswith("[")  # "[self]", "[await]": time of the parent itself
        label = parent if synthetic else name(frame)
        child_t = sum(c.time for c in frame.children)
        self_t[label] += max(0.0, frame.time - child_t)
        for c in frame.children:
            walk(c, label)

    root = session.root_frame()
    if root is not None:
        walk(root, "?")
    return [(k, round(100.0 * v / total, 1)) for k, v in self_t.most_common(top)]


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def measured(pids: dict[str, int], out_dir: Path, tag: str, interval: float) -> Iterator[dict[str, Any]]:
    """py-spy on ``pids``, pyinstrument on this process, and the CPU seconds of each, while the block runs."""
    profiler_cls: Any = None
    try:
        from pyinstrument import Profiler

        profiler_cls = Profiler
    except ImportError:
        log("   (pyinstrument not installed: no client-side profile)")
    res: dict[str, Any] = {}
    prof = profiler_cls(interval=interval) if profiler_cls is not None else None
    with pyspy_record(pids, out_dir, tag) as paths:
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        me0 = os.times()
        if prof:
            prof.start()
        t0 = time.perf_counter()
        try:
            yield res
        finally:
            wall = time.perf_counter() - t0
            if prof:
                prof.stop()
            me1 = os.times()
            res["wall_s"] = wall
            res["cpu_s"] = {k: cpu_s(p) - cpu0[k] for k, p in pids.items()}
            res["cpu_s"]["client"] = (me1.user + me1.system) - (me0.user + me0.system)
    res["server"] = {k: summarize_raw(p) for k, p in paths.items()}
    if prof:
        (out_dir / f"{tag}-client.txt").write_text(prof.output_text(unicode=False, color=False))
        res["client"] = _pyinstrument_top(prof)


def profile_tessera(system: TesseraSystem, cluster: dict[str, Any], src: np.ndarray, out_dir: Path) -> dict[str, Any]:
    """Where Tessera's time goes: 1 KB puts, 1 KB gets through gRPC, one 1 GB node-to-node pull."""
    import tessera

    out_dir.mkdir(parents=True, exist_ok=True)
    svc = cluster["services"]
    pid0, pid1 = int(svc["object-store"]["pid"]), int(svc["object-store-1"]["pid"])
    result: dict[str, Any] = {"dir": str(out_dir)}
    x = src[:125]
    n = 3000

    log(f"== profile (a1): {n} puts of 1 KB, until stored")
    with measured({"store0": pid0}, out_dir, "put1k", 0.0002) as put:
        refs = [system.put(x) for _ in range(n)]
        system.sync()
    put["ops"] = n
    result["put_1KB"] = put

    log(f"== profile (a2): {n} gets of 1 KB through gRPC (a second client, which holds no copy)")
    other = tessera.ObjectStoreClient(system.address0, name="bench-other")
    with measured({"store0": pid0}, out_dir, "get1k", 0.0002) as get:
        for r in refs:
            v = other.get(r)
    get["ops"] = n
    result["get_1KB"] = get
    _expect_equal(v, x)
    del v
    other.close()
    system.free(refs)

    log("== profile (b): one 1 GB node-to-node pull")
    with measured({"store1_puller": pid1, "store0_server": pid0}, out_dir, "pull1g", 0.001) as pull:
        p = system.pull_once(src, False)
    pull["ops"] = 1
    pull["get_s"] = p["get_s"]
    pull["gbps"] = wl.SIZES["1GB"] / p["get_s"] / 1e9
    pull["note"] = "the window also holds the 1 GB put on node 0 and the deletes (the get alone: get_s)"
    result["pull_1GB"] = pull
    _print_profile(result)
    return result


def _expect_equal(v: Any, x: Any) -> None:
    if not np.array_equal(v, x):
        raise SystemExit("benchmark: wrong data read back while profiling")


def _print_profile(res: dict[str, Any]) -> None:
    for key, title in (("put_1KB", "1 KB put (until stored)"), ("get_1KB", "1 KB get through gRPC"),
                       ("pull_1GB", "1 GB node-to-node pull")):
        part = res[key]
        per = part["wall_s"] / part["ops"]
        cpu = ", ".join(f"{k} {v / part['ops'] * 1e6:,.0f} us" for k, v in part["cpu_s"].items())
        extra = f"; the get itself {part['get_s']:.2f} s = {part['gbps']:.2f} GB/s" if "get_s" in part else ""
        log(f"\n-- {title}: {per * 1e6:,.0f} us wall per op{extra}; CPU per op: {cpu}")
        for name, summ in part.get("server", {}).items():
            if "error" in summ:
                log(f"   {name}: {summ['error']}")
                continue
            threads = ", ".join(f"{t} {v}%" for t, v in summ["threads"][:3])
            log(f"   py-spy {name} ({summ['busy_samples']} busy samples: {threads}); by owner:")
            for k, v in summ["by_owner"][:6]:
                log(f"      {v:5.1f}%  {k}")
            log("     top self:")
            for k, v in summ["self"][:8]:
                log(f"      {v:5.1f}%  {k}")
        if part.get("client"):
            log("   pyinstrument client, self time as % of wall:")
            for k, v in part["client"][:8]:
                log(f"      {v:5.1f}%  {k}")
    log(f"\nraw profiles (py-spy collapsed stacks, pyinstrument trees) in {res['dir']}")


def run_tessera_fresh_put(plan: Any, src: np.ndarray) -> dict[str, Any]:
    """``--put-1gb``: a fresh ``tessera up`` with default settings (one node; the control and object
    stores alone), a client of its store, and the store's very first put: 1 GB."""
    import tessera

    log("== Tessera: tessera up --services control-store,object-store (default settings) ...")
    with tessera_cluster(1, None, up_args=("--services", "control-store,object-store")) as (cluster, _env):
        chosen = [ln for ln in cluster["up_stdout"].splitlines() if ln.startswith("object store capacity")]
        log(f"   up in {cluster['up_s']:.1f} s; {chosen[0] if chosen else ''}")
        address = cluster["services"]["object-store"]["address"]
        t0 = time.perf_counter()
        client = tessera.ObjectStoreClient(address, name="bench-fresh")
        open_s = time.perf_counter() - t0

        class One:
            """The workload's adapter over that one client."""

            def put(self, value: Any) -> Any:
                return client.put(value)

            def get(self, ref: Any) -> Any:
                return client.get(ref)

            def free(self, refs: list[Any]) -> None:
                _release_pins(client)
                client.delete(refs)
                refs.clear()

        try:
            w = wl.Workload(plan, src, log=log)
            w.fresh_put_rows(One(), lambda: client.put(src))
            return {"system": "tessera", "version": getattr(tessera, "__version__", ""), "numpy": np.__version__,
                    "object_store_memory": int(client.stats().capacity), "capacity_line": chosen[0] if chosen else "",
                    "client_open_s": open_s, "metrics": w.m, "verified": w.verified}
        finally:
            client.close()


def run_ray_fresh_put(timeout: float) -> dict[str, Any]:
    if not RAY_PYTHON.exists():
        return {"error": f"{RAY_PYTHON} not found"}
    log(f"== Ray: {RAY_PYTHON.relative_to(REPO)} {RAY_PEER.relative_to(REPO)} --put-1gb "
        f"(ray.init(num_cpus=2), Ray's default object store size) ...")
    return _ray_helper([str(RAY_PYTHON), str(RAY_PEER), "--put-1gb"], timeout)


FRESH_ROWS: list[tuple[str, str, str]] = [
    ("fresh_put_1GB_first_gbps", "1 GB put, first of a fresh store", "GB/s"),
    ("fresh_copy_1GB_cold_gbps", "numpy copyto 1 GB, fresh dst", "GB/s"),
    ("fresh_put_1GB_first_x_memcpy", "  first put / fresh-dst memcpy", "x"),
    ("fresh_put_1GB_gbps", "1 GB put, warm (median)", "GB/s"),
    ("fresh_copy_1GB_gbps", "numpy copyto 1 GB, warm dst", "GB/s"),
    ("fresh_put_1GB_x_memcpy", "  warm put / warm-dst memcpy", "x"),
]


def fresh_put_main(args: argparse.Namespace, plan: Any, info: dict[str, Any], started: float) -> int:
    t0 = time.perf_counter()
    src = wl.source_array()
    log(f"   source array (1 GB of float64 from default_rng(0)): {time.perf_counter() - t0:.1f} s")
    tess = {} if args.no_tessera else run_tessera_fresh_put(plan, src)
    del src
    gc.collect()
    ray_res: dict[str, Any] = {} if args.no_ray else run_ray_fresh_put(args.ray_timeout)
    if "error" in ray_res:
        log(f"   Ray: {ray_res['error']}")
    tm, rm = tess.get("metrics", {}), ray_res.get("metrics", {})
    head = f"{'row (each system: its own process, same run)':<48}{'unit':>6}{'Tessera':>10}{'Ray':>10}"
    lines = [head, "-" * len(head)]
    for key, label, unit in FRESH_ROWS:
        lines.append(f"{label:<48}{unit:>6}{_fmt(tm.get(key), 'GB/s'):>10}{_fmt(rm.get(key), 'GB/s'):>10}")
    print()
    print("\n".join(lines))
    for name, res in (("Tessera", tess), ("Ray", ray_res)):
        if res.get("object_store_memory"):
            print(f"{name}'s store: {res['object_store_memory'] / GIB:.1f} GiB"
                  + (f" ({res['capacity_line']})" if res.get("capacity_line") else ""))
    if tm:
        print(f"aim: first 1 GB put >= 0.5x memcpy into fresh pages: "
              f"{'REACHED' if tm['fresh_put_1GB_first_x_memcpy'] >= 0.5 else 'NOT reached'} "
              f"({tm['fresh_put_1GB_first_x_memcpy']:.2f}x); warm 1 GB put >= 0.8x memcpy: "
              f"{'REACHED' if tm['fresh_put_1GB_x_memcpy'] >= 0.8 else 'NOT reached'} ({tm['fresh_put_1GB_x_memcpy']:.2f}x)")
    info["loadavg_end"] = list(os.getloadavg())
    out = args.json if args.json != DEFAULT_JSON else DEFAULT_JSON.with_name("object_store_put_1gb.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "object_store_put_1gb", "seconds": round(time.time() - started, 1),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                               "host": info, "plan": asdict(plan), "tessera": tess, "ray": ray_res},
                              indent=2, default=str) + "\n")
    print(f"results written to {out}")
    return 0


# ------------------------------------------------------------------ Ray


def run_ray(quick: bool, timeout: float, *, only: str | None = None, sizes: str | None = None,
            client_path: Path | None = None) -> dict[str, Any]:
    """The Ray helper's rows (``only``: one row, as --only names it)."""
    if not RAY_PYTHON.exists():
        return {"error": f"{RAY_PYTHON} not found (create it: python -m venv .venv-ray && "
                         ".venv-ray/bin/pip install ray==2.60.0 numpy)"}
    client = only == "remote-driver"
    how = (f"Ray Client to a head with object_store_memory={GIB / GIB:.1f} GiB" if client else
           f"ray.init(num_cpus=2, object_store_memory={NODE_MEMORY / GIB:.1f} GiB)")
    log(f"== Ray: {RAY_PYTHON.relative_to(REPO)} {RAY_PEER.relative_to(REPO)} ({how}) ...")
    cmd = [str(RAY_PYTHON), str(RAY_PEER), "--memory", str(GIB if client else NODE_MEMORY),
           *(["--quick"] if quick else []), *(["--only", "client" if client else only] if only else []),
           *(["--sizes", sizes] if sizes else [])]
    return _ray_helper(cmd, timeout, client_path=client_path)


def _ray_helper(cmd: list[str], timeout: float, client_path: Path | None = None) -> dict[str, Any]:
    """Run the Ray peer in Ray's venv; its last JSON line is the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "VIRTUAL_ENV", "PYTHONPATH"))}
    if client_path is not None:  # e.g. grpcio for Ray Client, when Ray's venv has none
        env["PYTHONPATH"] = str(client_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the helper's own session: its driver and Ray's processes
        proc.wait(30)
        raise
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"the Ray helper exited with {proc.returncode}: {out[-2000:]}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------ report

#: (key, label, unit, better) — better: "higher" or "lower"
ROWS: list[tuple[str, str, str, str]] = [
    ("put_1KB_ops", "1 KB put loop, until stored", "ops/s", "higher"),
    ("put_1KB_p50_us", "1 KB put call p50", "us", "lower"),
    ("get_1KB_ops", "1 KB get loop (putting process)", "ops/s", "higher"),
    ("get_1KB_p50_us", "1 KB get p50 (putting process)", "us", "lower"),
    ("putget_1KB_ops", "1 KB put+get (small ops)", "ops/s", "higher"),
    ("putget_1KB_p50_us", "1 KB put+get p50", "us", "lower"),
    ("reader_1KB_ops", "1 KB get loop, 2nd process", "ops/s", "higher"),
    ("reader_1KB_p50_us", "1 KB get p50, 2nd process", "us", "lower"),
    ("put_1MB_gbps", "1 MB put (warm, median)", "GB/s", "higher"),
    ("put_1MB_cold_gbps", "1 MB put (first)", "GB/s", "higher"),
    ("get_1MB_us", "1 MB get", "us", "lower"),
    ("put_100MB_gbps", "100 MB put (warm, median)", "GB/s", "higher"),
    ("put_100MB_cold_gbps", "100 MB put (first, cold)", "GB/s", "higher"),
    ("get_100MB_us", "100 MB get", "us", "lower"),
    ("put_1GB_gbps", "1 GB put (warm, median)", "GB/s", "higher"),
    ("put_1GB_best_gbps", "1 GB put (warm, best)", "GB/s", "higher"),
    ("put_1GB_cold_gbps", "1 GB put (first, cold)", "GB/s", "higher"),
    ("get_1GB_us", "1 GB get", "us", "lower"),
    ("reader_1GB_get_us", "1 GB get, 2nd process same node", "us", "lower"),
    ("reader_1GB_first_us", "  first get in that process", "us", "lower"),
    ("same_node_1KB_p50_us", "same-node get, other process 1 KB", "us", "lower"),
    ("same_node_1MB_p50_us", "same-node get, other process 1 MB", "us", "lower"),
    ("same_node_100MB_p50_us", "same-node get, other process 100 MB", "us", "lower"),
    ("same_node_1GB_p50_us", "same-node get, other process 1 GB", "us", "lower"),
    ("n2n_1GB_gbps", "1 GB node to node (loopback)", "GB/s", "higher"),
    ("remote_put_100MB_gbps", "remote-driver put of 100 MB", "GB/s", "higher"),
    ("remote_get_100MB_gbps", "remote-driver get of 100 MB", "GB/s", "higher"),
    ("copy_100MB_gbps", "numpy copyto 100 MB, warm dst", "GB/s", "higher"),
    ("copy_1GB_gbps", "numpy copyto 1 GB, warm dst", "GB/s", "higher"),
    ("copy_1GB_cold_gbps", "numpy copyto 1 GB, fresh dst", "GB/s", "higher"),
    ("copy_1GB_put_alignment_gbps", "numpy copyto 1 GB, put's placement", "GB/s", "higher"),
]


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "GB/s":
        return f"{v:.2f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def build_rows(t: dict[str, float], r: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for key, label, unit, better in ROWS:
        tv, rv = t.get(key), r.get(key)
        rows.append({"key": key, "row": label, "unit": unit, "better": better, "tessera": tv, "ray": rv,
                     "ratio": (tv / rv) if tv is not None and rv else None})
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'row':<34}{'unit':>7}{'Tessera':>11}{'Ray':>11}{'T/Ray':>8}  better"
    lines = [head, "-" * len(head)]
    for x in rows:
        ratio = f"{x['ratio']:.2f}x" if x["ratio"] is not None else "n/a"
        if x["key"].startswith("copy_"):
            ratio += "*"
        lines.append(f"{x['row']:<34}{x['unit']:>7}{_fmt(x['tessera'], x['unit']):>11}"
                     f"{_fmt(x['ray'], x['unit']):>11}{ratio:>8}  {x['better']}")
    lines.append("* numpy rows are no system's: the same copy, measured in each system's process (a gauge of the "
                 "machine's state then);\n  \"put's placement\": the destination placed where that system's 1 GB put "
                 "wrote, relative to the source, modulo 4 KiB")
    return "\n".join(lines)


def aims(t: dict[str, float], r: dict[str, float]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, figure: str, reached: bool | None, ray: str = "") -> None:
        out.append({"aim": name, "tessera": figure, "reached": reached, "ray": ray})

    for size in ("100MB", "1GB"):
        if f"put_{size}_gbps" in t and f"copy_{size}_gbps" in t:
            f = t[f"put_{size}_gbps"] / t[f"copy_{size}_gbps"]
            rf = (r[f"put_{size}_gbps"] / r[f"copy_{size}_gbps"]) if f"put_{size}_gbps" in r else None
            figure = f"{f:.2f}x"
            if size == "1GB" and "copy_1GB_put_alignment_gbps" in t:
                figure += (f" (and {t['put_1GB_gbps'] / t['copy_1GB_put_alignment_gbps']:.2f}x of a copy with the "
                           f"put's own placement, dst - src = {int(t['put_1GB_dst_src_mod4096'])} mod 4096)")
            add(f"{size} put >= 0.8x memcpy (warm, same process's copyto)", figure, f >= 0.8,
                f"{rf:.2f}x" if rf is not None else "n/a")
    if "put_1GB_cold_gbps" in t and "copy_1GB_cold_gbps" in t:
        f = t["put_1GB_cold_gbps"] / t["copy_1GB_cold_gbps"]
        rf = (r["put_1GB_cold_gbps"] / r["copy_1GB_cold_gbps"]) if "put_1GB_cold_gbps" in r and "copy_1GB_cold_gbps" in r \
            else None
        add("1GB first put >= 0.5x memcpy into fresh pages (see --put-1gb for a fresh store's very first put)",
            f"{f:.2f}x", f >= 0.5, f"{rf:.2f}x" if rf is not None else "n/a")
    gets = {k: v for k, v in t.items() if (k.startswith("get_") and k.endswith("_us") and "first" not in k)
            or k in ("reader_1GB_get_us", "reader_1KB_p50_us")
            or (k.startswith("same_node_") and k.endswith("_p50_us"))}
    if gets:
        worst = max(gets, key=lambda k: gets[k])
        rg = {k: r[k] for k in gets if k in r}
        rworst = f"{max(rg.values()):.0f} us worst ({max(rg, key=lambda k: rg[k])})" if rg else "n/a"
        add("same-node get of any size < 100 us (median)", f"{gets[worst]:.0f} us worst ({worst})",
            gets[worst] < 100, rworst)
    if "putget_1KB_ops" in t:
        rv = r.get("putget_1KB_ops")
        add("small put+get ops >= 2x Ray", f"{t['putget_1KB_ops'] / rv:.2f}x Ray" if rv else "n/a (no Ray figure)",
            (t["putget_1KB_ops"] >= 2 * rv) if rv else None)
    if "n2n_1GB_gbps" in t:
        rv = r.get("n2n_1GB_gbps")
        add("node-to-node 1 GB >= 2 GB/s", f"{t['n2n_1GB_gbps']:.2f} GB/s", t["n2n_1GB_gbps"] >= 2.0,
            f"{rv:.2f} GB/s" if rv else "n/a")
    if "remote_put_100MB_gbps" in t:
        tp, tg = t["remote_put_100MB_gbps"], t["remote_get_100MB_gbps"]
        rp, rg = r.get("remote_put_100MB_gbps"), r.get("remote_get_100MB_gbps")
        add("remote-driver put+get of 100 MB >= 0.5 GB/s each way", f"put {tp:.2f} GB/s, get {tg:.2f} GB/s",
            tp >= 0.5 and tg >= 0.5, f"put {rp:.2f} GB/s, get {rg:.2f} GB/s (Ray Client)" if rp and rg else "n/a")
    return out


def aims_text(items: Sequence[dict[str, Any]]) -> str:
    lines = ["aims:"]
    for a in items:
        mark = {True: "REACHED", False: "NOT reached", None: "unknown"}[a["reached"]]
        lines.append(f"  {mark:<12} {a['aim']}: Tessera {a['tessera']}" + (f"; Ray {a['ray']}" if a["ray"] else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier figures)")
    ap.add_argument("--json", type=Path, help=f"where to write the results (default {DEFAULT_JSON}; with --only "
                                              f"ROW, object_store_ROW.json beside it)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="after Tessera's rows, profile 1 KB put/get and a 1 GB pull (py-spy + pyinstrument) into DIR")
    ap.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the Tessera services' logs here at the end")
    ap.add_argument("--no-ray", action="store_true", help="Tessera only")
    ap.add_argument("--no-tessera", action="store_true", help="Ray only")
    ap.add_argument("--ray-timeout", type=float, default=600.0, help="seconds the Ray helper may take")
    ap.add_argument("--put-1gb", action="store_true",
                    help="only the 1 GB put on a fresh store of default size (Tessera: a fresh tessera up; Ray: a "
                         "fresh ray.init), its first put and warm puts, beside memcpy in the same process")
    ap.add_argument("--only", choices=["same-node-get", "node-to-node", "remote-driver"],
                    help="measure one row alone, on both systems (remote-driver: one node, 100 MB through a driver "
                         "that maps no memory)")
    ap.add_argument("--sizes", help="comma-separated sizes of the same-node get row, e.g. 1KB,1MB (default: all)")
    ap.add_argument("--ray-client-path", type=Path, metavar="DIR",
                    help="put DIR on the Ray helper's PYTHONPATH (e.g. grpcio, which Ray Client needs and a minimal "
                         "`pip install ray` lacks)")
    ap.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.json is None:
        args.json = DEFAULT_JSON.with_name(f"object_store_{args.only}.json") if args.only else DEFAULT_JSON
    if args.reader:
        return reader_main()

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # run the finally blocks: tessera down

    signal.signal(signal.SIGTERM, on_term)
    plan = wl.Plan.quick() if args.quick else wl.Plan()
    if args.sizes:
        plan.same_node_sizes = tuple(args.sizes.split(","))
        for size in plan.same_node_sizes:
            if size not in wl.SIZES:
                ap.error(f"--sizes: {size!r} is not one of {', '.join(wl.SIZES)}")
    started = time.time()
    info = machine_info()
    log(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['memory_bytes'] / GIB:.1f} GiB, "
        f"load {', '.join(f'{x:.2f}' for x in info['loadavg_start'])}")
    if args.put_1gb:
        return fresh_put_main(args, plan, info, started)
    tess: dict[str, Any] = {}
    if not args.no_tessera:
        t0 = time.perf_counter()
        nbytes = {"same-node-get": max(wl.SIZES[s] for s in plan.same_node_sizes),
                  "remote-driver": wl.SIZES["100MB"]}.get(args.only or "", wl.SIZES["1GB"])
        src = wl.source_array(nbytes)
        log(f"   source array ({nbytes / 1e9:g} GB of float64 from default_rng(0)): {time.perf_counter() - t0:.1f} s")
        tess = (run_remote_only(plan, src, args.keep_logs) if args.only == "remote-driver" else
                run_tessera(plan, args.profile, src, args.keep_logs, args.only))
        del src
        gc.collect()
    ray_res: dict[str, Any] = {} if args.no_ray else run_ray(args.quick, args.ray_timeout, only=args.only,
                                                             sizes=args.sizes, client_path=args.ray_client_path)
    if "error" in ray_res:
        log(f"   Ray: {ray_res['error']}")
    tm, rm = tess.get("metrics", {}), ray_res.get("metrics", {})
    rows = build_rows(tm, rm)
    if args.only:  # the rows measured
        rows = [x for x in rows if x["tessera"] is not None or x["ray"] is not None]
    goals = aims(tm, rm)
    info["loadavg_end"] = list(os.getloadavg())
    print()
    print(table(rows))
    print()
    print(aims_text(goals))
    print(f"\nsame-node 2nd process: Tessera: {tess.get('reader', 'n/a')}; Ray: {ray_res.get('reader', 'n/a')}")
    if "reader_connect_ms" in tm:
        print(f"  (Tessera's second process takes {tm['reader_connect_ms']:.0f} ms to connect: session and arena "
              f"mapping; not in the get figures)")
    print(f"node to node: Tessera: {tess.get('node_to_node', 'n/a')}; Ray: {ray_res.get('node_to_node', 'n/a')}")
    print(f"remote driver: Tessera: {tess.get('remote_driver', 'n/a')}; Ray: {ray_res.get('remote_driver', 'n/a')}")
    result = {
        "benchmark": "object_store",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "host": info,
        "plan": asdict(plan),
        "rows": rows,
        "aims": goals,
        "tessera": tess,
        "ray": ray_res,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}); the clusters were stopped", file=sys.stderr)
        sys.exit(130)
