"""Tasks and actors on a two-node cluster brought up by `tessera up --nodes 2` (Ray's core API)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import grpc
import numpy as np
import pytest
import stacks

import tessera
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2_grpc as pb_grpc
from tessera.common import ids
from tessera.common.procs import stop as stop_process
from tessera.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    TaskCancelledError,
    TaskError,
    TaskUnschedulableError,
    WorkerCrashedError,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
# Test modules are not importable by the workers: ship this one's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

UNSCHEDULABLE_S = 25


class Cluster(stacks.Cluster):
    def agent_status(self, name: str = "task-scheduler") -> pb.GetStatusResponse:
        with grpc.insecure_channel(self.address(name)) as ch:
            return pb_grpc.TaskSchedulerServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=5.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with stacks.running(tmp_path_factory, "tasks", "--nodes", "2", cls=Cluster, TESSERA_NUM_CPUS="2",
                        TESSERA_TASK_SCHEDULER_UNSCHEDULABLE_S=str(UNSCHEDULABLE_S),
                        TESSERA_OBJECT_STORE_MEMORY=str(128 * 2**20)) as c:
        with c.driving("e2e-tasks"):
            yield c


# ---------------------------------------------------------------------- remote functions


@tessera.remote
def add(a: int, b: int) -> int:
    return a + b


@tessera.remote
def where() -> str:
    return os.environ["TESSERA_NODE_ID"]


@tessera.remote(num_returns=2)
def divmod_task(a: int, b: int) -> tuple[int, int]:
    return divmod(a, b)


@tessera.remote
def fan_out(n: int) -> int:
    return sum(tessera.get([add.remote(i, 1) for i in range(n)]))


@tessera.remote
def make_refs(n: int) -> list[tessera.ObjectRef]:
    return [add.remote(i, i) for i in range(n)]


@tessera.remote
def array(n: int, value: float) -> np.ndarray:
    return np.full(n, value)


@tessera.remote
def total(a: np.ndarray) -> float:
    return float(a.sum())


@tessera.remote
def sleepy(s: float, tag: Any = None) -> Any:
    time.sleep(s)
    return tag


@tessera.remote
def fail(msg: str) -> None:
    raise KeyError(msg)


def test_tasks_arguments_and_multiple_returns(cluster: Cluster) -> None:
    assert tessera.get(add.remote(1, 2)) == 3
    assert tessera.get(add.remote(a=5, b=6)) == 11
    r = add.remote(add.remote(1, 2), add.remote(3, 4))  # refs as arguments are resolved first
    assert tessera.get(r) == 10
    q, m = divmod_task.remote(17, 5)
    assert tessera.get([q, m]) == [3, 2]
    put = tessera.put(np.arange(10.0))
    assert tessera.get(total.remote(put)) == 45.0
    big = np.ones(2**20)  # 8 MiB: travels through the object store, read in place by the worker
    assert tessera.get(total.remote(big)) == float(2**20)
    assert tessera.get(add.remote("a", "b")) == "ab"


def test_nested_tasks_and_returned_refs(cluster: Cluster) -> None:
    assert tessera.get(fan_out.remote(20)) == sum(range(1, 21))
    refs = tessera.get(make_refs.remote(5))
    assert all(isinstance(r, tessera.ObjectRef) for r in refs)
    assert tessera.get(refs) == [0, 2, 4, 6, 8]
    nested = [fan_out.remote(10) for _ in range(6)]  # more parents than CPUs: parents lend theirs while waiting
    assert tessera.get(nested, timeout=120) == [55] * 6


def test_large_results_read_in_place(cluster: Cluster) -> None:
    ref = array.remote(3 * 2**20, 2.0)
    a = tessera.get(ref)
    assert a.shape == (3 * 2**20,) and a[0] == 2.0 and not a.flags.writeable
    assert tessera.get(total.remote(ref)) == 6.0 * 2**20


def test_errors_carry_type_and_traceback(cluster: Cluster) -> None:
    ref = fail.remote("missing")
    with pytest.raises(TaskError) as e:
        tessera.get(ref)
    assert isinstance(e.value, KeyError)
    assert "fail raised KeyError" in str(e.value) and ", in fail" in e.value.traceback_str
    assert "worker.py" not in e.value.traceback_str
    with pytest.raises(KeyError):  # a task that depends on a failed one fails with the same error
        tessera.get(add.remote(ref, 1))
    with pytest.raises(TypeError, match="argument 0 of .*add cannot be serialized"):
        add.remote(threading.Lock(), 1)
    with pytest.raises(TypeError, match="cannot be called directly"):
        add(1, 2)
    assert tessera.get(add.remote(2, 2)) == 4  # nothing else disturbed


def test_unknown_function_fails_alone(cluster: Cluster) -> None:
    bogus = tessera.remote(lambda: 1)
    t = bogus._template(tessera._api.state())
    t.function_id = b"\x01" * 32
    with pytest.raises(LookupError, match="is not exported"):
        tessera.get(bogus.remote(), timeout=60)
    assert tessera.get(add.remote(1, 1)) == 2


def test_bad_input(cluster: Cluster) -> None:
    with pytest.raises(TypeError):
        tessera.get("not a ref")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_returns"):
        tessera.wait([add.remote(1, 1)], num_returns=2)
    with pytest.raises(TypeError, match="unknown option"):
        add.options(num_cpu=1)
    with pytest.raises(ValueError, match="num_cpus"):
        add.options(num_cpus=-1)
    with pytest.raises(ValueError):
        tessera.get(add.remote(1, 1), timeout=-1)
    # Straight to the agent: a malformed hello is refused; a malformed task fails alone.
    address = cluster.info()["services"]["task-scheduler"]["address"]
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.TaskSchedulerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Session(iter([pb.ClientFrame(hello=pb.Hello(job_id=b"x"))]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id must be 4 bytes" in e.value.details()
        frames = iter([pb.ClientFrame(hello=pb.Hello(job_id=b"abcd")),
                       pb.ClientFrame(submit=[pb.TaskSpec(task_id=b"short", kind=pb.TASK_KIND_NORMAL, num_returns=1)])])
        call = stub.Session(frames, timeout=10)
        next(call)  # welcome
        result = next(call).results[0]
        assert result.error.kind == pb.ERROR_KIND_INVALID and "task_id must be 16 bytes" in result.error.message
        call.cancel()
        # a frame that is not a message at all ends the session with INVALID_ARGUMENT (no silent hang)
        raw = ch.stream_stream("/tessera.task_scheduler.v1.TaskSchedulerService/Session",
                               response_deserializer=pb.ServerFrame.FromString)
        call = raw(iter([pb.ClientFrame(hello=pb.Hello(job_id=b"abcd")).SerializeToString(), b"\xff\xff\xff\xff"]),
                   timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in e.value.details()
    assert tessera.get(add.remote(3, 3)) == 6


# ---------------------------------------------------------------------- wait, cancel


def test_wait_semantics(cluster: Cluster) -> None:
    fast = [sleepy.remote(0, i) for i in range(3)]
    slow = sleepy.remote(30, "slow")
    ready, not_ready = tessera.wait([slow, *fast], num_returns=3, timeout=20)
    assert set(ready) == set(fast) and not_ready == [slow]
    t = time.monotonic()
    ready, not_ready = tessera.wait([slow], num_returns=1, timeout=0.5)
    assert (ready, not_ready) == ([], [slow]) and time.monotonic() - t < 5
    with pytest.raises(GetTimeoutError):
        tessera.get(slow, timeout=0.3)
    tessera.cancel(slow, force=True)
    with pytest.raises(TaskCancelledError):
        tessera.get(slow, timeout=30)
    ready, _ = tessera.wait(fast, num_returns=len(fast), timeout=10)
    assert ready == fast  # input order


def test_cancel_queued_task(cluster: Cluster) -> None:
    blockers = [sleepy.options(num_cpus=2).remote(2) for _ in range(4)]
    victim = sleepy.options(num_cpus=2).remote(0, "victim")
    tessera.cancel(victim)
    with pytest.raises(TaskCancelledError):
        tessera.get(victim, timeout=60)
    tessera.get(blockers, timeout=60)


# ---------------------------------------------------------------------- actors


@tessera.remote
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start
        self.log: list[int] = []

    def inc(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def record(self, i: int) -> None:
        self.log.append(i)

    def history(self) -> list[int]:
        return self.log

    def crash(self) -> None:
        os._exit(1)

    def pid(self) -> int:
        return os.getpid()


def test_actor_calls_run_in_submission_order(cluster: Cluster) -> None:
    c = Counter.remote(10)
    assert tessera.get([c.inc.remote() for _ in range(5)]) == [11, 12, 13, 14, 15]
    for i in range(300):
        c.record.remote(i)
    assert tessera.get(c.history.remote()) == list(range(300))
    with pytest.raises(AttributeError, match="no method 'nope'"):
        c.nope.remote()


def test_actor_handles_travel_to_tasks(cluster: Cluster) -> None:
    c = Counter.remote()

    @tessera.remote
    def bump(counter: Any, k: int) -> int:
        return tessera.get(counter.inc.remote(k))

    tessera.get([bump.remote(c, 1) for _ in range(4)])
    assert tessera.get(c.inc.remote(0)) == 4


def test_named_actor_and_kill(cluster: Cluster) -> None:
    c = Counter.options(name="the-counter").remote(100)
    assert tessera.get(c.inc.remote()) == 101
    same = tessera.get_actor("the-counter")
    assert tessera.get(same.inc.remote()) == 102
    with pytest.raises(ValueError, match="already exists"):
        Counter.options(name="the-counter").remote()
    with pytest.raises(ValueError, match="no actor named"):
        tessera.get_actor("nobody")
    tessera.kill(c)
    with pytest.raises(ActorDiedError):
        tessera.get(c.inc.remote(), timeout=30)
    with pytest.raises(ActorDiedError):
        tessera.get(same.inc.remote(), timeout=30)


def test_actor_restarts_then_dies(cluster: Cluster) -> None:
    c = Counter.options(max_restarts=1).remote(5)
    pid = tessera.get(c.pid.remote())
    with pytest.raises(ActorDiedError):
        tessera.get(c.crash.remote(), timeout=60)
    assert tessera.get(c.inc.remote(), timeout=60) == 6  # restarted: constructed again
    assert tessera.get(c.pid.remote()) != pid
    with pytest.raises(ActorDiedError):
        tessera.get(c.crash.remote(), timeout=60)
    with pytest.raises(ActorDiedError, match="no restarts left"):
        tessera.get(c.inc.remote(), timeout=60)


def test_actor_constructor_error(cluster: Cluster) -> None:
    @tessera.remote
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("no")

        def f(self) -> int:
            return 1

    b = Broken.remote()
    with pytest.raises(ActorDiedError, match="constructor raised"):
        tessera.get(b.f.remote(), timeout=60)


# ---------------------------------------------------------------------- failures


def test_worker_killed_mid_task_is_retried(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "attempts"

    @tessera.remote(max_retries=2)
    def die_once(path: str) -> str:
        p = Path(path)
        n = int(p.read_text()) if p.exists() else 0
        p.write_text(str(n + 1))
        if n == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return f"attempt {n + 1}"

    assert tessera.get(die_once.remote(str(marker)), timeout=60) == "attempt 2"

    @tessera.remote(max_retries=0)
    def always_die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(WorkerCrashedError, match="no retries left"):
        tessera.get(always_die.remote(), timeout=60)
    assert tessera.get(add.remote(1, 2)) == 3


# ---------------------------------------------------------------------- two nodes


def test_spillover_and_cross_node_arguments(cluster: Cluster) -> None:
    nodes = set(cluster.node_ids())
    assert len(nodes) == 2
    # More sleeping tasks than this node's CPUs and queue: the rest spill to the other node.
    tags = tessera.get([sleepy.remote(0.2, where.remote()) for _ in range(4)])
    assert set(tags) <= nodes

    @tessera.remote
    def node_of_and_sleep(s: float) -> str:
        time.sleep(s)
        return os.environ["TESSERA_NODE_ID"]

    ran = tessera.get([node_of_and_sleep.remote(0.3) for _ in range(40)], timeout=120)
    assert set(ran) == nodes, "no task spilled to the second node"
    # Large arrays made on both nodes, consumed by tasks wherever they run.
    arrays = [array.remote(2**19, float(i)) for i in range(12)]
    sums = tessera.get([total.remote(a) for a in arrays], timeout=120)
    assert sums == [float(i) * 2**19 for i in range(12)]
    assert cluster.agent_status("task-scheduler").tasks_spilled > 0


def test_gpu_task_fails_at_once_then_waits_for_a_joining_gpu_node(cluster: Cluster) -> None:
    @tessera.remote(num_gpus=1)
    def on_gpu() -> str:
        return os.environ["TESSERA_NODE_ID"]

    @tessera.remote(resources={"tpu": 1})
    def on_tpu() -> None:
        return None

    t = time.monotonic()
    with pytest.raises(TaskUnschedulableError, match="GPU=1"):  # no node has one, and none is joining
        tessera.get(on_gpu.remote(), timeout=10)
    assert time.monotonic() - t < 5
    node = ids.new_id("node_id").hex()
    info = cluster.info()
    env = dict(cluster.env, TESSERA_NODE_ID=node, TESSERA_NUM_GPUS="1", TESSERA_NUM_CPUS="1",
               TESSERA_NATS_URL=info["nats_url"], TESSERA_REDIS_URLS=",".join(info["redis_urls"]),
               TESSERA_CONTROL_STORE_ADDRESS=info["control_store_address"], TESSERA_GRPC_PORT="0",
               TESSERA_OBJECT_STORE_MEMORY=str(32 * 2**20))
    store = subprocess.Popen([sys.executable, "-m", "tessera.object_store"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    procs = [store]
    try:
        deadline = time.monotonic() + 60
        while node not in {n["NodeID"] for n in tessera.nodes()}:  # registered: joining, until its agent reports
            assert time.monotonic() < deadline, "the new node did not register"
            time.sleep(0.1)
        time.sleep(1.5)  # the agents look at the node list every second
        ref = on_gpu.remote()
        never = on_tpu.remote()  # no node will ever have it: fails once the joining node has reported
        with pytest.raises(GetTimeoutError):
            tessera.get(ref, timeout=1)
        procs.append(subprocess.Popen([sys.executable, "-m", "tessera.task_scheduler"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert tessera.get(ref, timeout=60) == node
        with pytest.raises(TaskUnschedulableError, match="tpu=1"):
            tessera.get(never, timeout=30)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            stop_process(p, timeout=30)  # SIGKILL if SIGTERM is not enough: nothing outlives the test


def test_lineage_rebuilds_objects_lost_with_a_store(cluster: Cluster, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()

    @tessera.remote
    def produce(n: int, path: str) -> np.ndarray:
        (Path(path) / os.urandom(4).hex()).touch()
        return np.arange(n, dtype=np.float64)

    @tessera.remote
    def double(a: np.ndarray) -> np.ndarray:
        return a * 2

    a = produce.remote(2**18, str(runs))
    b = double.remote(a)
    assert float(tessera.get(b).sum()) == float(np.arange(2**18).sum() * 2)
    assert len(list(runs.iterdir())) == 1
    # Both objects live in this node's store (the tasks ran here); kill it: they are gone.
    where_ran = tessera.get([where.remote() for _ in range(1)])[0]
    name = "object-store" if where_ran == cluster.node_ids()[0] else "object-store-1"
    pid = cluster.kill(name)
    cluster.wait_restarted(name, pid)
    got = tessera.get(b, timeout=120)
    assert float(got.sum()) == float(np.arange(2**18).sum() * 2)
    assert len(list(runs.iterdir())) >= 2, "the producer was not run again"


def test_node_agent_killed_driver_reconnects(cluster: Cluster) -> None:
    refs = [sleepy.remote(0.5, i) for i in range(6)]
    pid = cluster.kill("task-scheduler")
    assert tessera.get(refs, timeout=120) == list(range(6))
    cluster.wait_restarted("task-scheduler", pid)
    assert tessera.get(add.remote(5, 5), timeout=60) == 10


DRIVER = """
import sys, tessera
tessera.init()
@tessera.remote
def add(a, b):
    return a + b
@tessera.remote
class C:
    def f(self, x):
        return x * 2
c = C.remote()
print(tessera._api.state().session.transport, tessera.get(add.remote(1, 2)), tessera.get(c.f.remote(4)))
tessera.shutdown()
"""


@pytest.mark.parametrize("transport", ["grpc", "socket"])
def test_driver_session_over_grpc_or_the_local_socket(cluster: Cluster, transport: str) -> None:
    assert tessera._api.state().session.transport == "socket"  # this driver shares the agent's host
    env = dict(cluster.env, TESSERA_SESSION_TRANSPORT=transport if transport == "grpc" else "")
    out = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [transport, "3", "8"]


def test_tasks_on_a_dead_node_agent_run_elsewhere(cluster: Cluster) -> None:
    @tessera.remote
    def slow_where(s: float) -> str:
        time.sleep(s)
        return os.environ["TESSERA_NODE_ID"]

    refs = [slow_where.remote(0.5) for _ in range(30)]
    second = cluster.node_ids()[1]
    deadline = time.monotonic() + 30
    while cluster.agent_status("task-scheduler-1").running == 0:  # wait until the other node has work
        assert time.monotonic() < deadline, "nothing spilled to the second node"
        time.sleep(0.05)
    pid = cluster.kill("task-scheduler-1")
    ran = tessera.get(refs, timeout=180)
    assert len(ran) == 30 and set(ran) <= set(cluster.node_ids())
    cluster.wait_restarted("task-scheduler-1", pid)
    assert second in cluster.node_ids()
