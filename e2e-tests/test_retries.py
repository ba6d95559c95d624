"""retry_exceptions (Ray's option: application errors are retried within max_retries) and tessera.timeline
(the job's tasks as a Chrome trace), on a two-node `tessera up`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
import stacks

import tessera
from tessera.exceptions import TaskError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "retries", "--nodes", "2", "--services",
                        "control-store,object-store,task-scheduler", TESSERA_NUM_CPUS="2") as c:
        with c.driving("e2e-retries"):
            yield c


class Flaky(Exception):
    pass


def attempts(path: Path) -> int:
    return len(path.read_text()) if path.exists() else 0


@tessera.remote(max_retries=3, retry_exceptions=True)
def flaky(path: str, failures: int, exc: str = "Flaky") -> int:
    """Fails its first ``failures`` attempts (counted in a file both nodes see) with ``exc`` (Flaky or
    KeyError), then returns the attempt."""
    p = Path(path)
    with p.open("a") as f:
        f.write("x")
    n = attempts(p)
    if n <= failures:
        raise {"Flaky": Flaky, "KeyError": KeyError}[exc](f"attempt {n}")
    return n


@tessera.remote
class Service:
    def __init__(self) -> None:
        self.calls = 0

    @tessera.method(retry_exceptions=[Flaky])
    def shaky(self, failures: int) -> int:
        """Fails its first ``failures`` calls."""
        self.calls += 1
        if self.calls <= failures:
            raise Flaky(f"call {self.calls}")
        return self.calls


@tessera.remote
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_an_application_error_is_retried_until_it_succeeds(cluster: stacks.Cluster, tmp_path: Path) -> None:
    path = tmp_path / "a"
    assert tessera.get(flaky.remote(str(path), 2), timeout=60) == 3
    assert attempts(path) == 3


def test_max_retries_bounds_the_retries(cluster: stacks.Cluster, tmp_path: Path) -> None:
    path = tmp_path / "b"
    with pytest.raises(Flaky, match="attempt 2"):
        tessera.get(flaky.options(max_retries=1).remote(str(path), 5), timeout=60)
    assert attempts(path) == 2


def test_without_retry_exceptions_an_application_error_is_not_retried(cluster: stacks.Cluster,
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "c"
    with pytest.raises(Flaky, match="attempt 1"):
        tessera.get(flaky.options(retry_exceptions=False).remote(str(path), 1), timeout=60)
    assert attempts(path) == 1


def test_a_list_retries_only_its_exception_types(cluster: stacks.Cluster, tmp_path: Path) -> None:
    only_flaky = flaky.options(retry_exceptions=[Flaky])
    path = tmp_path / "d"
    assert tessera.get(only_flaky.remote(str(path), 1), timeout=60) == 2
    path = tmp_path / "e"
    with pytest.raises(KeyError):
        tessera.get(only_flaky.remote(str(path), 1, "KeyError"), timeout=60)
    assert attempts(path) == 1, "an exception not in the list was retried"
    path = tmp_path / "f"  # a subclass counts (isinstance)
    assert tessera.get(flaky.options(retry_exceptions=[Exception]).remote(str(path), 1), timeout=60) == 2


def test_actor_methods_retry_exceptions_within_max_task_retries(cluster: stacks.Cluster) -> None:
    s = Service.options(max_task_retries=2).remote()
    assert tessera.get(s.shaky.remote(2), timeout=60) == 3
    with pytest.raises(Flaky, match="call 4"):  # max_task_retries=0: not retried
        tessera.get(s.shaky.options(max_task_retries=0).remote(10), timeout=60)
    with pytest.raises(Flaky, match="call 5"):
        tessera.get(s.shaky.options(retry_exceptions=False).remote(10), timeout=60)
    tessera.kill(s)


def test_bad_retry_exceptions_are_refused(cluster: stacks.Cluster) -> None:
    with pytest.raises(TypeError, match="retry_exceptions"):
        flaky.options(retry_exceptions="yes")
    with pytest.raises(TypeError, match="int is not an exception class|<class 'int'> is not an exception class"):
        flaky.options(retry_exceptions=[Flaky, int])
    with pytest.raises(TypeError, match="retry_exceptions"):
        flaky.options(retry_exceptions=[])
    with pytest.raises(TypeError, match="retry_exceptions"):
        tessera.remote(retry_exceptions=1)(nap)
    with pytest.raises(TypeError, match="retry_exceptions"):
        tessera.method(retry_exceptions="all")


def test_timeline_lists_the_tasks_as_chrome_trace_events(cluster: stacks.Cluster, tmp_path: Path) -> None:
    tessera.get([nap.remote(0.2) for _ in range(6)], timeout=60)
    events = [e for e in tessera.timeline() or [] if e["name"].endswith(".nap")]
    assert len(events) >= 6
    for e in events:
        assert e["ph"] == "X" and e["cat"] == "task"
        assert e["pid"].startswith("node ") and e["tid"].startswith("worker ")
        assert 0.2e6 <= e["dur"] < 30e6, e
        assert e["ts"] > 1.6e15  # Unix microseconds
    by_worker: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for e in events:
        by_worker.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    assert len(by_worker) >= 2, "six tasks on four CPUs ran on one worker"
    for spans in by_worker.values():  # a worker runs one task at a time: its events never overlap
        spans.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    out = tmp_path / "trace.json"
    assert tessera.timeline(str(out)) is None
    written = json.loads(out.read_text())
    assert [e for e in written if e["name"].endswith(".nap")] == events
    with pytest.raises(TypeError, match="filename"):
        tessera.timeline(3)  # type: ignore[arg-type]


@tessera.remote
def fan(n: int) -> list[tessera.ObjectRef]:
    """Submits ``n`` naps and returns their refs (they stay alive, and so do their records)."""
    refs = [nap.remote(0.1) for _ in range(n)]
    tessera.get(refs)
    return refs


def test_the_timeline_has_the_tasks_that_tasks_submitted(cluster: stacks.Cluster) -> None:
    refs = tessera.get(fan.remote(3), timeout=60)
    deadline = time.monotonic() + 30
    while True:  # their node records them in the control store within a moment
        nested = [e for e in tessera.timeline() or [] if e["name"].endswith(".nap")
                  and e["args"]["task_id"] in {r.hex()[:32] for r in refs}]
        if len(nested) == 3:
            break
        assert time.monotonic() < deadline, f"the nested tasks are not in the timeline: {nested}"
        time.sleep(0.2)
    assert all(e["dur"] >= 0.1e6 for e in nested)
    del refs


def test_a_failed_task_is_in_the_timeline_too(cluster: stacks.Cluster, tmp_path: Path) -> None:
    with pytest.raises(TaskError):
        tessera.get(flaky.options(retry_exceptions=False).remote(str(tmp_path / "g"), 1), timeout=60)
    failed = [e for e in tessera.timeline() or [] if e["name"].endswith(".flaky") and e["args"]["failed"]]
    assert failed and all(e["dur"] > 0 for e in failed)
