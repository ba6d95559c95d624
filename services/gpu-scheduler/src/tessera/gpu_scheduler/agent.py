"""The node agent: runs this node's GPU jobs as processes and reports on them.

Domain code (no grpc, no nats): the wiring (:mod:`server`) hands it commands that
came over NATS and publishes :meth:`NodeAgent.snapshot` to the control store. A job
process gets its instructions on stdin and reports JSON lines on a pipe (see
:mod:`tessera.gpu._job`). Checkpoints a job writes to the node-local folder are
copied into the object store (``upload``), so that another node can restore them
(``fetch``); their object ids travel in the snapshot, never their bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from tessera.common.telemetry import ENV_TRACEPARENT, ENV_TRACESTATE, traceparent_env
from tessera.gpu_scheduler.executors import DockerExecutor, Execution, docker_unavailable, spawn_process

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # tessera.gpu._job.EXIT_STOPPED
JOB_SERVICE_NAME = "gpu-job"  # the service.name of a job's spans
TRANSFER_TIMEOUT_S = 120.0  # the most a checkpoint's upload or fetch may take

Upload = Callable[[Path], Awaitable[bytes]]
Fetch = Callable[[bytes, Path], Awaitable[None]]
Package = Callable[[str], Awaitable[Path]]  # a job's working_dir uri -> the folder it is unpacked in


@dataclass
class GpuInfo:
    count: int
    kind: str  # nvml | virtual
    names: list[str] = field(default_factory=list)


def _name(raw: object) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)  # older NVML bindings give bytes


def discover_gpus(virtual: int) -> GpuInfo:
    """The node's GPUs through NVML (the optional ``nvidia-ml-py``) when there are any, else ``virtual`` slots.

    No library, no driver, or no device: ``virtual`` slots, and the reason is logged.
    """
    try:
        import pynvml
    except ImportError:
        log.info("no NVML bindings (pip install nvidia-ml-py): %d virtual GPU slot(s)", virtual)
        return GpuInfo(virtual, "virtual", [f"virtual-{i}" for i in range(virtual)])
    try:
        pynvml.nvmlInit()
        try:
            n = int(pynvml.nvmlDeviceGetCount())
            names = [_name(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(n)]
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # e.g. NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded
        log.info("NVML unusable (%s): %d virtual GPU slot(s)", e, virtual)
        return GpuInfo(virtual, "virtual", [f"virtual-{i}" for i in range(virtual)])
    if n:
        return GpuInfo(n, "nvml", names)
    log.info("NVML finds no GPU: %d virtual GPU slot(s)", virtual)
    return GpuInfo(virtual, "virtual", [f"virtual-{i}" for i in range(virtual)])


@dataclass
class _Proc:
    job_id: str
    slots: list[int]
    run: Execution | None = None
    state: str = "starting"  # starting | waiting (for its checkpoint) | running | suspended | exited
    rc: int | None = None
    step: int = 0
    minibatch_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    ckpt_oid: str = ""
    ckpt_step: int = 0
    ckpt_path: str = ""
    suspend_s: float = 0.0
    resume_s: float = 0.0
    message: str = ""
    progressed: bool = False  # a mini-batch done since this process started
    uploading: bool = False  # a checkpoint's upload is under way
    started: float = field(default_factory=time.time)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)  # its report reader and exit waiter
    side: list[asyncio.Task[Any]] = field(default_factory=list)  # a checkpoint handed over, a kill's escalation

    def view(self) -> dict[str, Any]:
        return {"state": self.state, "rc": self.rc, "step": self.step, "minibatch_s": self.minibatch_s,
                "metrics": self.metrics, "ckpt_oid": self.ckpt_oid, "ckpt_step": self.ckpt_step, "slots": self.slots,
                "suspend_s": self.suspend_s, "resume_s": self.resume_s, "message": self.message}


@dataclass
class _Warm:
    run: Execution
    log_path: Path


class NodeAgent:
    def __init__(self, node_id: str, gpus: GpuInfo, *, work_dir: Path, upload: Upload | None = None,
                 fetch: Fetch | None = None, control_store_address: str = "", prewarm: bool = False,
                 log_dir: Path | None = None, package: Package | None = None) -> None:
        self.node_id = node_id
        self.package = package
        self.gpus = gpus
        self.incarnation = uuid.uuid4().hex[:12]
        # set when a job's state changes in a way the scheduler waits for (an exit, a suspension, an uploaded
        # checkpoint): the report goes out at once instead of at the next beat
        self.changed = asyncio.Event()
        self.work_dir = work_dir
        self.ckpt_dir = work_dir / "ckpt"
        self.log_dir = log_dir or work_dir / "logs"
        self.prewarm = prewarm
        self._warm: _Warm | None = None
        self._warming: asyncio.Task[None] | None = None
        self._docker: DockerExecutor | None = None
        self.upload = upload
        self.fetch = fetch
        self.control_store_address = control_store_address
        self.jobs: dict[str, _Proc] = {}
        self.seq = 0

    def snapshot(self) -> dict[str, Any]:
        self.seq += 1
        now = time.time()
        for jid in [j for j, p in self.jobs.items() if p.state == "exited" and now - p.started > 300]:
            del self.jobs[jid]
        return {"node_id": self.node_id, "gpus": self.gpus.count, "kind": self.gpus.kind, "names": self.gpus.names,
                "incarnation": self.incarnation, "seq": self.seq, "jobs": {j: p.view() for j, p in self.jobs.items()}}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        job_id = str(cmd.get("job_id", ""))
        if op == "start":
            await self.start(job_id, cmd.get("spec", {}), list(cmd.get("slots", [])), str(cmd.get("checkpoint_oid", "")),
                             await_checkpoint=bool(cmd.get("await_checkpoint")))
        elif op == "restore":
            self.restore(job_id, str(cmd.get("checkpoint_oid", "")))
        elif op in ("suspend", "resume", "stop", "checkpoint"):
            self.instruct(job_id, op)
            self._mark(job_id, op)
            log.info("job %s: %s", job_id, op)
        elif op == "resize":
            self.resize(job_id, list(cmd.get("slots", [])))
        elif op == "kill":
            await self.kill(job_id)
        elif op == "forget":
            self.forget(job_id)
        else:
            raise InvalidArgumentError(f"unknown agent op {op!r}")
        return {"ok": True, "incarnation": self.incarnation}

    async def start(self, job_id: str, spec: dict[str, Any], slots: list[int], checkpoint_oid: str, *,
                    await_checkpoint: bool = False) -> None:
        """Start ``job_id`` on ``slots``, restored from ``checkpoint_oid`` if given.

        ``await_checkpoint`` (a migration's target, started while the source still runs): the job process
        starts now, builds its model and waits in ``job.restore()`` until :meth:`restore` hands it the
        checkpoint the source is about to write, so that its start-up overlaps the source's checkpoint.
        """
        self._mark(job_id, "start")
        old = self.jobs.get(job_id)
        if old is not None and old.state != "exited":
            raise FailedPreconditionError(f"job {job_id} already runs on node {self.node_id[:8]}")
        if any(s < 0 or s >= self.gpus.count for s in slots):
            raise InvalidArgumentError(f"slots {slots} outside this node's {self.gpus.count} GPUs")
        p = _Proc(job_id, slots)
        self.jobs[job_id] = p
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({k: str(v) for k, v in (spec.get("env") or {}).items()})
        env.update(TESSERA_GPU_JOB_ID=job_id, TESSERA_GPU_CKPT_DIR=str(self.ckpt_dir),
                   TESSERA_GPU_SLOTS=",".join(map(str, slots)), TESSERA_GPU_NODE_ID=self.node_id,
                   TESSERA_GPU_ENTRY=str(spec.get("entry_point", "")), TESSERA_GPU_ARGS=json.dumps(list(spec.get("args", []))))
        if self.control_store_address:
            env["TESSERA_ADDRESS"] = self.control_store_address
        # the job continues the trace of the command that starts it, under its own service name
        env.pop(ENV_TRACEPARENT, None)
        env.pop(ENV_TRACESTATE, None)
        env.update(traceparent_env())
        env["OTEL_SERVICE_NAME"] = str((spec.get("env") or {}).get("OTEL_SERVICE_NAME") or JOB_SERVICE_NAME)
        if self.gpus.kind == "nvml":
            # an elastic job sees every GPU of its node and uses those of its slots (they change as it grows/shrinks)
            visible = range(self.gpus.count) if spec.get("elastic") else slots
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, visible))
        env.pop("TESSERA_GPU_RESTORE", None)
        env.pop("TESSERA_GPU_AWAIT_RESTORE", None)
        if await_checkpoint:
            env["TESSERA_GPU_AWAIT_RESTORE"] = "1"
        try:
            if spec.get("working_dir"):  # the entry point's folder, from the submitting machine
                if self.package is None:
                    raise FailedPreconditionError("this node cannot fetch a job's working_dir")
                folder = await asyncio.wait_for(self.package(str(spec["working_dir"])), TRANSFER_TIMEOUT_S)
                mod, _, fn = str(spec.get("entry_point", "")).rpartition(":")
                env["TESSERA_GPU_ENTRY"] = f"{folder / mod}:{fn}"
            if checkpoint_oid:
                if self.fetch is None:
                    raise FailedPreconditionError("this node has no object store to fetch checkpoints from")
                path = self.ckpt_dir / f"{job_id}-restore.ckpt"
                t0 = time.perf_counter()
                await asyncio.wait_for(self.fetch(bytes.fromhex(checkpoint_oid), path), TRANSFER_TIMEOUT_S)
                log.info("job %s: checkpoint %s fetched in %.3fs", job_id, checkpoint_oid[:12], time.perf_counter() - t0)
                self._mark(job_id, "fetched")
                env["TESSERA_GPU_RESTORE"] = str(path)
                p.ckpt_oid = checkpoint_oid
            if spec.get("image"):
                p.run = await self._container(job_id, spec, env, slots)
            else:
                warm, self._warm = self._warm, None
                if warm is not None and warm.run.returncode is None:
                    # a runner that already imported torch: hand it the job's environment
                    delta = {k: v for k, v in env.items() if os.environ.get(k) != v}
                    warm.run.send(json.dumps({"env": delta}))
                    warm.log_path.rename(self.log_dir / f"{job_id}.log")
                    p.run = warm.run
                    log.info("job %s handed to a ready runner", job_id)
                else:
                    p.run = await spawn_process(env, self.log_dir / f"{job_id}.log")
                self._schedule_prewarm()
        except Exception as e:
            p.state, p.rc, p.message = "exited", 1, f"could not start: {e}"
            log.warning("job %s could not start: %s", job_id, e)
            return
        self._mark(job_id, "process")
        p.state = "waiting" if await_checkpoint else "running"
        p.tasks = [asyncio.create_task(self._read_reports(p, p.run.report_fd)), asyncio.create_task(self._wait(p))]
        log.info("job %s started on slots %s (%s)", job_id, slots, p.run.ident)

    async def _container(self, job_id: str, spec: dict[str, Any], env: dict[str, str], slots: list[int]) -> Execution:
        """The Docker executor: the job's image and command, where a Docker engine answers."""
        docker = self._docker
        if docker is None:
            why = await asyncio.to_thread(docker_unavailable)
            if why is not None:
                raise FailedPreconditionError(why)
            docker = self._docker = await asyncio.to_thread(DockerExecutor)
        assert docker is not None
        return await docker.launch(job_id, str(spec["image"]), [str(a) for a in spec.get("args", [])], env,
                                         slots=slots, real_gpus=self.gpus.kind == "nvml", work_dir=self.work_dir,
                                         mounts=[self.ckpt_dir], log_path=self.log_dir / f"{job_id}.log")

    def restore(self, job_id: str, checkpoint_oid: str) -> None:
        """Hand a job started with ``await_checkpoint`` its checkpoint (``""``: none, it starts from scratch).

        The fetch runs in the background (the command is answered at once); a job whose checkpoint cannot be
        fetched is ended, with the reason as its message.
        """
        p = self.jobs.get(job_id)
        if p is None or p.run is None or p.state == "exited":
            raise NotFoundError(f"job {job_id} does not run on node {self.node_id[:8]}")
        if p.state != "waiting":
            raise FailedPreconditionError(f"job {job_id} is {p.state}, not waiting for a checkpoint")
        if checkpoint_oid and self.fetch is None:
            raise FailedPreconditionError("this node has no object store to fetch checkpoints from")
        p.state = "running"
        p.side.append(asyncio.create_task(self._hand_checkpoint(p, checkpoint_oid)))

    async def _hand_checkpoint(self, p: _Proc, checkpoint_oid: str) -> None:
        assert p.run is not None
        path = ""
        if checkpoint_oid:
            assert self.fetch is not None
            dest = self.ckpt_dir / f"{p.job_id}-restore.ckpt"
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(self.fetch(bytes.fromhex(checkpoint_oid), dest), TRANSFER_TIMEOUT_S)
            except Exception as e:
                p.message = f"could not fetch checkpoint {checkpoint_oid[:12]}: {e or type(e).__name__}"
                log.warning("job %s: %s", p.job_id, p.message)
                p.run.terminate()
                return
            log.info("job %s: checkpoint %s fetched in %.3fs", p.job_id, checkpoint_oid[:12], time.perf_counter() - t0)
            self._mark(p.job_id, "fetched")
            path, p.ckpt_oid = str(dest), checkpoint_oid
        if p.run.returncode is None:
            p.run.send(f"restore {path}".rstrip())

    def _mark(self, job_id: str, event: str, t: float | None = None) -> None:
        """One timestamp of a job's start or stop (the benchmark's breakdown of a migration reads them)."""
        log.info("job %s timeline %s %.6f", job_id, event, time.time() if t is None else t)

    def _schedule_prewarm(self) -> None:
        if self.prewarm and self._warm is None and (self._warming is None or self._warming.done()):
            self._warming = asyncio.create_task(self._prewarm())

    async def _prewarm(self, delay: float = 1.0, settle_s: float = 30.0) -> None:
        """Keep one runner ready: after ``delay``, and once every job started here did its first mini-batch
        (at most ``settle_s``), so that importing torch does not slow a job's restore and first steps."""
        await asyncio.sleep(delay)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and any(
                not p.progressed and p.state in ("starting", "running") for p in self.jobs.values()):
            await asyncio.sleep(0.2)
        if self._warm is not None:
            return
        path = self.log_dir / f"warm-{uuid.uuid4().hex[:8]}.log"
        self._warm = _Warm(await spawn_process({**os.environ, "TESSERA_GPU_WARM": "1"}, path), path)

    def start_prewarm(self) -> None:
        """Start the first ready runner (called once the agent is up)."""
        self._schedule_prewarm()

    async def _read_reports(self, p: _Proc, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
        try:
            while line := await reader.readline():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                await self._on_report(p, ev)
        finally:
            transport.close()

    async def _on_report(self, p: _Proc, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        t = float(ev.get("t", 0.0)) or None
        if kind in ("progress", "checkpoint", "finished"):
            if not p.progressed:
                self._mark(p.job_id, "first_step", t)
            p.progressed = True
        if kind == "waiting":
            self._mark(p.job_id, "waiting", t)
        p.step = int(ev.get("step", p.step))
        if "minibatch_s" in ev:
            p.minibatch_s = float(ev["minibatch_s"])
        if ev.get("metrics"):
            p.metrics = {k: float(v) for k, v in ev["metrics"].items()}
        if kind == "restored":
            log.info("job %s restored from its checkpoint in %.3fs", p.job_id, float(ev.get("load_s", 0.0)))
            if t is not None:
                self._mark(p.job_id, "restore_begin", t - float(ev.get("load_s", 0.0)))
                self._mark(p.job_id, "restored", t)
        if kind == "resized":
            p.slots = [int(s) for s in ev.get("slots", p.slots)]
            log.info("job %s now on slots %s", p.job_id, p.slots)
        if kind == "resumed":
            p.state = "running"
            p.resume_s = float(ev.get("load_s", 0.0))
        if kind == "suspended":  # its GPUs are free now; the checkpoint's upload follows (ckpt_step tells when)
            p.state = "suspended"
            self.changed.set()
            p.suspend_s = float(ev.get("save_s", 0.0))
            if t is not None:
                self._mark(p.job_id, "checkpoint_begin", t - p.suspend_s)
                self._mark(p.job_id, "checkpointed", t)
        if kind in ("suspended", "checkpoint") and ev.get("path"):
            p.ckpt_path = str(ev["path"])
            if self.upload is not None:
                p.uploading = True
                try:
                    t0 = time.perf_counter()
                    oid = await asyncio.wait_for(self.upload(Path(ev["path"])), TRANSFER_TIMEOUT_S)
                    log.info("job %s: %s checkpoint of step %s uploaded in %.3fs", p.job_id, kind, ev.get("step"),
                             time.perf_counter() - t0)
                    p.ckpt_oid, p.ckpt_step = oid.hex(), int(ev.get("step", 0))
                    self.changed.set()
                    if kind == "suspended":
                        self._mark(p.job_id, "uploaded")
                except Exception as e:  # the job goes on; its previous checkpoint stands
                    log.warning("job %s: checkpoint upload failed: %s", p.job_id, e or type(e).__name__)
                finally:
                    p.uploading = False

    async def _wait(self, p: _Proc) -> None:
        assert p.run is not None
        rc = await p.run.wait()
        # the exit counts once its last reports are in, and the upload of the checkpoint a stopped job wrote
        # has landed (or failed): the scheduler restarts a stopped job from the checkpoint its exit reports
        for t in p.tasks:
            deadline = time.monotonic() + 2.0  # a child of the job holding the report pipe: no end-of-file
            while t is not asyncio.current_task() and not t.done():
                try:
                    await asyncio.wait_for(asyncio.shield(t), 0.1)
                except TimeoutError:
                    if time.monotonic() > deadline and not p.uploading:
                        t.cancel()
                except asyncio.CancelledError:
                    break
        for t in p.side:
            t.cancel()
        p.rc, p.state = rc, "exited"
        self.changed.set()
        self._mark(p.job_id, "exited")
        log.info("job %s exited with %d", p.job_id, rc)

    def instruct(self, job_id: str, word: str) -> None:
        p = self.jobs.get(job_id)
        if p is None or p.run is None or p.state == "exited":
            raise NotFoundError(f"job {job_id} does not run on node {self.node_id[:8]}")
        p.run.send(word)

    def resize(self, job_id: str, slots: list[int]) -> None:
        """Grow or shrink a running job to ``slots`` of this node; it takes them at its next mini-batch boundary."""
        if not slots or any(not isinstance(s, int) or s < 0 or s >= self.gpus.count for s in slots) \
                or len(set(slots)) != len(slots):
            raise InvalidArgumentError(f"slots {slots} are not distinct GPUs of this node's {self.gpus.count}")
        self.instruct(job_id, "resize " + ",".join(map(str, slots)))
        log.info("job %s: resize to slots %s", job_id, slots)

    async def kill(self, job_id: str, grace_s: float = 10.0) -> None:
        """End a job: SIGTERM, and SIGKILL if it is still there after ``grace_s`` (its GPUs count as taken
        until its process has exited)."""
        p = self.jobs.get(job_id)
        if p is None or p.run is None or p.run.returncode is not None:
            return
        p.run.terminate()
        run = p.run

        async def escalate() -> None:
            await asyncio.sleep(grace_s)
            if run.returncode is None:
                log.warning("job %s did not end within %gs of SIGTERM: killed", job_id, grace_s)
                run.kill()

        p.side.append(asyncio.create_task(escalate()))

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        for f in self.ckpt_dir.glob(f"{job_id}-*.ckpt"):
            f.unlink(missing_ok=True)

    async def close(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
        runs = [p.run for p in self.jobs.values() if p.run is not None and p.run.returncode is None]
        if self._warm is not None:
            runs.append(self._warm.run)
            os.close(self._warm.run.report_fd)
            self._warm.log_path.unlink(missing_ok=True)
        for run in runs:
            run.terminate()
        for run in runs:
            try:
                await asyncio.wait_for(run.wait(), 5.0)
            except TimeoutError:
                run.kill()
        if self._docker is not None:
            self._docker.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)  # node-local checkpoints: copies live in the object store

