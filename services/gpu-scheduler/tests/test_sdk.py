"""The in-job SDK: checkpoints, and suspend / resume / stop through a real job process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tessera.gpu import _ckpt  # noqa: E402
from tessera.gpu._job import EXIT_STOPPED  # noqa: E402


def test_checkpoint_roundtrip_of_nested_state(tmp_path: Path) -> None:
    st = {"a": torch.arange(10, dtype=torch.float32), "b": [torch.zeros(0), (torch.ones(2, 3, dtype=torch.bfloat16), 7)],
          "c": {"d": "text", "e": torch.tensor(3)}}
    n = _ckpt.save(tmp_path / "x.ckpt", st)
    assert n == (tmp_path / "x.ckpt").stat().st_size
    back = _ckpt.load(tmp_path / "x.ckpt")
    assert torch.equal(back["a"], st["a"]) and back["b"][0].numel() == 0
    assert torch.equal(back["b"][1][0], st["b"][1][0]) and back["b"][1][1] == 7 and back["c"]["d"] == "text"
    (tmp_path / "bad").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="bad magic"):
        _ckpt.load(tmp_path / "bad")


def _spawn(tmp_path: Path, out: Path, *, steps: int, extra_env: dict[str, str] | None = None,
           sleep_s: float = 0.0) -> tuple[subprocess.Popen[bytes], int]:
    r, w = os.pipe()
    env = dict(os.environ, TESSERA_GPU_JOB_ID="t1", TESSERA_GPU_REPORT_FD=str(w), TESSERA_GPU_CKPT_DIR=str(tmp_path),
               TESSERA_GPU_ENTRY="tessera.gpu_scheduler.examples:train",
               TESSERA_GPU_ARGS=json.dumps([str(steps), "7", str(out), str(sleep_s)]), **(extra_env or {}))
    p = subprocess.Popen([sys.executable, "-m", "tessera.gpu._runner"], env=env, stdin=subprocess.PIPE, pass_fds=(w,))
    os.close(w)
    return p, r


def _events(fd: int):  # type: ignore[no-untyped-def]
    with os.fdopen(fd, "rb") as f:
        for line in f:
            yield json.loads(line)


@pytest.mark.long
def test_suspended_and_resumed_job_ends_with_identical_weights(tmp_path: Path) -> None:
    from tessera.gpu_scheduler.examples import train

    ref = tmp_path / "ref.pt"
    train("60", "7", str(ref))  # uninterrupted, in this process (standalone: the hook only counts)
    # the same run, suspended at a boundary, then stopped, then resumed from the checkpoint in a new process
    out = tmp_path / "out.pt"
    spawned: list[subprocess.Popen[bytes]] = []
    try:
        p, r = _spawn(tmp_path, out, steps=60, sleep_s=0.01)
        spawned.append(p)
        events = _events(r)
        assert p.stdin is not None
        for ev in events:
            if ev["event"] == "progress" and ev["step"] >= 5:
                p.stdin.write(b"suspend\n")
                p.stdin.flush()
                break
        ev = next(e for e in events if e["event"] == "suspended")
        step = ev["step"]
        p.stdin.write(b"resume\n")  # in-process resume
        p.stdin.flush()
        assert next(e for e in events if e["event"] in ("resumed", "finished"))["event"] == "resumed"
        p.stdin.write(b"stop\n")  # now a stop (as for a migration): checkpoint at the next boundary and exit
        p.stdin.flush()
        ev = next(e for e in events if e["event"] == "suspended")
        assert ev["step"] >= step
        assert p.wait(60) == EXIT_STOPPED
        p2, r2 = _spawn(tmp_path, out, steps=60, extra_env={"TESSERA_GPU_RESTORE": ev["path"]})
        spawned.append(p2)
        evs2 = list(_events(r2))
        assert p2.wait(60) == 0
        assert evs2[0]["event"] == "restored" and evs2[0]["step"] == ev["step"]
    finally:  # a failed step leaves no job process behind
        for proc in spawned:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    a, b = torch.load(ref), torch.load(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_place_checkpoints_reuse_files_and_restore_into_live_tensors(tmp_path: Path) -> None:
    from tessera.gpu._job import Job

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    job = Job(model=model, optimizer=opt, env={"TESSERA_GPU_JOB_ID": "j", "TESSERA_GPU_CKPT_DIR": str(tmp_path)})
    p1, p2, p3 = job.checkpoint(), job.checkpoint(), job.checkpoint()
    assert p1 == p3 != p2 and sorted(f.name for f in tmp_path.iterdir()) == ["j-0.ckpt", "j-1.ckpt"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.weight
    with torch.no_grad():
        model.weight.add_(1.0)
    job.restore_in_place(p3)
    assert model.weight is weight and torch.equal(model.weight, saved["weight"])  # same memory, old values
    assert _ckpt.load_into(p3, {"other": torch.zeros(3)}) is None  # shapes differ: the caller loads afresh


def test_named_pipe_channel_and_resize_at_a_boundary(tmp_path: Path) -> None:
    """The channel a container job uses (two named pipes, no stdin), and grow-shrink seen by the job."""
    ctl, report = tmp_path / "ctl", tmp_path / "report"
    os.mkfifo(ctl)
    os.mkfifo(report)
    ctl_fd = os.open(ctl, os.O_RDWR)  # as the agent: held open, so the job's reader never sees an end
    rep_fd = os.open(report, os.O_RDWR)
    env = dict(os.environ, TESSERA_GPU_JOB_ID="c1", TESSERA_GPU_CKPT_DIR=str(tmp_path), TESSERA_GPU_SLOTS="0",
               TESSERA_GPU_CTL_PATH=str(ctl), TESSERA_GPU_REPORT_PATH=str(report),
               TESSERA_GPU_ENTRY="tessera.gpu_scheduler.examples:train", TESSERA_GPU_ARGS=json.dumps(["100000", "1", "", "0.01"]))
    env.pop("TESSERA_GPU_REPORT_FD", None)
    p = subprocess.Popen([sys.executable, "-m", "tessera.gpu._runner"], env=env, stdin=subprocess.DEVNULL)
    try:
        events = _events(rep_fd)
        first = next(e for e in events if e["event"] == "progress")
        assert first["metrics"]["gpus"] == 1.0
        os.write(ctl_fd, b"resize 0,1,3\n")
        ev = next(e for e in events if e["event"] == "resized")
        assert ev["slots"] == [0, 1, 3] and ev["gpus"] == 3 and ev["previous"] == 1
        assert next(e for e in events if e["event"] == "progress")["metrics"]["gpus"] == 3.0  # the loop sees it
        os.write(ctl_fd, b"resize nope\nresize 2\n")  # a bad instruction is refused, the next one taken
        assert next(e for e in events if e["event"] == "resized")["slots"] == [2]
        os.write(ctl_fd, b"stop\n")
        assert next(e for e in events if e["event"] == "suspended")["path"].startswith(str(tmp_path))
        assert p.wait(60) == EXIT_STOPPED
    finally:
        if p.poll() is None:
            p.kill()
        os.close(ctl_fd)


@pytest.mark.long
def test_a_migration_target_started_ahead_waits_for_the_checkpoint_and_ends_identical(tmp_path: Path) -> None:
    from tessera.gpu_scheduler.examples import train

    ref = tmp_path / "ref.pt"
    train("60", "7", str(ref))
    out = tmp_path / "out.pt"
    src, r1 = _spawn(tmp_path / "src", out, steps=60, sleep_s=0.01)
    # the target starts while the source runs: it builds its model, then waits, making no progress
    dst, r2 = _spawn(tmp_path / "dst", out, steps=60, extra_env={"TESSERA_GPU_AWAIT_RESTORE": "1"})
    dst_events = _events(r2)
    assert next(dst_events)["event"] == "waiting"
    src_events = _events(r1)
    assert src.stdin is not None and dst.stdin is not None
    next(e for e in src_events if e["event"] == "progress" and e["step"] >= 5)
    src.stdin.write(b"stop\n")
    src.stdin.flush()
    ev = next(e for e in src_events if e["event"] == "suspended")
    assert src.wait(60) == EXIT_STOPPED
    assert dst.poll() is None  # still waiting: nothing came while the source checkpointed
    dst.stdin.write(f"restore {ev['path']}\n".encode())
    dst.stdin.flush()
    evs = list(dst_events)
    assert dst.wait(60) == 0
    assert evs[0]["event"] == "restored" and evs[0]["step"] == ev["step"]
    assert int(Path(f"{out}.start").read_text()) == ev["step"]
    a, b = torch.load(ref), torch.load(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_waiting_migration_target_that_is_stopped_ends_without_training(tmp_path: Path) -> None:
    p, r = _spawn(tmp_path, tmp_path / "out.pt", steps=60, extra_env={"TESSERA_GPU_AWAIT_RESTORE": "1"})
    events = _events(r)
    assert next(events)["event"] == "waiting"
    assert p.stdin is not None
    p.stdin.write(b"resize 1\nstop\n")
    p.stdin.flush()
    assert [e["event"] for e in events] == ["stopped"]
    assert p.wait(60) == EXIT_STOPPED and not (tmp_path / "out.pt").exists()
