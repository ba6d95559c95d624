"""The training-loop hook: mini-batch boundaries, suspend/resume, checkpoints, metrics.

A job run by a gpu-scheduler node agent gets its instructions on standard input, or
in a container on the named pipe ``TESSERA_GPU_CTL_PATH`` (one a line: ``suspend``,
``resume``, ``stop``, ``checkpoint``, ``resize SLOTS``), and reports on the file
descriptor ``TESSERA_GPU_REPORT_FD``, or the named pipe ``TESSERA_GPU_REPORT_PATH``
(one JSON object a line). Instructions are
acted on only at a mini-batch boundary (:meth:`Job.step`), where the state is
consistent: on ``suspend`` the model, optimizer, step and RNG state are written to the
node-local checkpoint folder (a ramdisk), the GPU memory is freed, and the job waits;
on ``resume`` it restores from that checkpoint and goes on; on ``stop`` (a migration, or
a requeue) it exits with :data:`EXIT_STOPPED` and the agent hands the checkpoint on;
on ``resize 0,1,2,3`` (grow-shrink) :attr:`Job.slots` and :attr:`Job.gpus` change there,
and the training loop adapts (e.g. its data-parallel width) from the next mini-batch.

A migration's target starts before the source has stopped (``TESSERA_GPU_AWAIT_RESTORE=1``):
the job builds its model and optimizer, then waits in :meth:`Job.restore` (or, if it never
calls it, at its first boundary) for ``restore PATH`` (``restore`` alone: nothing to restore),
sent once the source's checkpoint is in the object store; ``stop`` there ends it.

Outside an agent the same code runs standalone: :meth:`Job.step` only counts.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.gpu import _ckpt

EXIT_STOPPED = 75  # the job stopped at a boundary after checkpointing (it will continue elsewhere)
REPORT_EVERY_S = 0.2


def _rng_state() -> dict[str, Any]:
    import torch

    st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        st["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    import torch

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"].clone())
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.clone() for t in st["cuda"]])


class Job:
    """The hook of one training job. Use :func:`tessera.gpu.init` to get it."""

    def __init__(self, *, model: Any = None, optimizer: Any = None, extra: dict[str, Any] | None = None,
                 checkpoint_every: int | None = None, env: dict[str, str] | None = None) -> None:
        e = os.environ if env is None else env
        self.job_id = e.get("TESSERA_GPU_JOB_ID", "")
        self.models = [m for m in (model if isinstance(model, list | tuple) else [model]) if m is not None]
        self.optimizers = [o for o in (optimizer if isinstance(optimizer, list | tuple) else [optimizer]) if o is not None]
        self.extra = extra if extra is not None else {}
        every = checkpoint_every if checkpoint_every is not None else int(e.get("TESSERA_GPU_CHECKPOINT_EVERY", "0") or 0)
        self.checkpoint_every = max(0, every)
        self.ckpt_dir = Path(e.get("TESSERA_GPU_CKPT_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "tessera-gpu")
        self.restore_path = e.get("TESSERA_GPU_RESTORE", "")
        self.slots = [s for s in e.get("TESSERA_GPU_SLOTS", "").split(",") if s]
        self.step_count = 0
        self.metrics: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._slot = 1
        self.suspend_s: list[float] = []  # checkpoint + free, per suspend
        self.resume_s: list[float] = []  # restore, per resume
        self._report_fd = int(e["TESSERA_GPU_REPORT_FD"]) if e.get("TESSERA_GPU_REPORT_FD") else -1
        if self._report_fd < 0 and e.get("TESSERA_GPU_REPORT_PATH"):
            self._report_fd = os.open(e["TESSERA_GPU_REPORT_PATH"], os.O_WRONLY)
        self._ctl_path = e.get("TESSERA_GPU_CTL_PATH", "")
        # a migration's target: the checkpoint to restore comes later, as an instruction
        self.awaiting_restore = e.get("TESSERA_GPU_AWAIT_RESTORE") == "1" and self._report_fd >= 0
        self.resizes = 0  # times the job's GPUs changed (grow-shrink)
        self._cmd = threading.Condition()
        self._pending: list[str] = []
        self._last_boundary = time.perf_counter()
        self._mb_ema = 0.0
        self._last_report = 0.0
        if self._report_fd >= 0:
            threading.Thread(target=self._read_commands, name="tessera-gpu-ctl", daemon=True).start()

    # ------------------------------------------------------------------ control channel
    @property
    def gpus(self) -> int:
        """GPUs the job holds now (it changes at a boundary when the scheduler grows or shrinks the job)."""
        return max(1, len(self.slots))

    def _read_commands(self) -> None:
        src = open(self._ctl_path) if self._ctl_path else sys.stdin  # noqa: SIM115
        for line in src:
            word = line.strip()
            if word:
                try:
                    self.command(word)
                except ValueError as e:
                    print(f"tessera.gpu: {e}", file=sys.stderr)
        self.command("stop")  # the agent went away: checkpoint and stop at the next boundary

    def command(self, word: str) -> None:
        """Queue an instruction (``suspend``, ``resume``, ``stop``, ``checkpoint``, ``resize 0,1``); acted on at
        the next boundary."""
        verb, _, arg = word.partition(" ")
        if verb not in ("suspend", "resume", "stop", "checkpoint", "resize", "restore"):
            raise ValueError(f"unknown instruction {word!r}")
        if verb == "resize" and not (arg and all(s.strip().isdigit() for s in arg.split(","))):
            raise ValueError(f"resize needs GPU slots, e.g. 'resize 0,1', got {word!r}")
        with self._cmd:
            self._pending.append(word)
            self._cmd.notify_all()

    def _take(self) -> str | None:
        with self._cmd:
            return self._pending.pop(0) if self._pending else None

    def _await_restore(self) -> None:
        """A migration's target, built and ready: wait for the checkpoint to restore (or a stop). Other
        instructions that come meanwhile stay queued for the boundaries that follow."""
        self.report("waiting")
        with self._cmd:
            while True:
                word = next((w for w in self._pending if w == "stop" or w.split(" ", 1)[0] == "restore"), None)
                if word is not None:
                    self._pending.remove(word)
                    break
                self._cmd.wait()
        self.awaiting_restore = False
        if word == "stop":  # the migration was called off before it handed over: nothing of this process to keep
            self.report("stopped", path="")
            self._exit(EXIT_STOPPED)
        self.restore_path = word.partition(" ")[2]

    def _wait(self) -> str:
        with self._cmd:
            while not self._pending:
                self._cmd.wait()
            return self._pending.pop(0)

    def report(self, event: str, **fields: Any) -> None:
        if self._report_fd < 0:
            return
        msg = {"event": event, "job_id": self.job_id, "step": self.step_count, "t": time.time(), **fields}
        data = (json.dumps(msg) + "\n").encode()
        try:
            os.write(self._report_fd, data)
        except OSError:
            self._report_fd = -1

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"step": self.step_count, "models": [m.state_dict() for m in self.models],
                "optimizers": [o.state_dict() for o in self.optimizers], "rng": _rng_state(),
                "extra": self.extra, "metrics": self.metrics}

    def load_state(self, st: dict[str, Any], *, tensors_in_place: bool = False) -> None:
        if not tensors_in_place:
            for m, s in zip(self.models, st["models"], strict=True):
                m.load_state_dict(s)
            for o, s in zip(self.optimizers, st["optimizers"], strict=True):
                o.load_state_dict(s)
        _set_rng_state(st["rng"])
        self.extra.clear()
        self.extra.update(st.get("extra", {}))
        self.metrics = dict(st.get("metrics", {}))
        self.step_count = int(st["step"])

    def checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the state at this boundary (default: the node-local checkpoint folder).

        The default files are two, used in turn (the last one stays whole while the next is
        written), each overwritten in place: no new ramdisk pages after the first two.
        """
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if path is None:
            self._slot ^= 1
            p = self.ckpt_dir / f"{self.job_id or 'job'}-{self._slot}.ckpt"
        else:
            p = Path(path)
        _ckpt.save(p, self.state(), in_place=path is None)
        self.last_checkpoint = p
        return p

    def restore(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (``path``, else the one the agent handed over); returns the step to go on from."""
        if self.awaiting_restore and path is None:
            self._await_restore()
        src = path or self.restore_path
        if not src:
            return self.step_count
        t0 = time.perf_counter()
        self.load_state(_ckpt.load(src))
        self.report("restored", path=str(src), load_s=time.perf_counter() - t0)
        return self.step_count

    def restore_in_place(self, path: str | Path) -> None:
        """Restore ``path`` into this job's own tensors (one read); a fresh load when shapes differ."""
        st = _ckpt.load_into(path, self.state())
        if st is None:
            self.load_state(_ckpt.load(path))
        else:
            self.load_state(st, tensors_in_place=True)

    def _offload(self, device: str) -> None:
        """Move models and optimizer state to ``device`` (frees GPU memory when it is "cpu")."""
        if not any(p.device.type != "cpu" for m in self.models for p in m.parameters()) and device == "cpu":
            return
        import torch

        for m in self.models:
            m.to(device)
        for o in self.optimizers:
            for s in o.state.values():
                for k, v in s.items():
                    if isinstance(v, torch.Tensor):
                        s[k] = v.to(device)
        if device == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the hook
    def step(self, **metrics: float) -> int:
        """Mark the end of a mini-batch: count it, report its time and ``metrics``, and obey instructions.

        Returns the number of mini-batches done.
        """
        if self.awaiting_restore:  # a migration's target that does not restore: it starts once the source stopped
            self._await_restore()
        now = time.perf_counter()
        dt = now - self._last_boundary
        self._mb_ema = dt if self._mb_ema == 0 else 0.8 * self._mb_ema + 0.2 * dt
        self.step_count += 1
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
            path = self.checkpoint()
            self.report("checkpoint", path=str(path), minibatch_s=self._mb_ema, metrics=self.metrics)
        elif now - self._last_report >= REPORT_EVERY_S:
            self.report("progress", minibatch_s=self._mb_ema, metrics=self.metrics)
            self._last_report = now
        while (word := self._take()) is not None:
            if word == "checkpoint":
                path = self.checkpoint()
                self.report("checkpoint", path=str(path), minibatch_s=self._mb_ema, metrics=self.metrics)
            elif word in ("suspend", "stop"):
                self._suspend(stop=word == "stop")
            elif word.startswith("resize "):
                self._resize(word.partition(" ")[2])
        self._last_boundary = time.perf_counter()
        return self.step_count

    def _resize(self, arg: str) -> None:
        before = self.gpus
        self.slots = [s.strip() for s in arg.split(",") if s.strip()]
        self.resizes += 1
        self.report("resized", slots=[int(s) for s in self.slots], gpus=self.gpus, previous=before)

    def _suspend(self, *, stop: bool) -> None:
        t0 = time.perf_counter()
        device = next((str(p.device) for m in self.models for p in m.parameters()), "cpu")
        path = self.checkpoint()
        self._offload("cpu")
        self.suspend_s.append(time.perf_counter() - t0)
        self.report("suspended", path=str(path), save_s=self.suspend_s[-1], metrics=self.metrics,
                    minibatch_s=self._mb_ema)
        word = "stop" if stop else self._wait()
        while word in ("suspend", "checkpoint") or word.startswith("resize "):
            if word.startswith("resize "):
                self._resize(word.partition(" ")[2])
            word = self._wait()
        if word == "stop":
            self.report("stopped", path=str(path))
            self._exit(EXIT_STOPPED)
        t1 = time.perf_counter()
        self._offload(device)
        self.restore_in_place(path)
        self.resume_s.append(time.perf_counter() - t1)
        self.report("resumed", load_s=self.resume_s[-1])

    @staticmethod
    def _exit(code: int) -> None:
        sys.stdout.flush()
        for hook in _exit_hooks:
            hook()
        os._exit(code)

    def finish(self, **metrics: float) -> None:
        """The job is done: report the final metrics."""
        if self.awaiting_restore:
            self._await_restore()
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        self.report("finished", metrics=self.metrics, minibatch_s=self._mb_ema)


_current: Job | None = None
_exit_hooks: list[Callable[[], None]] = []


def on_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` before the process leaves through a stop at a boundary (``os._exit`` skips ``finally``)."""
    _exit_hooks.append(hook)


def init(model: Any = None, optimizer: Any = None, *, extra: dict[str, Any] | None = None,
         checkpoint_every: int | None = None) -> Job:
    """Attach the training state (modules and optimizers with ``state_dict``) to this job's hook.

    ``extra``: a dict of further state kept in every checkpoint (e.g. a data-loader position).
    ``checkpoint_every``: also checkpoint every N mini-batches (so a lost node costs at most N).
    """
    global _current
    _current = Job(model=model, optimizer=optimizer, extra=extra, checkpoint_every=checkpoint_every)
    return _current


def current() -> Job | None:
    return _current
