"""Reading job traces in the Pollux format: ``name,time,application,num_replicas,batch_size``.

Malformed rows are refused with the file, line and reason (:class:`TraceError`).
Multi-jobs: the traces carry no group ids, so jobs of the same application, GPUs and
batch size that arrive within ``GROUP_WINDOW_S`` of the first of them are taken as one
group (a hyper-parameter search submitted as a burst).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from tessera.gpu_scheduler.profiles import PROFILES, duration_s

COLUMNS = ("name", "time", "application", "num_replicas", "batch_size")
GROUP_WINDOW_S = 600.0


class TraceError(ValueError):
    """A trace that cannot be read: the message names the line and the field."""


@dataclass(frozen=True)
class TraceJob:
    name: str
    arrival: float
    app: str
    gpus: int
    batch_size: int
    group: str = ""

    @property
    def duration_s(self) -> float:
        return duration_s(self.app, self.gpus)


def parse_trace(text: str, *, source: str = "<trace>") -> list[TraceJob]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise TraceError(f"{source}: empty trace (expected a header {','.join(COLUMNS)})") from None
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TraceError(f"{source}:1: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    idx = {c: header.index(c) for c in COLUMNS}
    jobs: list[TraceJob] = []
    names: set[str] = set()
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise TraceError(f"{source}:{lineno}: {len(row)} fields, expected {len(header)}")
        get = {c: row[i].strip() for c, i in idx.items()}
        where = f"{source}:{lineno}"
        if not get["name"]:
            raise TraceError(f"{where}: empty name")
        if get["name"] in names:
            raise TraceError(f"{where}: duplicate job name {get['name']!r}")
        try:
            arrival = float(get["time"])
        except ValueError:
            raise TraceError(f"{where}: time {get['time']!r} is not a number") from None
        if not arrival >= 0 or arrival == float("inf"):
            raise TraceError(f"{where}: time must be a finite number >= 0, got {get['time']!r}")
        if get["application"] not in PROFILES:
            raise TraceError(f"{where}: unknown application {get['application']!r}; known: {', '.join(sorted(PROFILES))}")
        for col in ("num_replicas", "batch_size"):
            try:
                v = int(get[col])
            except ValueError:
                raise TraceError(f"{where}: {col} {get[col]!r} is not an integer") from None
            if v < 1:
                raise TraceError(f"{where}: {col} must be >= 1, got {v}")
        names.add(get["name"])
        jobs.append(TraceJob(get["name"], arrival, get["application"], int(get["num_replicas"]), int(get["batch_size"])))
    if not jobs:
        raise TraceError(f"{source}: no jobs")
    jobs.sort(key=lambda j: (j.arrival, j.name))
    return _group(jobs)


def _group(jobs: list[TraceJob]) -> list[TraceJob]:
    open_groups: dict[tuple[str, int, int], tuple[str, float, list[int]]] = {}
    members: dict[str, list[int]] = {}
    for i, j in enumerate(jobs):
        key = (j.app, j.gpus, j.batch_size)
        g = open_groups.get(key)
        if g is None or j.arrival - g[1] > GROUP_WINDOW_S:
            g = (f"g-{j.name}", j.arrival, [])
            open_groups[key] = g
        g[2].append(i)
        members[g[0]] = g[2]
    out = list(jobs)
    for gid, idxs in members.items():
        if len(idxs) > 1:
            for i in idxs:
                j = out[i]
                out[i] = TraceJob(j.name, j.arrival, j.app, j.gpus, j.batch_size, gid)
    return out


def read_trace(path: str | Path) -> list[TraceJob]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror or e}") from None
    return parse_trace(text, source=str(p))
