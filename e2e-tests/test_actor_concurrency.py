"""Async and threaded actors, concurrency groups, max_task_retries and cancelling running tasks, on a two-node
cluster brought up by `tessera up --nodes 2` (in behaviour, Ray's test_async_actor, test_actor and test_cancel)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
import stacks

import tessera
from tessera.exceptions import TaskCancelledError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
# Test modules are not importable by the workers: ship this one's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "actors", "--nodes", "2", TESSERA_NUM_CPUS="2",
                        TESSERA_OBJECT_STORE_MEMORY=str(64 * 2**20)) as c:
        with c.driving("e2e-actor-concurrency"):
            yield c


def wait_for(path: Path, timeout: float = 60.0) -> str:
    """The text a task wrote to ``path`` once it started (the test waits for it, up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path.name} was not written within {timeout:g}s"
        time.sleep(0.05)
    return path.read_text()


# ---------------------------------------------------------------------- async actors


@tessera.remote
class AsyncCounter:
    """Counts how many of its calls run at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def sleep(self, s: float) -> int:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(s)
        finally:
            self.now -= 1
        return self.peak

    async def wait_cancelled(self, marker: str) -> str:
        Path(marker).write_text("started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            Path(marker + ".cancelled").write_text("yes")
            raise
        return "not cancelled"

    def get_peak(self) -> int:  # a plain method of an async actor: runs on the loop's thread
        return self.peak


def test_async_actor_calls_run_concurrently(cluster: stacks.Cluster) -> None:
    a = AsyncCounter.remote()
    tessera.get(a.get_peak.remote(), timeout=60)
    t0 = time.monotonic()
    tessera.get([a.sleep.remote(0.5) for _ in range(10)], timeout=60)
    took = time.monotonic() - t0
    assert took < 2.5, f"10 calls of 0.5 s took {took:.2f}s: they did not overlap"
    assert tessera.get(a.get_peak.remote(), timeout=30) == 10


def test_async_actor_max_concurrency_holds(cluster: stacks.Cluster) -> None:
    a = AsyncCounter.options(max_concurrency=2).remote()
    tessera.get([a.sleep.remote(0.2) for _ in range(6)], timeout=60)
    assert tessera.get(a.get_peak.remote(), timeout=30) == 2


def test_cancel_of_an_async_actor_call_cancels_its_coroutine(cluster: stacks.Cluster, tmp_path: Path) -> None:
    a = AsyncCounter.remote()
    marker = tmp_path / "async-call"
    ref = a.wait_cancelled.remote(str(marker))
    wait_for(marker)
    t0 = time.monotonic()
    tessera.cancel(ref)
    with pytest.raises(TaskCancelledError):
        tessera.get(ref, timeout=30)
    assert time.monotonic() - t0 < 10
    assert wait_for(Path(str(marker) + ".cancelled"), 10) == "yes"
    assert tessera.get(a.sleep.remote(0.01), timeout=30) >= 1  # the actor serves on
    one = AsyncCounter.options(max_concurrency=1).remote()
    tessera.get(one.get_peak.remote(), timeout=60)
    busy = one.sleep.remote(3.0)
    waiting = one.sleep.remote(0.0)  # waits for room in the actor's worker: cancelled there, not after busy
    time.sleep(0.2)
    tessera.cancel(waiting)
    with pytest.raises(TaskCancelledError):
        tessera.get(waiting, timeout=30)
    assert tessera.wait([busy], timeout=0)[0] == []
    assert tessera.get(busy, timeout=30) == 1
    with pytest.raises(ValueError, match="force=True is not supported for actor tasks"):
        tessera.cancel(a.sleep.remote(5), force=True)


# ---------------------------------------------------------------------- threaded actors and groups


@tessera.remote(concurrency_groups={"io": 2, "compute": 1})
class Grouped:
    """Counts how many of its calls run at once, per concurrency group."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.order: list[int] = []

    def _run(self, group: str, s: float, i: int = 0) -> None:
        with self.lock:
            self.now[group] = self.now.get(group, 0) + 1
            self.peak[group] = max(self.peak.get(group, 0), self.now[group])
            self.order.append(i)
        time.sleep(s)
        with self.lock:
            self.now[group] -= 1

    @tessera.method(concurrency_group="io")
    def io(self, s: float) -> None:
        self._run("io", s)

    @tessera.method(concurrency_group="compute")
    def compute(self, s: float) -> None:
        self._run("compute", s)

    def plain(self, s: float, i: int = 0) -> None:
        self._run("default", s, i)

    def peaks(self) -> dict[str, int]:
        return dict(self.peak)

    def seen(self) -> list[int]:
        return list(self.order)


def test_threaded_actor_runs_up_to_max_concurrency_calls_at_once(cluster: stacks.Cluster) -> None:
    a = Grouped.options(max_concurrency=4).remote()
    tessera.get(a.peaks.remote(), timeout=60)
    t0 = time.monotonic()
    tessera.get([a.plain.remote(0.4) for _ in range(8)], timeout=60)
    took = time.monotonic() - t0
    assert took < 2.5, f"8 calls of 0.4 s on 4 threads took {took:.2f}s"
    assert tessera.get(a.peaks.remote(), timeout=30)["default"] == 4


def test_a_plain_actor_runs_one_call_at_a_time_in_order(cluster: stacks.Cluster) -> None:
    a = Grouped.remote()  # groups, but max_concurrency 1 for the default group
    tessera.get([a.plain.remote(0.01, i) for i in range(20)], timeout=60)
    assert tessera.get(a.peaks.remote(), timeout=30)["default"] == 1
    assert tessera.get(a.seen.remote(), timeout=30) == list(range(20))


def test_concurrency_groups_have_limits_of_their_own(cluster: stacks.Cluster) -> None:
    a = Grouped.remote()
    refs = [a.io.remote(0.3) for _ in range(4)] + [a.compute.remote(0.3) for _ in range(2)]
    refs += [a.io.options(concurrency_group="compute").remote(0.3)]  # this call runs in "compute"
    t0 = time.monotonic()
    tessera.get(refs, timeout=60)
    took = time.monotonic() - t0
    peaks = tessera.get(a.peaks.remote(), timeout=30)
    assert peaks["io"] == 2
    assert peaks["compute"] == 1
    assert took < 2.0, f"groups did not run side by side ({took:.2f}s)"
    assert took >= 0.85, f"the compute group (limit 1) ran 3 calls of 0.3 s in {took:.2f}s"


def test_bad_concurrency_options_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="max_concurrency must be an int between 1"):
        tessera.remote(max_concurrency=0)(AsyncCounter._cls)
    with pytest.raises(ValueError, match="max_concurrency must be an int between 1"):
        AsyncCounter.options(max_concurrency=-1)
    with pytest.raises(ValueError, match="max_concurrency"):
        Grouped.options(max_concurrency=True)
    with pytest.raises(ValueError, match="concurrency group 'io' needs a limit"):
        Grouped.options(concurrency_groups={"io": 0, "compute": 1})

    class Stray:
        @tessera.method(concurrency_group="nope")
        def m(self) -> None: ...

    with pytest.raises(ValueError, match="does not define"):
        tessera.remote(Stray)


def test_an_undefined_group_for_a_call_is_refused(cluster: stacks.Cluster) -> None:
    a = Grouped.remote()
    with pytest.raises(ValueError, match="no concurrency group 'nope'"):
        a.plain.options(concurrency_group="nope")


# ---------------------------------------------------------------------- max_task_retries


@tessera.remote(max_restarts=1, max_task_retries=1)
class DiesOnce:
    def call(self, marker: str) -> str:
        if not os.path.exists(marker):
            Path(marker).write_text("died")
            os._exit(1)
        return f"ran again in {os.getpid()}"


def test_a_call_in_flight_when_its_actor_dies_runs_again_on_the_restarted_actor(cluster: stacks.Cluster,
                                                                               tmp_path: Path) -> None:
    a = DiesOnce.remote()
    assert tessera.get(a.call.remote(str(tmp_path / "dies")), timeout=60).startswith("ran again")


# ---------------------------------------------------------------------- cancelling tasks


@tessera.remote(max_retries=0)
def sleeper(marker: str, s: float) -> str:
    Path(marker).write_text(str(os.getpid()))
    try:
        time.sleep(s)
    except KeyboardInterrupt:
        Path(marker + ".interrupted").write_text("yes")
        raise
    Path(marker + ".done").write_text("yes")
    return "slept"


@tessera.remote(max_retries=0)
def parent(marker: str, s: float = 60) -> str:
    return str(tessera.get(sleeper.remote(marker, s)))


@tessera.remote
def pid() -> int:
    return os.getpid()


def test_cancel_interrupts_a_running_task_and_its_worker_serves_on(cluster: stacks.Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "t"
    ref = sleeper.remote(str(marker), 60)
    worker = int(wait_for(marker))
    t0 = time.monotonic()
    tessera.cancel(ref)
    with pytest.raises(TaskCancelledError):
        tessera.get(ref, timeout=30)
    assert time.monotonic() - t0 < 10
    assert wait_for(Path(f"{marker}.interrupted"), 10) == "yes"  # KeyboardInterrupt, in the task's thread
    assert stacks.alive(worker)
    assert tessera.get([pid.remote() for _ in range(8)], timeout=60)  # workers still run tasks


def test_force_cancel_kills_the_worker(cluster: stacks.Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "f"
    ref = sleeper.remote(str(marker), 60)
    worker = int(wait_for(marker))
    tessera.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        tessera.get(ref, timeout=30)
    deadline = time.monotonic() + 15
    while stacks.alive(worker):
        assert time.monotonic() < deadline, "the worker of a force-cancelled task still runs"
        time.sleep(0.1)
    assert tessera.get(sleeper.remote(str(tmp_path / "after"), 0), timeout=60) == "slept"


def test_recursive_cancel_cancels_the_tasks_it_submitted(cluster: stacks.Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "child"
    ref = parent.remote(str(marker))
    wait_for(marker)  # the child runs
    tessera.cancel(ref)
    with pytest.raises(TaskCancelledError):
        tessera.get(ref, timeout=30)
    assert wait_for(Path(f"{marker}.interrupted"), 15) == "yes"


def test_cancel_with_recursive_false_leaves_its_children_running(cluster: stacks.Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "kept"
    ref = parent.remote(str(marker), 2)
    wait_for(marker)
    tessera.cancel(ref, recursive=False)
    with pytest.raises(TaskCancelledError):
        tessera.get(ref, timeout=30)
    assert wait_for(Path(f"{marker}.done"), 30) == "yes"
    assert not Path(f"{marker}.interrupted").exists()


def test_cancel_of_a_finished_task_is_a_no_op(cluster: stacks.Cluster, tmp_path: Path) -> None:
    ref = sleeper.remote(str(tmp_path / "done"), 0)
    assert tessera.get(ref, timeout=60) == "slept"
    tessera.cancel(ref)
    tessera.cancel(ref, force=True)
    assert tessera.get(ref, timeout=10) == "slept"


def test_cancel_of_a_queued_actor_call(cluster: stacks.Cluster) -> None:
    a = Grouped.remote()  # one call at a time: the second waits its turn in the actor's worker
    first = a.plain.remote(1.0)
    second = a.plain.remote(0.0, 7)
    tessera.cancel(second)
    with pytest.raises(TaskCancelledError):
        tessera.get(second, timeout=30)
    assert tessera.get(first, timeout=30) is None
    assert 7 not in tessera.get(a.seen.remote(), timeout=30)
