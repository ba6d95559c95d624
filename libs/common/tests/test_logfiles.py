"""Log files: rotation by copy and truncate (the writer appends on, nothing reopened), reading a part, and the
markers that pick one task's output out of its worker's log."""

from __future__ import annotations

import os
from pathlib import Path

from tessera.common import logfiles


def test_rotation_keeps_backups_and_the_writer_appends_on(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    fd = logfiles.open_append(log)
    try:
        for gen in range(4):
            os.write(fd, f"gen{gen}-".encode() * 20)
            assert logfiles.rotate(log, max_bytes=50, backups=2)
        os.write(fd, b"after")
        assert log.read_bytes() == b"after", "the writer goes on at the start of the emptied file"
        assert (tmp_path / "x.log.1").read_bytes().startswith(b"gen3-")
        assert (tmp_path / "x.log.2").read_bytes().startswith(b"gen2-")
        assert not (tmp_path / "x.log.3").exists(), "two backups kept, the oldest dropped"
        assert not logfiles.rotate(log, max_bytes=50, backups=2), "under the limit: left alone"
        assert not logfiles.rotate(log, max_bytes=0, backups=2)
        assert not logfiles.rotate(tmp_path / "missing.log", max_bytes=1, backups=2)
    finally:
        os.close(fd)


def test_rotation_with_no_backups_only_truncates(tmp_path: Path) -> None:
    log = tmp_path / "y.log"
    log.write_bytes(b"z" * 100)
    assert logfiles.rotate(log, max_bytes=10, backups=0)
    assert log.read_bytes() == b"" and not (tmp_path / "y.log.1").exists()


def test_read_part_from_an_offset_a_tail_and_past_the_end(tmp_path: Path) -> None:
    log = tmp_path / "z.log"
    log.write_bytes(b"0123456789")
    assert logfiles.read_part(log, 2, 3) == (b"234", 2, 10)
    assert logfiles.read_part(log, -4, 100) == (b"6789", 6, 10)
    assert logfiles.read_part(log, -100, 100) == (b"0123456789", 0, 10)
    assert logfiles.read_part(log, 50, 100) == (b"0123456789", 0, 10), "rotated since: from the start"


def test_a_tasks_section_of_a_worker_log() -> None:
    a, b = "ab" * 16, "cd" * 16
    data = (f"before\n{logfiles.MARKER}{a}\na1\na2\n{logfiles.MARKER}{b}\nb1\n{logfiles.MARKER}{a}\na3\n"
            .encode())
    assert logfiles.task_section(data, a) == b"a1\na2\na3\n"
    assert logfiles.task_section(data, b) == b"b1\n"
    assert logfiles.task_section(data, "ef" * 16) == b""
    assert logfiles.without_markers(data) == b"before\na1\na2\nb1\na3\n"
    assert logfiles.without_markers(b"\n\nplain\n") == b"\n\nplain\n"
