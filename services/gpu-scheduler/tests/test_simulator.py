"""The trace reader and the simulator: determinism, metrics, bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.gpu_scheduler import cli
from tessera.gpu_scheduler.policy import make_policy
from tessera.gpu_scheduler.simulator import simulate
from tessera.gpu_scheduler.trace import TraceError, parse_trace, read_trace

TRACES = Path(__file__).resolve().parent.parent / "traces"

SMALL = """name,time,application,num_replicas,batch_size
a,0,cifar10,1,128
b,10,cifar10,1,128
c,20,ncf,1,32768
d,30,bert,2,12
e,40,cifar10,4,512
"""


def test_trace_reads_the_pollux_files_as_they_are() -> None:
    jobs = read_trace(TRACES / "workload-1.csv")
    assert len(jobs) == 160
    assert {j.app for j in jobs} == {"cifar10", "ncf", "deepspeech2", "bert", "imagenet", "yolov3"}
    assert jobs == sorted(jobs, key=lambda j: (j.arrival, j.name))
    assert any(j.group for j in jobs)


@pytest.mark.parametrize("row, message", [
    ("x,abc,cifar10,1,128", "time 'abc' is not a number"),
    ("x,-5,cifar10,1,128", "time must be"),
    ("x,5,resnet,1,128", "unknown application 'resnet'"),
    ("x,5,cifar10,0,128", "num_replicas must be >= 1"),
    ("x,5,cifar10,two,128", "num_replicas 'two' is not an integer"),
    ("x,5,cifar10,1", "4 fields, expected 5"),
    (",5,cifar10,1,128", "empty name"),
])
def test_malformed_rows_name_line_and_field(row: str, message: str) -> None:
    with pytest.raises(TraceError, match=f"t.csv:3: {message}"):
        parse_trace(f"name,time,application,num_replicas,batch_size\nok,0,ncf,1,1\n{row}\n", source="t.csv")
    with pytest.raises(TraceError, match="missing column"):
        parse_trace("name,time,app\n", source="t.csv")


def test_simulation_is_deterministic_and_complete() -> None:
    jobs = parse_trace(SMALL)
    r1 = simulate(jobs, make_policy("gandiva", quantum=30), gpus=4, gpus_per_node=2, seed=3)
    r2 = simulate(jobs, make_policy("gandiva", quantum=30), gpus=4, gpus_per_node=2, seed=3)
    assert r1 == r2
    assert r1.jobs == 5 and len(r1.jcts_h) == 5
    assert 0 < r1.utilization <= 1 and r1.p95_jct_h >= r1.median_jct_h > 0
    with pytest.raises(ValueError, match="more than the 2 GPUs"):
        simulate(parse_trace(SMALL.replace("cifar10,4", "cifar10,8")), make_policy("fifo"), gpus=2, gpus_per_node=2)


def test_policies_on_a_contended_cluster() -> None:
    """Many short jobs behind long ones: time-slicing and LAS beat FIFO on average JCT."""
    rows = ["name,time,application,num_replicas,batch_size"]
    rows += [f"long{i},{i},yolov3,1,8" for i in range(2)]
    rows += [f"short{i},{10 + i},ncf,1,32768" for i in range(6)]
    jobs = parse_trace("\n".join(rows))
    res = {p: simulate(jobs, make_policy(p, quantum=60), gpus=2, gpus_per_node=2) for p in ("fifo", "las", "gandiva")}
    assert res["gandiva"].avg_jct_h < res["fifo"].avg_jct_h
    assert res["las"].avg_jct_h < res["fifo"].avg_jct_h
    assert res["gandiva"].packings > 0 and res["fifo"].suspensions == 0
    assert res["gandiva"].avg_queueing_delay_h < res["fifo"].avg_queueing_delay_h


def test_cli_simulate_json_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser()
    handler = cli.register(ap.add_subparsers(dest="command"))
    trace = tmp_path / "t.csv"
    trace.write_text(SMALL)
    assert handler(ap.parse_args(["gpu", "simulate", "--trace", str(trace), "--gpus", "4", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["results"]] == ["gandiva", "fifo", "las"]
    assert handler(ap.parse_args(["gpu", "simulate", "--trace", str(trace), "--gpus", "4", "--policy", "srtf"])) == 1
    assert "unknown policy" in capsys.readouterr().err
    trace.write_text(SMALL + "z,1,cifar10,x,1\n")
    assert handler(ap.parse_args(["gpu", "simulate", "--trace", str(trace), "--gpus", "4"])) == 1
    assert "is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("trace", ["workload-1.csv", "workload-2.csv"])
def test_gandiva_beats_las_and_fifo_on_the_pollux_traces(trace: str) -> None:
    """On 64 GPUs (4 per node): average JCT gandiva < LAS < FIFO, and utilization >= 1.2 x FIFO's."""
    jobs = read_trace(TRACES / trace)
    res = {p: simulate(jobs, make_policy(p), gpus=64, gpus_per_node=4) for p in ("fifo", "las", "gandiva")}
    assert res["gandiva"].avg_jct_h < res["las"].avg_jct_h < res["fifo"].avg_jct_h
    assert res["gandiva"].utilization >= 1.2 * res["fifo"].utilization
    # the useful work is the same whatever the policy: utilization ratios are makespan ratios
    ratio = res["gandiva"].utilization / res["fifo"].utilization
    assert ratio == pytest.approx(res["fifo"].makespan_h / res["gandiva"].makespan_h, rel=1e-6)


def test_simulate_reports_each_finished_job() -> None:
    seen: list[tuple[int, int]] = []
    simulate(parse_trace(SMALL), make_policy("fifo"), gpus=4, gpus_per_node=2, on_progress=lambda k, n: seen.append((k, n)))
    assert seen == [(k, 5) for k in range(1, 6)]


def test_cli_simulate_shows_a_bar_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse
    import io
    import sys

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    ap = argparse.ArgumentParser()
    handler = cli.register(ap.add_subparsers(dest="command"))
    trace = tmp_path / "t.csv"
    trace.write_text(SMALL)
    for flags, shown in (([], True), (["--json"], False)):
        err = Tty()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        assert handler(ap.parse_args(["gpu", "simulate", "--trace", str(trace), "--gpus", "4", "--policy", "fifo",
                                      *flags])) == 0
        assert ("simulating fifo [" in err.getvalue() and "5/5 jobs done" in err.getvalue()) == shown, err.getvalue()
