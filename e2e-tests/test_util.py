"""Ray's utilities on a two-node `tessera up` with two (virtual) GPUs a node: the runtime context, the cluster's
nodes and resources, GPUs in tasks and actors, requests no node can meet, ActorPool and Queue."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
import stacks

import tessera
from tessera.exceptions import ActorDiedError, TaskUnschedulableError
from tessera.util import ActorPool
from tessera.util.queue import Empty, Full, Queue

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CPUS, GPUS = 2, 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "util", "--nodes", "2", TESSERA_NUM_CPUS=str(CPUS),
                        TESSERA_NUM_GPUS=str(GPUS), TESSERA_OBJECT_STORE_MEMORY=str(64 * 2**20)) as c:
        with c.driving("e2e-util"):
            yield c


def eventually(check: Any, timeout: float = 10.0) -> Any:
    """``check()`` once it is truthy (the cluster's records lag its state by up to a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@tessera.remote
def context() -> dict[str, Any]:
    ctx = tessera.get_runtime_context()
    return {"job": ctx.get_job_id(), "node": ctx.get_node_id(), "task": ctx.get_task_id(), "actor": ctx.get_actor_id(),
            "gpus": tessera.get_gpu_ids(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


@tessera.remote(num_gpus=1)
def one_gpu() -> tuple[list[Any], str | None]:
    return tessera.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")


@tessera.remote(num_gpus=0.5)
def half_gpu(hold_s: float) -> tuple[str, list[Any], float, float]:
    start = time.time()
    time.sleep(hold_s)
    return tessera.get_runtime_context().get_node_id(), tessera.get_gpu_ids(), start, time.time()


@tessera.remote
class Probe:
    def context(self) -> dict[str, Any]:
        return context._fn()  # type: ignore[attr-defined, no-any-return]

    def double(self, x: int) -> int:
        return 2 * x

    def slow_double(self, x: int) -> int:
        time.sleep(0.05 * x)
        return 2 * x


# ---------------------------------------------------------------------- the runtime context


def test_runtime_context_in_the_driver_a_task_and_an_actor(cluster: stacks.Cluster) -> None:
    ctx = tessera.get_runtime_context()
    job, node = ctx.get_job_id(), ctx.get_node_id()
    assert len(job) == 8 and len(node) == 32 and ctx.job_id == job and ctx.node_id.hex() == node
    assert ctx.get_task_id() is None and ctx.get_actor_id() is None
    assert node in cluster.node_ids()

    a, b = tessera.get([context.remote(), context.remote()])
    for t in (a, b):
        assert t["job"] == job and t["node"] in cluster.node_ids() and t["actor"] is None
        assert t["task"] is not None and len(t["task"]) == 32
    assert a["task"] != b["task"]

    p = Probe.remote()
    inside = tessera.get(p.context.remote())
    assert inside["actor"] == p.actor_id.hex() and inside["job"] == job and inside["task"] not in (None, a["task"])
    tessera.kill(p)


# ---------------------------------------------------------------------- nodes and resources


def test_nodes_and_cluster_resources_sum_the_alive_nodes(cluster: stacks.Cluster) -> None:
    nodes = eventually(lambda: [n for n in tessera.nodes() if n["Alive"] and "CPU" in n["Resources"]])
    assert sorted(n["NodeID"] for n in nodes) == sorted(cluster.node_ids())
    for n in nodes:
        assert n["Resources"]["CPU"] == CPUS and n["Resources"]["GPU"] == GPUS
        assert n["Resources"]["object_store_memory"] == 64 * 2**20 and n["NodeManagerAddress"]
    total = tessera.cluster_resources()
    assert total["CPU"] == 2 * CPUS and total["GPU"] == 2 * GPUS and total["object_store_memory"] == 2 * 64 * 2**20


def test_available_resources_follow_what_actors_hold(cluster: stacks.Cluster) -> None:
    assert eventually(lambda: tessera.available_resources().get("CPU") == 2 * CPUS)
    holder = Probe.options(num_cpus=1, num_gpus=1).remote()
    tessera.get(holder.double.remote(1))
    free = eventually(lambda: (lambda r: r if r.get("CPU") == 2 * CPUS - 1 else None)(tessera.available_resources()))
    assert free and free["GPU"] == 2 * GPUS - 1, tessera.available_resources()
    tessera.kill(holder)
    assert eventually(lambda: tessera.available_resources() == {"CPU": 2 * CPUS, "GPU": 2 * GPUS}), \
        tessera.available_resources()


# ---------------------------------------------------------------------- GPUs


def test_a_gpu_task_sees_only_its_gpu(cluster: stacks.Cluster) -> None:
    ids, visible = tessera.get(one_gpu.remote())
    assert len(ids) == 1 and ids[0] in range(GPUS) and visible == str(ids[0])
    plain = tessera.get(context.remote())
    assert plain["gpus"] == [] and plain["cuda"] is None  # a CPU task is given no GPU
    assert tessera.get_gpu_ids() == []  # a driver holds none


def test_a_gpu_actor_keeps_its_gpu(cluster: stacks.Cluster) -> None:
    a = Probe.options(num_gpus=1).remote()
    first, again = tessera.get([a.context.remote(), a.context.remote()])
    assert len(first["gpus"]) == 1 and first["cuda"] == str(first["gpus"][0]) and again["gpus"] == first["gpus"]
    tessera.kill(a)


def test_two_half_gpu_tasks_share_one_gpu(cluster: stacks.Cluster) -> None:
    (n1, ids1, s1, e1), (n2, ids2, s2, e2) = tessera.get([half_gpu.remote(1.0), half_gpu.remote(1.0)])
    assert n1 == n2 and len(ids1) == 1 and ids1 == ids2
    assert s1 < e2 and s2 < e1  # at the same time, on the same GPU


# ---------------------------------------------------------------------- requests no node can meet


def test_infeasible_requests_fail_at_once_naming_the_resource(cluster: stacks.Cluster) -> None:
    start = time.monotonic()
    with pytest.raises(TaskUnschedulableError) as cpus:
        tessera.get(context.options(num_cpus=1000).remote(), timeout=10)
    with pytest.raises(TaskUnschedulableError) as custom:
        tessera.get(context.options(resources={"TPU_POD": 1}).remote(), timeout=10)
    assert time.monotonic() - start < 2 * 2.0
    assert "CPU=1000" in str(cpus.value) and f"CPU={CPUS}" in str(cpus.value) and f"GPU={GPUS}" in str(cpus.value)
    assert "TPU_POD=1" in str(custom.value) and f"CPU={CPUS}" in str(custom.value)


def test_an_infeasible_actor_fails_at_once(cluster: stacks.Cluster) -> None:
    start = time.monotonic()
    a = Probe.options(num_gpus=GPUS + 1).remote()
    with pytest.raises((ActorDiedError, TaskUnschedulableError)) as e:
        tessera.get(a.double.remote(1), timeout=10)
    assert time.monotonic() - start < 2.0 and f"GPU={GPUS + 1}" in str(e.value)


# ---------------------------------------------------------------------- ActorPool


def test_actor_pool_map_ordered_and_unordered(cluster: stacks.Cluster) -> None:
    actors = [Probe.remote(), Probe.remote()]
    pool = ActorPool(actors)
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4, 5])) == [2, 4, 6, 8, 10]
    got = list(pool.map_unordered(lambda a, v: a.slow_double.remote(v), [6, 1, 2]))
    assert sorted(got) == [2, 4, 12] and got[-1] == 12  # the slowest comes last
    pool.submit(lambda a, v: a.double.remote(v), 7)
    assert pool.has_next() and pool.get_next() == 14 and not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()
    idle = pool.pop_idle()
    assert idle is not None and pool.has_free()
    other = actors[1] if idle is actors[0] else actors[0]
    with pytest.raises(ValueError):
        pool.push(other)  # still in the pool
    pool.push(idle)
    assert pool.pop_idle() is not None and pool.pop_idle() is not None and pool.pop_idle() is None
    for a in actors:
        tessera.kill(a)


# ---------------------------------------------------------------------- Queue


@tessera.remote
def produce(q: Queue, n: int) -> int:
    for i in range(n):
        q.put(i)
    return n


def test_queue_put_get_across_tasks_and_timeouts(cluster: stacks.Cluster) -> None:
    q = Queue()
    assert q.empty() and q.qsize() == 0 and not q.full()
    done = produce.remote(q, 5)
    assert [q.get(timeout=10) for _ in range(5)] == list(range(5)) and tessera.get(done) == 5
    start = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2.0
    with pytest.raises(Empty):
        q.get_nowait()
    q.put_nowait_batch(["a", "b", "c"])
    assert len(q) == 3 and q.get_nowait_batch(2) == ["a", "b"] and q.get(block=False) == "c"
    with pytest.raises(Empty):
        q.get_nowait_batch(1)
    q.shutdown()

    small = Queue(maxsize=1)
    small.put("x")
    assert small.full()
    start = time.monotonic()
    with pytest.raises(Full):
        small.put("y", timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2.0
    with pytest.raises(Full):
        small.put_nowait("y")
    with pytest.raises(Full):
        small.put_nowait_batch(["y"])
    with pytest.raises(ValueError):
        small.put("y", timeout=-1)
    assert small.get() == "x" and small.empty()
    small.shutdown()


@tessera.remote
def square(x: int) -> int:
    return x * x


@tessera.remote
class Tally:
    def add(self, n: int) -> int:
        return n


def test_list_and_summary_show_what_runs(cluster: stacks.Cluster) -> None:
    """`tessera list` / `tessera summary` and tessera.util.state read back what this driver made."""
    import json

    import numpy as np

    from tessera.util import state

    refs = [square.remote(i) for i in range(5)]
    assert tessera.get(refs) == [0, 1, 4, 9, 16]
    tally = Tally.options(name="state-tally").remote()
    assert tessera.get(tally.add.remote(3)) == 3
    big = tessera.put(np.zeros(2**20, dtype=np.uint8))
    job = tessera.get_runtime_context().get_job_id()

    def squares() -> list[dict[str, Any]]:
        rows = state.list_tasks(filters=[("job_id", "=", job), ("state", "=", "finished")], limit=1000)
        return [r for r in rows if r["name"].endswith("square")]

    done = eventually(lambda: len(squares()) >= 5 and squares())
    assert len(done) == 5 and {r["type"] for r in done} == {"NORMAL_TASK"}
    assert {r["task_id"] for r in done} == {ref.id[:16].hex() for ref in refs}
    assert all(r["node_id"] and r["attempt_number"] == 0 for r in done)

    from opentelemetry.sdk.trace import TracerProvider

    with TracerProvider().get_tracer("e2e").start_as_current_span("traced") as span:  # submitted under a span
        traced = square.remote(6)
    assert tessera.get(traced) == 36
    want = format(span.get_span_context().trace_id, "032x")
    rows = eventually(lambda: state.list_tasks(filters=[("task_id", "=", traced.id[:16].hex())]))
    assert [r["trace_id"] for r in rows] == [want] and all(r["trace_id"] == "" for r in done)

    out = cluster.cli("list", "actors", "--json", "--filter", "name=state-tally")
    assert out.returncode == 0, out.stderr
    (actor,) = json.loads(out.stdout)
    assert actor["class_name"].endswith("Tally") and actor["state"] == "ALIVE" and actor["job_id"] == job

    out = cluster.cli("list", "nodes", "--filter", "state=alive")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 1 + 2  # the header and the two nodes
    objs = eventually(lambda: state.list_objects(filters=[("object_id", "=", big.hex())]))  # (tables: every 2 s)
    assert [(o["object_size"] >= 2**20, o["owned"]) for o in objs] == [(True, True)]
    jobs = state.list_jobs(filters=[("job_id", "=", job)])
    assert [j["state"] for j in jobs] == ["RUNNING"]

    out = cluster.cli("summary", "tasks", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)["summary"]
    (name,) = [k for k in summary if k.endswith("square")]
    assert summary[name]["state_counts"].get("FINISHED", 0) >= 5
    assert cluster.cli("summary", "actors").returncode == 0

    trace = cluster.env["TESSERA_RUN_DIR"] + "/trace.json"
    out = cluster.cli("timeline", "-o", trace, "--job", job)
    assert out.returncode == 0, out.stderr
    events = {e["args"]["task_id"]: e for e in json.loads(open(trace).read())}
    for ref in refs:
        e = events[ref.id[:16].hex()]
        assert e["ph"] == "X" and e["name"].endswith("square") and e["dur"] >= 0 and e["pid"].startswith("node ")
    bad = cluster.cli("timeline", "--job", "zz")
    assert bad.returncode == 2 and "job_id must be hex" in bad.stderr

    bad = cluster.cli("list", "tasks", "--filter", "colour=red")
    assert bad.returncode == 2 and "valid keys: task_id" in bad.stderr
    bad = cluster.cli("list", "tasks", "--filter", "state=asleep")
    assert bad.returncode == 2 and "unknown task state 'asleep'" in bad.stderr
    bad = cluster.cli("list", "widgets")
    assert bad.returncode == 2 and "invalid choice: 'widgets'" in bad.stderr
    with pytest.raises(ValueError, match="limit must be between 1 and 10000, got 0"):
        state.list_nodes(limit=0)
    tessera.kill(tally)


@tessera.remote
def chatty(tag: str) -> int:
    import sys

    print(f"out {tag} 1")
    print(f"out {tag} 2")
    print(f"err {tag}", file=sys.stderr)
    return 1


@tessera.remote
class Talker:
    def say(self, text: str) -> str:
        print(f"actor says {text}")
        return text


def test_logs_of_a_task_and_an_actor(cluster: stacks.Cluster) -> None:
    """`tessera logs --task/--actor`: a worker's stdout and stderr, one task's part of it, from its node."""
    from tessera.util import state

    refs = [chatty.remote(f"t{i}") for i in range(4)]
    assert tessera.get(refs) == [1] * 4
    first = refs[0].id[:16].hex()

    def task_lines(*extra: str) -> list[str]:
        out = cluster.cli("logs", "--task", first, *extra)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert eventually(lambda: task_lines() == ["out t0 1", "out t0 2"]), task_lines()  # its lines only
    assert task_lines("--err") == ["err t0"]
    assert list(state.get_log(task_id=refs[3].id[:16].hex(), tail=1)) == ["out t3 2"]

    talker = Talker.remote()
    assert tessera.get([talker.say.remote("hi"), talker.say.remote("there")]) == ["hi", "there"]
    actor = talker.actor_id.hex()
    out = cluster.cli("logs", "--actor", actor)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == ["actor says hi", "actor says there"]
    tessera.kill(talker)
    out = cluster.cli("logs", "--actor", actor, "-n", "1")  # kept after the actor died
    assert out.returncode == 0 and out.stdout.splitlines() == ["actor says there"], out

    bad = cluster.cli("logs", "--task", "zz")
    assert bad.returncode == 2 and "task_id must be hex" in bad.stderr
    bad = cluster.cli("logs", "--task", "00" * 16)
    assert bad.returncode == 1 and "no such task" in bad.stderr, bad.stderr
    bad = cluster.cli("logs")
    assert bad.returncode == 2 and "give a service" in bad.stderr
    with pytest.raises(ValueError, match="give one of task_id, actor_id and worker_id"):
        list(state.get_log())
