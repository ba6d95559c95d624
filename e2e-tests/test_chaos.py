"""Chaos: kill -9 each process of a loaded two-node cluster in turn and lose nothing.

One cluster (`tessera up --nodes 2 --gpus-per-node 1`) carries steady load from
background threads of this process for the whole module: tasks (small results and
large ones written to a node's shared memory), actor calls, puts and gets of numpy
arrays, compile jobs, predictions and a GPU training job that checkpoints. Each test
kills one process with SIGKILL, waits for the launcher's supervisor to start it again,
then checks what the callers saw:

- every task submitted returns its own unique value, once (retries allowed);
- every object whose put returned, and every large task result, is readable afterwards
  (rebuilt by lineage where its node's store died);
- every compile job the compiler accepted ends READY;
- the GPU job's step never falls behind its last checkpoint, and its jobs succeed;
- predictions fail only inside the restart window, with UNAVAILABLE or DEADLINE_EXCEEDED,
  and no call outlives its deadline.

Per kill it records the restart time (kill -> the process answers again), the recovery
time of each kind of work (kill -> first success of a request started after the kill)
and the work lost, prints a table and writes a JSON report to TESSERA_CHAOS_REPORT (by
default chaos-report.json in pytest's temporary directory).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

import tessera
from tessera.exceptions import ActorDiedError

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(360)]

#: What is killed, in this order (an object store last: what services keep in one does not survive its
#: restart, see test_service_objects_survive_their_store_restart). ``worker``: a task worker of node 0's agent; ``gpu-agent``: the
#: gpu-scheduler node agent running the current GPU job. The global task scheduler runs inside each
#: node's task-scheduler process (TESSERA_TASK_SCHEDULER_ROLE=both), so killing those kills it too.
TARGETS = ["worker", "task-scheduler", "task-scheduler-1", "control-store", "compiler", "gpu-scheduler", "gpu-agent",
           "serving", "nats", "redis-0", "object-store-1"]
KINDS = ("task", "actor", "put", "compile", "predict", "gpu")
PREDICT_DEADLINE_S = 2.0
GPU_ENTRY = "tessera.gpu_scheduler.examples:train"
RECOVERY_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------- remote work


@tessera.remote
def ident(uid: int) -> int:
    time.sleep(0.02)
    return uid


@tessera.remote
def big(uid: int) -> np.ndarray:
    return np.full(40_000, uid, dtype=np.int64)  # 320 KB: written to the node's shared memory, not inline


@tessera.remote
class Echo:
    def echo(self, uid: int) -> int:
        return uid


# ---------------------------------------------------------------------- the load


@dataclass
class Op:
    kind: str
    start: float
    end: float = 0.0
    ok: bool | None = None  # None: still in flight
    error: str = ""
    clean: bool = True  # a failure the caller is told about cleanly (UNAVAILABLE, a documented error)
    lost: int = 0  # work the caller was promised and never got


@dataclass
class Load:
    stop: threading.Event = field(default_factory=threading.Event)
    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    uids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    puts: collections.deque[tuple[Any, int]] = field(default_factory=lambda: collections.deque(maxlen=60))
    bigs: collections.deque[tuple[Any, int]] = field(default_factory=lambda: collections.deque(maxlen=40))
    compile_ids: dict[str, str] = field(default_factory=dict)  # accepted artifact id -> final state ("" pending)
    gpu_steps: list[tuple[float, str, int, int, str]] = field(default_factory=list)  # t, job, step, checkpoint, state
    gpu_violations: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)

    def begin(self, kind: str) -> Op:
        op = Op(kind, time.monotonic())
        with self.lock:
            self.ops.append(op)
        return op

    def uid(self) -> int:
        with self.lock:
            return next(self.uids)

    def run(self, name: str, body: Callable[[], None], pause: float) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    body()
                except Exception as e:  # a bug in the load itself: reported by every test
                    self.crashes.append(f"{name}: {e!r}")
                self.stop.wait(pause)

        t = threading.Thread(target=loop, name=f"chaos-{name}", daemon=True)
        t.start()
        self.threads.append(t)


def _finish(op: Op, ok: bool, error: str = "", *, clean: bool = True, lost: int = 0) -> None:
    op.ok, op.error, op.clean, op.lost, op.end = ok, error, clean, lost, time.monotonic()


def _code(e: BaseException) -> str:
    return e.code().name if isinstance(e, grpc.RpcError) else type(e).__name__  # type: ignore[attr-defined]


def tasks_body(load: Load) -> None:
    op = load.begin("task")
    uids = [load.uid() for _ in range(12)]
    try:
        refs = [ident.remote(u) for u in uids]
        bu = load.uid()
        bref = big.remote(bu)
        values = tessera.get(refs, timeout=RECOVERY_TIMEOUT_S)
    except Exception as e:
        _finish(op, False, f"{type(e).__name__}: {e}", clean=False, lost=len(uids))
        return
    wrong = [(u, v) for u, v in zip(uids, values, strict=True) if u != v]
    if wrong or len(set(values)) != len(values):
        _finish(op, False, f"wrong results {wrong[:3]}", clean=False, lost=len(wrong))
        return
    load.bigs.append((bref, bu))
    _finish(op, True)


def actor_body(load: Load, holder: list[Any]) -> None:
    op = load.begin("actor")
    uids = [load.uid() for _ in range(5)]
    try:
        if not holder:
            holder.append(Echo.options(max_restarts=1000).remote())  # type: ignore[attr-defined]
        values = tessera.get([holder[0].echo.remote(u) for u in uids], timeout=RECOVERY_TIMEOUT_S)
    except ActorDiedError as e:
        # documented and clean: the call running when the actor's process died fails; and an actor whose
        # node agent restarted is dead (its process went with the agent): the caller makes a new one
        _finish(op, False, f"ActorDiedError: {e}")
        if "node agent restarted" in str(e):
            holder.clear()
        return
    except Exception as e:
        _finish(op, False, f"{type(e).__name__}: {e}", clean=False, lost=len(uids))
        return
    _finish(op, values == uids, "" if values == uids else f"wrong results {values} != {uids}", clean=values == uids,
            lost=0 if values == uids else len(uids))


def put_body(load: Load) -> None:
    op = load.begin("put")
    u = load.uid()
    try:
        ref = tessera.put(np.full(32_768, u, dtype=np.int64))  # 256 KB
    except Exception as e:  # the put did not return: nothing was promised
        _finish(op, False, f"put: {type(e).__name__}: {e}")
        return
    load.puts.append((ref, u))
    try:
        back = tessera.get(ref, timeout=30)
    except Exception as e:
        _finish(op, False, f"get after put: {type(e).__name__}: {e}", clean=False, lost=1)
        return
    _finish(op, bool(back[0] == u and back[-1] == u), "" if back[0] == u else "wrong bytes", clean=bool(back[0] == u))


def compile_body(load: Load, client: Any) -> None:
    from tessera.api.compiler.v1 import compiler_pb2 as cpb

    op = load.begin("compile")
    torch.manual_seed(load.uid())
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    try:
        info = client.compile(model, [x], wait=False, timeout=10.0)
    except grpc.RpcError as e:  # not accepted: the caller knows
        _finish(op, False, f"submit: {_code(e)}", clean=_code(e) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
        return
    aid = info.artifact_id
    load.compile_ids[aid] = ""
    deadline = time.monotonic() + 240
    state = info.state
    while state not in (cpb.ARTIFACT_STATE_READY, cpb.ARTIFACT_STATE_FAILED) and time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            state = client.artifact(aid, timeout=5.0).state
        except grpc.RpcError:
            continue  # the compiler or the control store is restarting
    name = cpb.ArtifactState.Name(state)
    load.compile_ids[aid] = name
    _finish(op, state == cpb.ARTIFACT_STATE_READY, "" if state == cpb.ARTIFACT_STATE_READY else f"job {aid[:12]} ended {name}",
            clean=state == cpb.ARTIFACT_STATE_READY, lost=0 if state == cpb.ARTIFACT_STATE_READY else 1)


def predict_body(load: Load, client: Any) -> None:
    op = load.begin("predict")
    try:
        preds = client.predict("chaos", ["great food, friendly staff"])
    except grpc.RpcError as e:
        code = _code(e)
        _finish(op, False, code, clean=code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
        return
    _finish(op, len(preds) == 1, "" if len(preds) == 1 else f"{len(preds)} predictions", clean=len(preds) == 1)


class GpuWatch:
    """Keeps one checkpointing training job running; each poll is an op (ok: the job advanced)."""

    def __init__(self, load: Load, client: Any) -> None:
        self.load, self.client = load, client
        self.job = ""
        self.last_step = -1
        self.checkpoint = 0
        self.seed = 0

    def submit(self) -> None:
        self.seed += 1
        self.job = self.client.submit(entry_point=GPU_ENTRY, args=["4000", str(self.seed), "", "0.03", "20"],
                                      name=f"chaos-{self.seed}")
        self.last_step, self.checkpoint = -1, 0

    def body(self) -> None:
        from tessera.gpu.client import job_to_dict

        if not self.job:
            try:
                self.submit()
            except grpc.RpcError:
                return
        op = self.load.begin("gpu")
        try:
            j = job_to_dict(self.client.status(self.job))
        except grpc.RpcError as e:
            _finish(op, False, _code(e), clean=_code(e) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
            return
        step, ckpt, state = int(j["step"]), int(j.get("checkpoint_step", 0)), str(j["state"])
        self.load.gpu_steps.append((op.start, self.job, step, ckpt, state))
        if step < self.checkpoint and state == "RUNNING":
            self.load.gpu_violations.append(f"job {self.job}: step {step} behind its checkpoint {self.checkpoint}")
        self.checkpoint = max(self.checkpoint, ckpt)
        advanced = step > self.last_step >= 0
        self.last_step = max(self.last_step, step)
        if state in ("SUCCEEDED", "FAILED", "KILLED"):
            _finish(op, state == "SUCCEEDED", "" if state == "SUCCEEDED" else f"job ended {state}: {j.get('message')}",
                    clean=state == "SUCCEEDED", lost=0 if state == "SUCCEEDED" else 1)
            self.job = ""
            return
        _finish(op, advanced, "" if advanced else f"{state} at step {step}")


# ---------------------------------------------------------------------- the stack


@dataclass
class Chaos:
    cluster: Any
    load: Load
    gpu: GpuWatch
    report: Path
    results: list[dict[str, Any]] = field(default_factory=list)


def _sentiment() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    docs = ["great food", "friendly staff", "awful service", "cold soup", "tasty and cheap", "rude and slow"]
    return make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(docs, ["pos", "pos", "neg", "neg", "pos", "neg"])


@pytest.fixture(scope="module")
def chaos(launch: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    from tessera.compiler.client import CompilerClient
    from tessera.gpu import GpuClient
    from tessera.serving import Client

    cluster = launch("chaos", "--nodes", "2", "--gpus-per-node", "1", timeout=180,
                     TESSERA_NUM_CPUS="2", TESSERA_OBJECT_STORE_MEMORY=str(96 * 2**20),
                     TESSERA_OBJECT_STORE_PREFAULT="false")
    env = cluster.point_here()
    tessera.init(name="chaos")
    load = Load()
    clients: list[Any] = []
    try:
        serving = Client(timeout=PREDICT_DEADLINE_S)
        compiler = CompilerClient(timeout=60.0)
        gpu_client = GpuClient(timeout=5.0)
        clients += [serving, compiler, gpu_client]
        with Client(timeout=60.0) as admin:  # the first upload may be slow on a loaded host: not the load's deadline
            admin.register("chaos", _sentiment())
        actor: list[Any] = []
        gpu = GpuWatch(load, gpu_client)
        load.run("tasks", lambda: tasks_body(load), 0.05)
        load.run("actor", lambda: actor_body(load, actor), 0.1)
        load.run("put", lambda: put_body(load), 0.1)
        load.run("compile", lambda: compile_body(load, compiler), 0.5)
        load.run("predict", lambda: predict_body(load, serving), 0.1)
        load.run("gpu", gpu.body, 0.5)
        report = Path(os.environ.get("TESSERA_CHAOS_REPORT") or tmp_path_factory.getbasetemp() / "chaos-report.json")
        state = Chaos(cluster, load, gpu, report)
        yield state
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(RECOVERY_TIMEOUT_S + 10)
        for c in clients:
            c.close()
        tessera.shutdown()
        env.undo()
        if "state" in locals():
            _report(state)


def _write(state: Chaos) -> Path:
    """The JSON report, rewritten after each kill (so a run cut short still leaves one)."""
    path = state.report
    path.write_text(json.dumps({"kills": state.results, "load_crashes": state.load.crashes,
                                "gpu_violations": state.load.gpu_violations,
                                "gpu_polls": state.load.gpu_steps[-400:]}, indent=2, default=str))
    return path


def _report(state: Chaos) -> None:
    path = _write(state)
    cols = ["target", "restart_s", *(f"{k}_s" for k in KINDS), "lost", "errors"]
    rows = [[r["target"], _fmt(r["restart_s"]), *(_fmt(r["recovery_s"].get(k)) for k in KINDS), str(sum(r["lost"].values())),
             str(sum(r["errors"].values()))] for r in state.results]
    width = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print(f"\nchaos: recovery after kill -9 (seconds from the kill; report {path})")
    print("  ".join(c.ljust(w) for c, w in zip(cols, width, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, width, strict=True)))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


# ---------------------------------------------------------------------- killing


def _kill(state: Chaos, target: str) -> tuple[str, int]:
    """SIGKILL ``target``; returns the supervised process's name (or "" for a worker) and the pid killed."""
    c = state.cluster
    if target == "worker":
        agent = psutil.Process(c.pid("task-scheduler"))
        # workers are forked from the agent's worker template (its children), or are its own children when
        # started as fresh interpreters; the template itself is not a worker
        workers = [w for w in agent.children(recursive=True) if w.is_running()
                   and (w.ppid() != agent.pid or "task_scheduler.worker" in " ".join(w.cmdline()))]
        assert workers, "node 0's agent has no worker processes"
        victim = max(workers, key=lambda w: sum(w.cpu_times()[:2]))  # a busy one
        victim.send_signal(signal.SIGKILL)
        return "", victim.pid
    if target == "gpu-agent":
        node = state.gpu.client.status(state.gpu.job).node_id if state.gpu.job else ""
        name = next((p["name"] for p in c.info()["procs"] if p["name"].startswith("gpu-agent") and p["node_id"] == node),
                    "gpu-agent-0")
        return name, c.kill(name)
    return target, c.kill(target)


def _wait_steady(load: Load, since: float, timeout: float) -> dict[str, float]:
    """Until each kind of work has had a request started after ``since`` succeed: kind -> seconds from ``since``."""
    deadline = time.monotonic() + timeout
    first: dict[str, float] = {}
    while time.monotonic() < deadline:
        with load.lock:
            ops = [o for o in load.ops if o.start >= since and o.ok]
        for o in ops:
            if o.kind not in first or o.end - since < first[o.kind]:
                first[o.kind] = o.end - since
        if all(k in first for k in KINDS):
            break
        time.sleep(0.25)
    return first


@pytest.mark.parametrize("target", TARGETS)
def test_kill(chaos: Chaos, target: str) -> None:
    load = chaos.load
    before = _wait_steady(load, time.monotonic() - 1, RECOVERY_TIMEOUT_S)
    assert set(before) == set(KINDS), f"the load is not steady before the kill: only {sorted(before)} succeed"
    crashes0, violations0 = len(load.crashes), len(load.gpu_violations)
    time.sleep(random.uniform(0.5, 1.5))  # land the kill somewhere in the middle of things
    t_kill = time.monotonic()
    name, pid = _kill(chaos, target)
    restart_s = chaos.cluster.wait_restarted(name, pid, timeout=90) - t_kill if name else None
    recovery = _wait_steady(load, t_kill, RECOVERY_TIMEOUT_S)
    # everything begun before the kill must be answered, one way or the other, within its deadline
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S + 30
    while time.monotonic() < deadline:
        with load.lock:
            inflight = [o for o in load.ops if o.ok is None and o.start < t_kill]
        if not inflight:
            break
        time.sleep(0.5)
    # every object whose put returned, every large task result: readable (rebuilt by lineage if need be)
    unreadable = []
    for ref, u in [*list(load.puts), *list(load.bigs)]:
        try:
            v = tessera.get(ref, timeout=60)
            if not (v[0] == u and v[-1] == u):
                unreadable.append(f"{u}: wrong bytes")
        except Exception as e:
            unreadable.append(f"{u}: {type(e).__name__}: {e}")
    with load.lock:
        window = [o for o in load.ops if o.start >= t_kill - 5 and o.ok is not None]
        inflight = [o for o in load.ops if o.ok is None and o.start < t_kill]
    lost = {k: sum(o.lost for o in window if o.kind == k) for k in KINDS}
    lost["object"] = len(unreadable)
    errors = {k: sum(1 for o in window if o.kind == k and o.ok is False and o.kind != "gpu") for k in KINDS}
    unclean = [f"{o.kind}: {o.error}" for o in window if o.ok is False and not o.clean]
    hangs = [f"predict took {o.end - o.start:.1f}s" for o in window
             if o.kind == "predict" and o.end - o.start > PREDICT_DEADLINE_S + 1.5]
    predict_back = t_kill + recovery.get("predict", RECOVERY_TIMEOUT_S)
    late = [f"predict failed {o.start - t_kill:.1f}s after the kill ({o.error})" for o in window
            if o.kind == "predict" and o.ok is False and o.start > predict_back + 2.0]
    result = {"target": target, "process": name or f"worker pid {pid}", "restart_s": restart_s, "recovery_s": recovery,
              "lost": lost, "errors": errors,
              "error_samples": {k: sorted({f"{o.start - t_kill:+.1f}s {o.error}"[:300] for o in window
                                           if o.kind == k and o.ok is False})[:4] for k in KINDS}, "unclean": unclean[:20], "hangs": hangs[:20], "late_errors": late[:20],
              "unreadable": unreadable[:20], "inflight": [asdict(o) for o in inflight[:5]],
              "gpu_violations": load.gpu_violations[violations0:], "load_crashes": load.crashes[crashes0:]}
    chaos.results.append(result)
    _write(chaos)
    assert not result["load_crashes"], result["load_crashes"]
    assert set(recovery) == set(KINDS), f"no success since the kill for: {sorted(set(KINDS) - set(recovery))}"
    assert not inflight, f"requests begun before the kill never ended: {inflight[:3]}"
    assert not unreadable, f"objects lost: {unreadable[:5]}"
    assert not unclean, f"failures: {unclean[:5]}"
    assert sum(lost.values()) == 0, lost
    assert not hangs, hangs
    assert not late, late
    assert not result["gpu_violations"], result["gpu_violations"]


def test_service_objects_survive_their_store_restart(chaos: Chaos) -> None:
    """Kill the object store holding serving's parameters, then serving: predictions must come back."""
    from tessera.api.control_store.v1 import control_store_pb2 as cpb
    from tessera.client import Client

    with Client() as c:
        oids = [c.kv_get("serving-params", k) for k in c.kv_list("serving-params")]
        assert oids, "serving stored no parameters"
        objs = c.stub.GetObjects(cpb.GetObjectsRequest(object_ids=oids), timeout=10.0).objects
    nodes = {n for o in objs for n in o.locations}
    stores = [p["name"] for p in chaos.cluster.info()["procs"]
              if p.get("service") == "object-store" and bytes.fromhex(p["node_id"]) in nodes]
    assert stores, f"no object store holds serving's parameters (nodes {[n.hex() for n in nodes]})"
    for name in [*stores, "serving"]:
        pid = chaos.cluster.kill(name)
        chaos.cluster.wait_restarted(name, pid, timeout=90)
    t0 = time.monotonic()
    back = _wait_steady(chaos.load, t0, 60.0)
    assert "predict" in back, "predictions did not come back after serving's object store and serving restarted"
