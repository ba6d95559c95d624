"""The session-end check of the pytest plugin, run on small test files in a pytest of their own:
a server left running fails the session, is named and is killed; a server that a test kills,
restarts or stops does not, even when the test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.testing import _leaks

#: Each test file writes the pid of every server it starts here, one a line.
PIDS = "pids.txt"

LEAKS_THROUGH_THE_HELPER = """
import os
from tessera.testing import nats_server

KEPT = []  # keeps the context open past the test, as a forgotten __exit__ would


def test_starts_a_server_and_never_stops_it():
    cm = nats_server()
    server = cm.__enter__()
    KEPT.append(cm)
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{server.proc.pid}\\n")
"""

LEAKS_AN_UNTRACKED_CHILD = """
import os
from tessera.common import procs

KEPT = []


def test_starts_redis_directly(tmp_path):
    port = procs.free_port()
    proc = procs.start(procs.redis_command(port, tmp_path))
    procs.wait_port("127.0.0.1", port, timeout=20, proc=proc)
    KEPT.append(proc)
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{proc.pid}\\n")
"""

LEAKS_A_DAEMON = """
import os
import shlex
import subprocess
from tessera.common import procs
from tessera.testing import track


def test_records_a_server_that_is_not_its_child(tmp_path):
    # as `tessera up` does: the server is left to init, so only its recorded pid leads to it
    port = procs.free_port()
    cmd = shlex.join(procs.redis_command(port, tmp_path))
    pid = int(subprocess.run(["sh", "-c", f"{cmd} >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                             timeout=10).stdout)
    procs.wait_port("127.0.0.1", port, timeout=20)
    track(pid)
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{pid}\\n")
"""

LEAKS_NOTHING = """
import os
import pytest
from tessera.common import procs
from tessera.testing import nats_server, redis_server, track


def _record(*pids):
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.writelines(f"{p}\\n" for p in pids)


def test_kill_and_restart(own_redis, nats_srv):
    first = own_redis.proc.pid
    own_redis.kill()
    own_redis.restart()
    with nats_server() as nats:
        before = nats.proc.pid
        nats.proc.kill()  # killed and not waited for: a zombie until reaped
        nats.restart()
        _record(first, own_redis.proc.pid, before, nats.proc.pid, nats_srv.proc.pid)


def test_a_failing_test_stops_its_servers():
    with redis_server() as r, nats_server() as n:
        _record(r.proc.pid, n.proc.pid)
        raise AssertionError("this test fails on purpose")


def test_a_tracked_server_stopped_by_hand(tmp_path):
    port = procs.free_port()
    proc = procs.start(procs.redis_command(port, tmp_path))
    track(proc)
    try:
        procs.wait_port("127.0.0.1", port, timeout=20, proc=proc)
        _record(proc.pid)
    finally:
        procs.stop(proc)
"""


def _pytest(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    """Run ``source`` as a test file in a pytest of its own; its output and the pids of its servers."""
    (tmp_path / "test_inner.py").write_text(source)
    pids_file = tmp_path / PIDS
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PIDS_FILE"] = str(pids_file)
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    finally:
        pids = [int(line) for line in pids_file.read_text().split()] if pids_file.exists() else []
        for pid in pids:  # whatever the check under test left running, this test does not leave behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    return out, pids


def _alive(pid: int) -> bool:
    st = _leaks._stat(pid)
    return st is not None and st[0] not in ("Z", "X")


@pytest.mark.parametrize("source,binary", [(LEAKS_THROUGH_THE_HELPER, "nats-server"),
                                           (LEAKS_AN_UNTRACKED_CHILD, "redis-server"),
                                           (LEAKS_A_DAEMON, "redis-server")],
                         ids=["tracked", "untracked-child", "tracked-by-pid"])
def test_a_leaked_server_fails_the_session_and_is_killed(tmp_path: Path, source: str, binary: str) -> None:
    out, pids = _pytest(tmp_path, source)
    text = out.stdout + out.stderr
    assert len(pids) == 1, text
    assert out.returncode == pytest.ExitCode.TESTS_FAILED, text
    assert "1 passed" in text  # the test itself passed: the session failed for the leak alone
    assert "leaked servers" in text and "outlived the session (now killed)" in text, text
    line = next(x for x in text.splitlines() if x.startswith(f"pid {pids[0]}: "))
    assert binary in line, line  # named with its command line
    assert not _alive(pids[0])  # and killed: the inner pytest has exited, nothing here stopped it


def test_servers_killed_restarted_or_stopped_are_no_leak(tmp_path: Path) -> None:
    out, pids = _pytest(tmp_path, LEAKS_NOTHING)
    text = out.stdout + out.stderr
    assert len(pids) == 8, text
    assert "2 passed, 1 failed" in text or "1 failed, 2 passed" in text, text
    assert "leaked servers" not in text and "outlived" not in text, text
    assert out.returncode == pytest.ExitCode.TESTS_FAILED  # for the failing test only
    assert not [p for p in pids if _alive(p)]


def test_a_passing_session_without_leaks_passes(tmp_path: Path) -> None:
    out, pids = _pytest(tmp_path, LEAKS_NOTHING.replace('raise AssertionError("this test fails on purpose")',
                                                        "pass"))
    assert out.returncode == pytest.ExitCode.OK, out.stdout + out.stderr
    assert len(pids) == 8 and not [p for p in pids if _alive(p)]


def test_a_reused_pid_is_not_taken_for_the_recorded_process() -> None:
    """A record is a pid and a start time: another process with that pid later is not the one recorded."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # it has exec'd
        tracker = _leaks.Tracker()
        tracker.track(proc.pid)  # by pid, as for a process that is not our child
        (recorded,) = [p for p in tracker.leaked() if p.pid == proc.pid]
        assert "time.sleep(30)" in recorded.command
        impostor = _leaks.Started(proc.pid, recorded.start + 1, recorded.command)
        assert _leaks.running(recorded) and not _leaks.running(impostor)
    finally:
        proc.kill()
        proc.wait(10)
    assert not _leaks.running(recorded)
