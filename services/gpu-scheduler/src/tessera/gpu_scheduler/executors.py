"""How a node agent runs a job: a local process, or a Docker container. One interface for both.

An :class:`Execution` is a running job seen from its agent: instructions go in one line
at a time (:meth:`Execution.send`: ``suspend``, ``resume``, ``stop``, ``checkpoint``, ...),
JSON report lines come out of :attr:`Execution.report_fd`, and it ends with an exit code.

- :func:`spawn_process`: ``python -m tessera.gpu._runner`` with instructions on stdin and
  reports on an inherited pipe (``TESSERA_GPU_REPORT_FD``).
- :class:`DockerExecutor`: the job's image and command through the Docker SDK. Instructions
  and reports go through two named pipes in a per-job folder bind-mounted at the same path
  (``TESSERA_GPU_CTL_PATH``, ``TESSERA_GPU_REPORT_PATH``), as does the node-local checkpoint
  folder; the container shares the host's network, so the in-job SDK reaches the cluster at
  ``TESSERA_ADDRESS``. GPUs found by NVML are passed as a device request of the job's slots.

Domain code: no grpc, no nats.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

#: variables of the agent's own environment a container job gets (the rest stays on the host)
CONTAINER_ENV_PREFIXES = ("TESSERA_", "OTEL_", "TRACEPARENT", "TRACESTATE")


class Execution(ABC):
    """One running job, whatever runs it."""

    report_fd: int  # readable end of the job's report lines
    ident: str  # pid or container id, for the logs

    @abstractmethod
    def send(self, line: str) -> None:
        """Write one instruction line to the job."""

    @abstractmethod
    async def wait(self) -> int:
        """Wait for the job to end; its exit code."""

    @abstractmethod
    def terminate(self) -> None:
        """Ask the job to end now (SIGTERM)."""

    @abstractmethod
    def kill(self) -> None:
        """End the job (SIGKILL)."""

    @property
    @abstractmethod
    def returncode(self) -> int | None:
        """The exit code, or None while it runs."""


class ProcessExecution(Execution):
    def __init__(self, proc: asyncio.subprocess.Process, report_fd: int) -> None:
        self.proc = proc
        self.report_fd = report_fd
        self.ident = f"pid {proc.pid}"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.rstrip("\n").encode() + b"\n")

    async def wait(self) -> int:
        return await self.proc.wait()

    def terminate(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


async def spawn_process(env: dict[str, str], log_path: Path) -> ProcessExecution:
    """The local-process executor: a job runner with instructions on stdin and reports on a pipe."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    try:
        with open(log_path, "ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tessera.gpu._runner", stdin=asyncio.subprocess.PIPE, stdout=logf,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(w,),
                env={**env, "TESSERA_GPU_REPORT_FD": str(w), "TESSERA_GPU_AGENT_PID": str(os.getpid())})
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return ProcessExecution(proc, r)


def docker_unavailable() -> str | None:
    """Why container jobs cannot run on this host (None: a Docker engine answers)."""
    try:
        import docker
    except ImportError:
        return "container jobs need the docker SDK (pip install docker) and a Docker engine"
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:
        return f"no Docker engine reachable: {e}"
    return None


class ContainerExecution(Execution):
    def __init__(self, container: Any, job_dir: Path, ctl_fd: int, report_fd: int, hold_fd: int, log_path: Path) -> None:
        self.container = container
        self.job_dir = job_dir
        self.ident = f"container {str(container.id)[:12]}"
        self.report_fd = report_fd
        self._ctl_fd = ctl_fd
        self._hold_fd = hold_fd  # our own writer on the report pipe: no end-of-file before the container ends
        self._rc: int | None = None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._logs = threading.Thread(target=self._copy_logs, args=(log_path,), name=f"logs-{self.ident}", daemon=True)
        self._logs.start()

    def _copy_logs(self, log_path: Path) -> None:
        try:
            with open(log_path, "ab") as f:
                for chunk in self.container.logs(stream=True, follow=True):
                    f.write(chunk)
                    f.flush()
        except Exception:  # the container is gone: nothing more to copy
            return

    def send(self, line: str) -> None:
        if self._ctl_fd < 0:
            raise ProcessLookupError(f"{self.ident} has ended")
        os.write(self._ctl_fd, line.rstrip("\n").encode() + b"\n")

    async def wait(self) -> int:
        res = await asyncio.to_thread(self.container.wait)
        self._rc = int(res.get("StatusCode", 1)) if isinstance(res, dict) else int(res)
        await asyncio.to_thread(self._logs.join, 5.0)  # the last lines of its output
        for fd in (self._ctl_fd, self._hold_fd):
            if fd >= 0:
                os.close(fd)
        self._ctl_fd = self._hold_fd = -1
        try:
            await asyncio.to_thread(self.container.remove, force=True)
        except Exception:
            pass
        shutil.rmtree(self.job_dir, ignore_errors=True)
        return self._rc

    def _signal(self, sig: str) -> None:
        if self._rc is not None:
            return

        def send() -> None:
            try:
                self.container.kill(signal=sig)
            except Exception:  # already gone
                pass

        threading.Thread(target=send, daemon=True).start()

    def terminate(self) -> None:
        self._signal("SIGTERM")

    def kill(self) -> None:
        self._signal("SIGKILL")

    @property
    def returncode(self) -> int | None:
        return self._rc


class DockerExecutor:
    """Runs container jobs through a Docker engine (``docker.from_env()``)."""

    def __init__(self, client: Any | None = None) -> None:
        if client is None:
            import docker

            client = docker.from_env(timeout=30)
        self.client = client

    async def launch(self, job_id: str, image: str, command: list[str], env: dict[str, str], *, slots: list[int],
                     real_gpus: bool, work_dir: Path, mounts: list[Path], log_path: Path) -> ContainerExecution:
        """Start ``image`` (with ``command``, else its own) for job ``job_id``; ``mounts`` are bind-mounted as they are."""
        job_dir = work_dir / "jobs" / job_id
        shutil.rmtree(job_dir, ignore_errors=True)
        job_dir.mkdir(parents=True)
        ctl, report = job_dir / "ctl", job_dir / "report"
        os.mkfifo(ctl, 0o600)
        os.mkfifo(report, 0o600)
        fds: list[int] = []
        try:
            fds.append(os.open(ctl, os.O_RDWR | os.O_NONBLOCK))  # opened read-write: never blocks, keeps the pipe open
            fds.append(os.open(report, os.O_RDONLY | os.O_NONBLOCK))
            fds.append(os.open(report, os.O_WRONLY | os.O_NONBLOCK))
            cenv = {k: v for k, v in env.items() if k.startswith(CONTAINER_ENV_PREFIXES)}
            cenv.update(TESSERA_GPU_CTL_PATH=str(ctl), TESSERA_GPU_REPORT_PATH=str(report))
            cenv.pop("TESSERA_GPU_AGENT_PID", None)
            cenv.pop("TESSERA_GPU_REPORT_FD", None)
            kwargs: dict[str, Any] = {}
            if real_gpus:
                from docker.types import DeviceRequest

                kwargs["device_requests"] = [DeviceRequest(device_ids=[str(s) for s in slots], capabilities=[["gpu"]])]
            volumes = {str(p): {"bind": str(p), "mode": "rw"} for p in {job_dir, *mounts}}
            container = await asyncio.to_thread(
                self.client.containers.run, image, command or None, detach=True, environment=cenv, volumes=volumes,
                network_mode="host", user=f"{os.getuid()}:{os.getgid()}", name=f"tessera-gpu-{job_id}",
                labels={"tessera.gpu.job_id": job_id}, **kwargs)
        except BaseException:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        return ContainerExecution(container, job_dir, fds[0], fds[1], fds[2], log_path)

    def close(self) -> None:
        self.client.close()
