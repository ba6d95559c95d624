"""The GPU scheduler live: `tessera up --nodes 2 --gpus-per-node 1`, real job processes (torch on CPU).

Time-slicing, an admin suspend/resume with identical results, a migration to the other
node, a killed node agent's job requeued from its last checkpoint, and bad input.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import stacks

torch = pytest.importorskip("torch")

from tessera.gpu import GpuClient  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class Stack(stacks.Cluster):
    """A stack brought up with virtual GPUs (``--gpus-per-node``)."""


poll_until = stacks.poll_until

ENTRY = "tessera.gpu_scheduler.examples:train"


#: what both GPU stacks share: a small object store, 2 s quanta
GPU_ENV = dict(TESSERA_OBJECT_STORE_MEMORY=str(64 * 2**20), TESSERA_OBJECT_STORE_PREFAULT="false",
               TESSERA_GPU_SCHEDULER_QUANTUM_S="2")


@pytest.fixture(scope="module")
def gpu_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stacks.running(tmp_path_factory, "gpurun", "--nodes", "2", "--gpus-per-node", "1", cls=Stack, timeout=120,
                        **GPU_ENV, TESSERA_GPU_SCHEDULER_AGENT_TIMEOUT_S="3",
                        TESSERA_GPU_SCHEDULER_PACKING="true") as s:
        yield s


@pytest.fixture(scope="module")
def elastic_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One node with two virtual GPUs; early feedback stops a group's job below half the group's best."""
    with stacks.running(tmp_path_factory, "gpuelastic", "--nodes", "1", "--gpus-per-node", "2", cls=Stack,
                        timeout=120, **GPU_ENV, TESSERA_GPU_SCHEDULER_AGENT_TIMEOUT_S="10",
                        TESSERA_GPU_SCHEDULER_FEEDBACK_STOP_BELOW="0.5") as s:
        yield s


def _client_of(stack: Stack, nodes: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[GpuClient]:
    monkeypatch.setenv("TESSERA_RUN_DIR", str(stack.run_dir))
    monkeypatch.delenv("TESSERA_ADDRESS", raising=False)
    c = poll_until(lambda: _try_client(), timeout=30, what="gpu-scheduler registered")
    poll_until(lambda: len([n for n in c.cluster().nodes if n.alive]) == nodes, timeout=30, what=f"{nodes} node agent(s)")
    yield c
    for j in c.list():
        if j.state in (1, 2, 3):
            c.kill(j.job_id)
    c.close()


@pytest.fixture
def client(gpu_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[GpuClient]:
    yield from _client_of(gpu_stack, 2, monkeypatch)


@pytest.fixture
def elastic_client(elastic_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[GpuClient]:
    yield from _client_of(elastic_stack, 1, monkeypatch)


def _try_client() -> GpuClient | None:
    try:
        return GpuClient()
    except ConnectionError:
        return None


def _reference(tmp: Path, steps: int, seed: int) -> dict[str, object]:
    from tessera.gpu_scheduler.examples import train

    out = tmp / f"ref-{steps}-{seed}.pt"
    train(str(steps), str(seed), str(out))
    return torch.load(out)


def _same(a: dict, b: dict) -> bool:  # type: ignore[type-arg]
    return all(torch.equal(a[k], b[k]) for k in a)


def _state(c: GpuClient, jid: str) -> str:
    from tessera.gpu.client import job_to_dict

    return str(job_to_dict(c.status(jid))["state"])


def test_bad_input_gets_clear_errors(client: GpuClient) -> None:
    for kw, msg in [({"entry_point": ENTRY, "gpus": 0}, "at least one GPU"),
                    ({"entry_point": ENTRY, "gpus": 3}, "the cluster has 2"),
                    ({"gpus": 1}, "missing entry point"),
                    ({"entry_point": "no_function_here", "gpus": 1}, "must be MODULE:FUNCTION")]:
        with pytest.raises(grpc.RpcError) as e:
            client.submit(**kw)  # type: ignore[arg-type]
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as e:
        client.status("nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert client.list() == []


@pytest.mark.long
def test_time_slicing_three_jobs_on_two_slots_all_progress_then_packing_is_tried(client: GpuClient) -> None:
    ids = [client.submit(entry_point=ENTRY, args=["100000", str(i), "", "0.01"], name=f"ts{i}") for i in range(3)]
    poll_until(lambda: all(client.status(j).step > 0 for j in ids), timeout=150, what="all three jobs progressed")
    poll_until(lambda: sum(client.status(j).suspensions for j in ids) >= 2, timeout=60, what="time slices")
    # each job has now run alone (its mini-batch time measured): the waiting one is packed with a runner to measure the pair
    poll_until(lambda: any(client.status(j).packed_with for j in ids), timeout=60, what="a pair packed")
    for j in ids:
        client.kill(j)
    assert all(_state(client, j) == "KILLED" for j in ids)


def _timeline(stack: Stack, jid: str) -> dict[str, list[tuple[str, float]]]:
    """The timeline log lines of ``jid`` in each gpu-scheduler process's log: {log name: [(event, time)]}."""
    import re

    out: dict[str, list[tuple[str, float]]] = {}
    for f in sorted((stack.run_dir / "logs").glob("gpu-*.log")):
        out[f.stem] = [(ev, float(t)) for j, ev, t in re.findall(r"job (\w+) timeline (\w+) ([0-9.]+)", f.read_text())
                       if j == jid]
    return out


@pytest.mark.long
def test_suspend_resume_and_migration_give_identical_results(client: GpuClient, gpu_stack: Stack, tmp_path: Path) -> None:
    ref = _reference(tmp_path, 150, 3)
    out = tmp_path / "out.pt"
    jid = client.submit(entry_point=ENTRY, args=["150", "3", str(out), "0.01"])
    poll_until(lambda: client.status(jid).step >= 10, timeout=60, what="job running")
    client.suspend(jid)
    poll_until(lambda: _state(client, jid) == "SUSPENDED", timeout=30, what="suspended")
    held_at = client.status(jid).step
    time.sleep(1.0)
    assert client.status(jid).step == held_at  # off the GPU: no progress
    client.resume(jid)
    poll_until(lambda: _state(client, jid) == "RUNNING" and client.status(jid).step > held_at, timeout=30, what="resumed")
    first = client.status(jid).node_id
    client.migrate(jid)
    poll_until(lambda: client.status(jid).node_id not in ("", first), timeout=60, what="migrated to the other node")
    poll_until(lambda: _state(client, jid) in ("SUCCEEDED", "FAILED"), timeout=120, what="finished")
    info = client.status(jid)
    assert _state(client, jid) == "SUCCEEDED", info.message
    assert info.migrations >= 1 and info.suspensions >= 1  # the admin suspend; a migration is a stop, not a suspend
    ends = [h.ended_by for h in info.history]  # its time slices, in order
    assert "suspended" in ends and ends[-1] == "succeeded" and all(h.end >= h.start > 0 for h in info.history), ends
    assert {h.node_id for h in info.history} >= {first, info.node_id} and len({h.node_id for h in info.history}) == 2
    assert int(Path(f"{out}.start").read_text()) > held_at  # the process on the new node began from the checkpoint
    assert _same(ref, torch.load(out))
    # the target process was started while the source still ran, and waited for the checkpoint
    marks = _timeline(gpu_stack, jid)
    src = next(v for v in marks.values() if any(ev == "stop" for ev, _ in v))
    dst = next(v for v in marks.values() if v is not src and any(ev == "waiting" for ev, _ in v))
    stopped = max(t for ev, t in src if ev == "exited")
    assert max(t for ev, t in dst if ev == "process") < stopped < max(t for ev, t in dst if ev == "restored")


@pytest.mark.long
def test_killed_agent_requeues_from_last_checkpoint(client: GpuClient, gpu_stack: Stack, tmp_path: Path) -> None:
    ref = _reference(tmp_path, 400, 5)
    out = tmp_path / "out.pt"
    jid = client.submit(entry_point=ENTRY, args=["400", "5", str(out), "0.01", "10"])
    poll_until(lambda: client.status(jid).checkpoint_step >= 20, timeout=60, what="a checkpoint")
    info = client.status(jid)
    node, ckpt = info.node_id, info.checkpoint_step
    cluster = json.loads((gpu_stack.run_dir / "cluster.json").read_text())
    agent = next(p for p in cluster["procs"] if p["name"].startswith("gpu-agent") and p["node_id"] == node)
    os.kill(agent["pid"], signal.SIGKILL)
    poll_until(lambda: client.status(jid).requeues >= 1, timeout=30, what="requeued")
    poll_until(lambda: _state(client, jid) in ("SUCCEEDED", "FAILED"), timeout=120, what="finished")
    assert _state(client, jid) == "SUCCEEDED", client.status(jid).message
    assert int(Path(f"{out}.start").read_text()) >= ckpt  # it went on from a checkpoint, not from step 0
    assert _same(ref, torch.load(out))



def test_container_job_without_an_engine_fails_with_the_reason(client: GpuClient) -> None:
    from tessera.gpu_scheduler.executors import docker_unavailable

    why = docker_unavailable()
    if why is None:
        pytest.skip("a Docker engine is reachable here: test_container_jobs_run_under_docker runs instead")
    jid = client.submit(image="python:3.11-slim", args=["python", "-c", "print(1)"])
    poll_until(lambda: _state(client, jid) == "FAILED", timeout=30, what="container job refused")
    assert why.split(":")[0] in client.status(jid).message


def test_container_jobs_run_under_docker(client: GpuClient) -> None:
    from tessera.gpu_scheduler.executors import docker_unavailable

    why = docker_unavailable()
    if why is not None:
        pytest.skip(why)
    # the job's environment reaches into the container: its id, the cluster's address, the instruction/report pipes
    check = ("import os, stat, sys; e = os.environ; "
             "sys.exit(0 if e['TESSERA_GPU_JOB_ID'] and e['TESSERA_ADDRESS'] and "
             "stat.S_ISFIFO(os.stat(e['TESSERA_GPU_CTL_PATH']).st_mode) and "
             "stat.S_ISFIFO(os.stat(e['TESSERA_GPU_REPORT_PATH']).st_mode) else 4)")
    ok = client.submit(image="python:3.11-slim", args=["python", "-c", check])
    bad = client.submit(image="python:3.11-slim", args=["python", "-c", "raise SystemExit(3)"])
    poll_until(lambda: {_state(client, ok), _state(client, bad)} <= {"SUCCEEDED", "FAILED"}, timeout=300,
               what="container jobs finished")
    assert _state(client, ok) == "SUCCEEDED", client.status(ok).message
    assert _state(client, bad) == "FAILED" and client.status(bad).exit_code == 3


def _gpus_seen(c: GpuClient, jid: str) -> float:
    return float(c.status(jid).metrics.get("gpus", 0.0))


@pytest.mark.long
@pytest.mark.timeout(900)  # a stack of its own, and jobs that start one after the other
def test_an_elastic_job_grows_when_idle_and_shrinks_when_another_waits(elastic_client: GpuClient, tmp_path: Path) -> None:
    c = elastic_client
    ref = _reference(tmp_path, 400, 11)
    out = tmp_path / "out.pt"
    first = c.submit(entry_point=ENTRY, args=["100000", "12", "", "0.01"], name="first")
    poll_until(lambda: c.status(first).step > 0, timeout=240, what="first job running")
    big = c.submit(entry_point=ENTRY, args=["400", "11", str(out), "0.005"], elastic=True, name="elastic")
    poll_until(lambda: c.status(big).step > 0 and _gpus_seen(c, big) == 1.0, timeout=240, what="elastic job on one GPU")
    c.kill(first)
    # alone on the node now: it grows onto the freed GPU in place, and learns it at a mini-batch boundary
    poll_until(lambda: len(c.status(big).gpu_slots) == 2 and _gpus_seen(c, big) == 2.0, timeout=120, what="grown to 2 GPUs")
    assert c.status(big).resizes == 1
    other = c.submit(entry_point=ENTRY, args=["100000", "13", "", "0.01"], name="other")
    # another job waits: the elastic one gives its second GPU back (no suspension), and the other runs beside it
    poll_until(lambda: _gpus_seen(c, big) == 1.0 and c.status(other).step > 0, timeout=240, what="shrunk, other running")
    info = c.status(big)
    # its 400 mini-batches may all be done by now (it shrank first): then it holds no GPU at all
    ended = _state(c, big) == "SUCCEEDED" and not info.gpu_slots
    assert (len(info.gpu_slots) == 1 or ended) and info.resizes == 2 and info.suspensions == 0, info
    assert set(info.gpu_slots).isdisjoint(c.status(other).gpu_slots)
    c.kill(other)
    poll_until(lambda: _state(c, big) in ("SUCCEEDED", "FAILED"), timeout=240, what="elastic job finished")
    assert _state(c, big) == "SUCCEEDED", c.status(big).message
    assert _same(ref, torch.load(out))  # growing and shrinking changed nothing in what it computed


@pytest.mark.long
@pytest.mark.timeout(900)
def test_early_feedback_stops_and_deprioritizes_poor_group_members(elastic_client: GpuClient) -> None:
    c = elastic_client
    args = ["100000", "0", "", "0.02", "0"]
    good = c.submit(entry_point=ENTRY, args=[*args, "0.9"], group="hp", name="good")
    awful = c.submit(entry_point=ENTRY, args=[*args, "0.3"], group="hp", name="awful")
    # both report their accuracy; the one below half the group's best is stopped
    poll_until(lambda: _state(c, awful) == "KILLED", timeout=240, what="the poor trial stopped")
    assert "early feedback" in c.status(awful).message
    mid = c.submit(entry_point=ENTRY, args=[*args, "0.7"], group="hp", name="mid")
    poll_until(lambda: c.status(mid).step > 0 and "accuracy" in c.status(mid).metrics, timeout=240, what="mid reported")
    # an unrelated job arrives: three jobs, two GPUs. mid trails the best by more than 10%: it waits while
    # the others keep running, time slice after time slice
    other = c.submit(entry_point=ENTRY, args=args, name="other")
    poll_until(lambda: _state(c, mid) in ("SUSPENDED", "QUEUED") and c.status(other).step > 0, timeout=240,
               what="mid off its GPU, other running")
    held = c.status(mid).step
    g0, o0 = c.status(good).step, c.status(other).step
    time.sleep(6.0)  # three quanta
    assert c.status(mid).step == held and _state(c, mid) in ("SUSPENDED", "QUEUED")
    assert c.status(good).step > g0 and c.status(other).step > o0
    assert _state(c, good) == "RUNNING"
