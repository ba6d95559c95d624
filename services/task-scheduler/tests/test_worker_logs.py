"""Workers' log files on a node: reading them by worker or actor, bad requests, rotation and pruning, and the
stream that marks where each task's output starts."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tessera.common import logfiles
from tessera.common.errors import InvalidArgumentError, NotFoundError
from tessera.task_scheduler.worker_logs import MarkedStream, WorkerLogs


def logs(tmp_path: Path, **kw: int) -> WorkerLogs:
    return WorkerLogs(tmp_path / "node", max_bytes=kw.get("max_bytes", 1000), backups=2,
                      keep_dead=kw.get("keep_dead", 2))


def write(w: WorkerLogs, wid: bytes, text: str, suffix: str = "out") -> None:
    fd = logfiles.open_append(Path(f"{w.prefix(wid)}.{suffix}"))
    os.write(fd, text.encode())
    os.close(fd)


def test_read_by_worker_and_by_actor(tmp_path: Path) -> None:
    w = logs(tmp_path)
    wid, aid = os.urandom(8), os.urandom(16)
    w.started(wid, 4242, aid)
    write(w, wid, "hello\nworld\n")
    write(w, wid, "oops\n", "err")
    assert w.read(worker_id=wid) == (b"hello\nworld\n", 0, 12, wid, 4242, True)
    assert w.read(actor_id=aid, suffix="err", offset=-3)[:3] == (b"ps\n", 2, 5)
    w.ended(wid)
    assert w.read(actor_id=aid)[5] is False, "readable after the worker ended"


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"worker_id": b"x" * 8, "suffix": "log"}, InvalidArgumentError, "suffix must be one of out, err"),
    ({}, InvalidArgumentError, "give one of worker_id and actor_id"),
    ({"worker_id": b"x" * 8, "actor_id": b"y" * 16}, InvalidArgumentError, "give one of"),
    ({"worker_id": b"x" * 3}, InvalidArgumentError, "worker_id must be 8 bytes, got 3"),
    ({"actor_id": b"y" * 5}, InvalidArgumentError, "actor_id must be 16 bytes, got 5"),
    ({"worker_id": b"x" * 8, "max_bytes": 2**30}, InvalidArgumentError, "max_bytes must be between"),
    ({"worker_id": b"x" * 8}, NotFoundError, "no log of worker 7878787878787878"),
    ({"actor_id": b"y" * 16}, NotFoundError, "no worker ran actor"),
])
def test_bad_requests_are_named(tmp_path: Path, kw: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        logs(tmp_path).read(**kw)  # type: ignore[arg-type]


def test_maintain_rotates_and_drops_the_oldest_ended_workers(tmp_path: Path) -> None:
    w = logs(tmp_path, max_bytes=10, keep_dead=1)
    ids = [os.urandom(8) for _ in range(3)]
    for i in ids:
        w.started(i, 1)
        write(w, i, "x" * 20)
    w.maintain()
    assert all(Path(f"{w.prefix(i)}.out.1").exists() and Path(f"{w.prefix(i)}.out").stat().st_size == 0 for i in ids)
    w.ended(ids[0])
    w.ended(ids[1])
    w.maintain()
    assert not list(tmp_path.glob(f"node/worker-{ids[0].hex()}*")), "beyond the one ended worker kept: removed"
    assert Path(f"{w.prefix(ids[1])}.out").exists() and Path(f"{w.prefix(ids[2])}.out").exists()


def test_the_marked_stream_names_each_task_before_its_first_output() -> None:
    raw = io.StringIO()
    current = [b""]
    s = MarkedStream(raw, lambda: current[0])  # type: ignore[arg-type]
    s.write("boot\n")
    current[0] = b"\x01" * 16
    s.write("a")
    s.write("b\n")
    current[0] = b"\x02" * 16
    s.write("partial")
    current[0] = b"\x01" * 16
    s.write("c\n")
    m = logfiles.MARKER
    assert raw.getvalue() == f"boot\n{m}{'01' * 16}\nab\n{m}{'02' * 16}\npartial\n{m}{'01' * 16}\nc\n"
    assert logfiles.task_section(raw.getvalue().encode(), "01" * 16) == b"ab\nc\n"
