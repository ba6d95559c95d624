"""The template of a node's workers: imports what a worker needs once, then forks each worker from itself.

A worker started as a fresh interpreter pays for its imports (the SDK, gRPC,
numpy, cloudpickle, OpenTelemetry) in CPU time and in memory of its own. Forked
from this process, it starts in milliseconds and shares those pages with the
template and the other workers until it writes to them.

Started by the node agent as ``python -m tessera.task_scheduler.zygote`` with the
environment of its workers. The agent writes one JSON object a line on stdin,
``{"id": n, "env": {...}}``: fork a worker with those environment variables
added. The template answers on stdout ``pid <id> <pid>`` once forked and
``exit <pid> <code>`` when a worker ended (``code`` as ``Popen.returncode``:
negative for a signal). It stays single-threaded, so forking is safe; it exits
when its stdin closes (the agent is gone), leaving the workers to end when their
connection to the agent closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import select
import signal
import sys
import traceback
from typing import Any


def _child(req: dict[str, Any], close: list[int], run: Any) -> None:  # pragma: no cover - runs in the child
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.update({str(k): str(v) for k, v in req["env"].items()})
        random.seed()  # not the template's sequence
        run()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(run: Any) -> None:
    """Fork ``run`` for each request on stdin until stdin closes."""
    reply = os.dup(1)  # answers to the agent; this process's own output (and its workers') goes to the log
    os.dup2(2, 1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when workers end
    children: set[int] = set()
    pending = b""

    def answer(line: str) -> None:
        os.write(reply, (line + "\n").encode())

    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            answer(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
        if 0 not in ready:
            continue
        data = os.read(0, 1 << 16)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, [reply, wake_r, wake_w], run)
            children.add(pid)
            answer(f"pid {int(req['id'])} {pid}")


# ---------------------------------------------------------------------- the agent's side

log = logging.getLogger(__name__)


class ForkedProcess:
    """A worker forked by the template, with the part of ``asyncio.subprocess.Process`` the agent uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = asyncio.Event()

    def _signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._done.set()


class Zygote:
    """The agent's handle on its template process."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._next = 0
        self._forking: dict[int, asyncio.Future[ForkedProcess]] = {}
        self._live: dict[int, ForkedProcess] = {}
        self._reader: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self._reader is not None \
            and not self._reader.done()

    async def start(self, env: dict[str, str], command: list[str] | None = None) -> None:
        """Start the template unless it was started (a template that died is not started again).

        ``command`` runs :func:`serve` (default: this module, whose workers run ``worker.main``).
        """
        async with self._starting:
            if self.proc is not None:
                return
            self.proc = await asyncio.create_subprocess_exec(
                *(command or [sys.executable, "-m", "tessera.task_scheduler.zygote"]), env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            self._reader = asyncio.create_task(self._read(), name="zygote-reader")

    async def fork(self, env: dict[str, str], timeout: float = 30.0) -> ForkedProcess:
        """A new worker with ``env`` added to the template's environment; OSError if the template is gone."""
        if not self.alive or self.proc is None or self.proc.stdin is None:
            raise OSError("the worker template is not running")
        self._next += 1
        n = self._next
        fut: asyncio.Future[ForkedProcess] = asyncio.get_running_loop().create_future()
        self._forking[n] = fut
        try:
            self.proc.stdin.write(json.dumps({"id": n, "env": env}).encode() + b"\n")
            await self.proc.stdin.drain()
            return await asyncio.wait_for(fut, timeout)
        except (ConnectionError, TimeoutError) as e:
            raise OSError(f"the worker template did not fork: {e!r}") from None
        finally:
            self._forking.pop(n, None)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                kind, a, b = line.decode().split()
                if kind == "pid":
                    p = self._live[int(b)] = ForkedProcess(int(b))
                    fut = self._forking.get(int(a))
                    if fut is not None and not fut.done():
                        fut.set_result(p)
                elif kind == "exit" and (gone := self._live.pop(int(a), None)) is not None:
                    gone.exited(int(b))
        except Exception:
            log.exception("reading the worker template")
        finally:  # the template is gone: its workers can no longer be watched, so they end
            for fut in self._forking.values():
                if not fut.done():
                    fut.set_exception(OSError("the worker template exited"))
            for p in list(self._live.values()):
                p.kill()
                p.exited(-signal.SIGKILL)
            self._live.clear()

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 3.0)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


def main() -> None:
    from tessera.task_scheduler import worker  # every import a worker makes, made once here

    serve(worker.main)


if __name__ == "__main__":
    main()
