"""The worker template: forks on request, reports each child's exit, and lets the agent kill one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tessera.task_scheduler.zygote import Zygote

#: A template whose "worker" writes its parent's pid and its environment's CODE, then exits with CODE
#: (or sleeps, to be killed).
TEMPLATE = """
import os, time
from tessera.task_scheduler.zygote import serve

def run():
    with open(os.environ["OUT"], "w") as f:
        f.write(f"{os.getppid()} {os.environ['CODE']}")
    if os.environ["CODE"] == "sleep":
        time.sleep(60)
    os._exit(int(os.environ["CODE"]))

serve(run)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child not yet reaped by its new parent is a zombie: not running)."""
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


async def _wait_for(path: Path) -> str:
    for _ in range(200):
        if path.exists() and path.read_text():
            return path.read_text()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} was never written")


async def test_forks_from_the_template_and_reports_exit_codes_and_kills(tmp_path: Path) -> None:
    z = Zygote()
    await z.start(dict(os.environ), [sys.executable, "-c", TEMPLATE])
    try:
        assert z.proc is not None
        p = await z.fork({"OUT": str(tmp_path / "a"), "CODE": "7"})
        assert await asyncio.wait_for(p.wait(), 10) == 7
        parent, code = (await _wait_for(tmp_path / "a")).split()
        assert int(parent) == z.proc.pid and code == "7"  # forked, with its own environment added

        ps = await asyncio.gather(*(z.fork({"OUT": str(tmp_path / f"s{i}"), "CODE": "sleep"}) for i in range(3)))
        assert len({p.pid for p in ps}) == 3
        for i in range(3):
            await _wait_for(tmp_path / f"s{i}")
        ps[0].kill()
        ps[1].terminate()
        assert await asyncio.wait_for(ps[0].wait(), 10) == -signal.SIGKILL
        assert await asyncio.wait_for(ps[1].wait(), 10) == -signal.SIGTERM
        assert ps[2].returncode is None
    finally:
        await z.close()
    assert z.proc.returncode == 0 and not z.alive
    # the template is gone: a worker it could no longer watch is killed, and forking is an OSError
    assert await asyncio.wait_for(ps[2].wait(), 10) == -signal.SIGKILL
    assert not _running(ps[2].pid)
    with pytest.raises(OSError, match="not running"):
        await z.fork({"CODE": "0"})


async def test_a_template_that_cannot_start_is_not_alive(tmp_path: Path) -> None:
    z = Zygote()
    await z.start(dict(os.environ), [sys.executable, "-c", "raise SystemExit(3)"])
    assert z.proc is not None
    await asyncio.wait_for(z.proc.wait(), 30)
    await asyncio.sleep(0.1)
    assert not z.alive
    with pytest.raises(OSError):
        await z.fork({"CODE": "0"})
    await z.close()
