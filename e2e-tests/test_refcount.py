"""Objects live as long as something references them, and no longer (reference counting, on `tessera up`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import stacks

import tessera
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.control_store.v1 import control_store_pb2_grpc as cpb_grpc
from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.common import ids
from tessera.exceptions import ObjectFreedError, OwnerDiedError, TaskError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MiB = 2**20
CAPACITY = 256 * MiB
#: A process's reference table older than this means it died (short here: a killed borrower's borrow ends soon).
STALE_S = 6.0


class Cluster(stacks.Cluster):
    def stats(self) -> Any:
        with tessera.ObjectStoreClient(self.address("object-store")) as c:
            return c.stats()

    def control_store(self) -> tuple[grpc.Channel, cpb_grpc.ControlStoreServiceStub]:
        ch = grpc.insecure_channel(self.address("control-store"))
        return ch, cpb_grpc.ControlStoreServiceStub(ch)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with stacks.running(tmp_path_factory, "refcount", "--services", "control-store,object-store,task-scheduler",
                        cls=Cluster, TESSERA_NUM_CPUS="2", TESSERA_OBJECT_STORE_MEMORY=str(CAPACITY),
                        TESSERA_OBJECT_STORE_SPILL_CAPACITY=str(4096 * MiB), TESSERA_REFS_STALE_S=str(STALE_S)) as c:
        with c.driving("e2e-refcount"):
            yield c


def settle(cluster: Cluster, objects: int, timeout: float = 10.0) -> Any:
    """The store's stats once it holds at most ``objects`` objects (frees are sent within milliseconds)."""
    deadline = time.monotonic() + timeout
    while True:
        s = cluster.stats()
        if s.objects <= objects or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


@tessera.remote
def block(n: int, value: float) -> np.ndarray:
    return np.full(n, value, dtype=np.uint8)


@tessera.remote
def total(xs: list[Any]) -> float:
    return float(sum(float(np.asarray(tessera.get(x)).sum()) for x in xs))


@tessera.remote
def wrap_put(n: int) -> list[tessera.ObjectRef]:
    return [tessera.put(np.full(n, 3, dtype=np.uint8))]


@tessera.remote
class Keeper:
    def __init__(self) -> None:
        self.kept: list[Any] = []

    def keep(self, xs: list[Any]) -> int:
        self.kept.extend(xs)
        return len(self.kept)

    def read(self) -> float:
        return float(sum(float(np.asarray(tessera.get(x)).sum()) for x in self.kept))

    def drop(self) -> int:
        self.kept.clear()
        return os.getpid()


_held: Any = None


@tessera.remote
def hold(xs: Any, keeper: Any = None) -> int:
    """Keep ``xs`` in this worker's module global (None: let go of it); with ``keeper``, lend it on to that
    actor too. This worker's pid."""
    global _held
    _held = xs
    if keeper is not None:
        assert tessera.get(keeper.keep.remote(xs), timeout=60) >= 1
    return os.getpid()


def let_go_on(pid: int) -> None:
    """Run ``hold(None)`` until it ran on the worker ``pid`` (tasks go to whichever worker is idle)."""
    for _ in range(100):
        if tessera.get(hold.remote(None), timeout=60) == pid:
            return
    raise AssertionError(f"no task ran on worker {pid}")


def stored(cluster: Cluster, oid: bytes) -> bool:
    with tessera.ObjectStoreClient(cluster.address("object-store")) as c:
        return bool(c.contains([oid])[0])


def stays(cluster: Cluster, oid: bytes, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert stored(cluster, oid), "freed while a borrower still holds it"
        time.sleep(0.25)


def goes(cluster: Cluster, oid: bytes, seconds: float) -> float:
    """How long ``oid`` took to leave the store (at most ``seconds``)."""
    t0 = time.monotonic()
    while stored(cluster, oid):
        assert time.monotonic() - t0 < seconds, f"still stored after {seconds:g}s: the borrow was never released"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_puts_dropped_in_a_loop_never_spill(cluster: Cluster) -> None:
    before = cluster.stats()
    a = np.ones(64 * MiB, dtype=np.uint8)
    for _ in range(200):
        ref = tessera.put(a)
        del ref
    s = settle(cluster, 0)
    assert s.spills == before.spills, "dropped objects were spilled instead of freed"
    assert s.objects == 0 and s.used == 0, (s.objects, s.used)


def test_large_task_results_read_then_dropped_never_spill(cluster: Cluster) -> None:
    before = cluster.stats()
    peak = 0
    for i in range(200):
        x = tessera.get(block.remote(32 * MiB, i % 250))
        assert x[0] == i % 250
        del x
        if i % 20 == 0:
            peak = max(peak, cluster.stats().objects)
    s = settle(cluster, 0)
    assert s.spills == before.spills, "task results were spilled instead of freed"
    assert s.objects == 0, s.objects
    assert peak <= 2, f"the store held {peak} results at once"


def test_a_ref_inside_a_list_argument_outlives_the_drivers_del(cluster: Cluster) -> None:
    ref = tessera.put(np.full(MiB, 2, dtype=np.uint8))
    out = total.remote([ref])
    del ref  # the task still holds it
    assert tessera.get(out, timeout=60) == 2.0 * MiB


def test_a_ref_returned_nested_in_a_result_survives(cluster: Cluster) -> None:
    (inner,) = tessera.get(wrap_put.remote(MiB), timeout=60)
    time.sleep(0.5)  # the worker's own refs are long gone
    assert float(tessera.get(inner, timeout=30).sum()) == 3.0 * MiB


@tessera.remote
def echo(xs: list[Any]) -> list[Any]:
    return xs


def test_a_ref_a_worker_put_and_returned_nested_lives_as_long_as_the_result(cluster: Cluster) -> None:
    out = wrap_put.remote(MiB)
    (inner,) = tessera.get(out, timeout=60)
    oid = inner.id
    del inner  # only the result holds it now (the worker that owns it lent it to this driver)
    stays(cluster, oid, 8.0)  # past the worker's grace and two readings of this driver's table
    (again,) = tessera.get(out, timeout=60)
    assert float(tessera.get(again, timeout=30).sum()) == 3.0 * MiB
    del again, out
    took = goes(cluster, oid, 20.0)
    assert took < 10.0, f"freed {took:.1f}s after the result that held it"


def test_refs_nested_in_a_put_or_passed_through_a_task_go_with_what_holds_them(cluster: Cluster) -> None:
    inner = tessera.put(np.full(MiB, 9, dtype=np.uint8))
    oid = inner.id
    box = tessera.put([inner])  # held by the box
    out = echo.remote([inner])  # passed in and returned: held by the result
    assert tessera.get(out, timeout=60)[0] == inner
    del inner
    stays(cluster, oid, 2.0)
    (unpacked,) = tessera.get(box, timeout=30)
    assert float(tessera.get(unpacked, timeout=30).sum()) == 9.0 * MiB
    del box, unpacked
    stays(cluster, oid, 1.0)  # the result still holds it
    del out
    goes(cluster, oid, 10.0)


def test_a_ref_kept_in_an_actors_state_survives(cluster: Cluster) -> None:
    k = Keeper.remote()
    ref = tessera.put(np.full(MiB, 5, dtype=np.uint8))
    assert tessera.get(k.keep.remote([ref]), timeout=60) == 1
    del ref
    time.sleep(0.5)
    assert tessera.get(k.read.remote(), timeout=60) == 5.0 * MiB
    before = cluster.stats().objects
    tessera.kill(k)  # the ref dies with the actor's state: the object goes
    deadline = time.monotonic() + 30
    while cluster.stats().objects >= before:
        assert time.monotonic() < deadline, "the object outlived the actor that kept it"
        time.sleep(0.2)


def test_free_is_at_once_everywhere_and_twice_is_nothing(cluster: Cluster) -> None:
    ref = tessera.put(np.full(2 * MiB, 1, dtype=np.uint8))
    k = Keeper.remote()
    assert tessera.get(k.keep.remote([ref]), timeout=60) == 1
    tessera.internal.free(ref)
    tessera.internal.free([ref])  # a double free does nothing
    t0 = time.monotonic()
    with pytest.raises(ObjectFreedError):
        tessera.get(ref, timeout=30)
    with pytest.raises(TaskError) as e:  # the borrower's get fails too, at once, not after its timeout
        tessera.get(k.read.remote(), timeout=60)
    assert isinstance(e.value.cause, ObjectFreedError), e.value
    assert time.monotonic() - t0 < 10
    tessera.kill(k)
    with pytest.raises(TypeError):
        tessera.internal.free("not a ref")  # type: ignore[arg-type]


def test_owner_death_fails_borrowers_with_owner_died(cluster: Cluster, tmp_path: Any) -> None:
    name = f"keeper-{os.urandom(4).hex()}"
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np, tessera
        from test_refcount import Keeper
        tessera.init(name="owner")
        k = Keeper.options(name={name!r}, lifetime="detached").remote()
        ref = tessera.put(np.full(2**20, 7, dtype=np.uint8))
        assert tessera.get(k.keep.remote([ref]), timeout=60) == 1
        assert tessera.get(k.read.remote(), timeout=60) == 7.0 * 2**20
        tessera.shutdown()
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=120)
    k = tessera.get_actor(name)
    with pytest.raises(TaskError) as e:
        tessera.get(k.read.remote(), timeout=60)
    assert isinstance(e.value.cause, OwnerDiedError), e.value
    tessera.kill(k)


def test_an_owner_that_dies_without_shutting_down_takes_its_objects_along(cluster: Cluster, tmp_path: Any) -> None:
    name = f"keeper-{os.urandom(4).hex()}"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        import numpy as np, tessera
        from test_refcount import Keeper
        tessera.init(name="crashing-owner")
        k = Keeper.options(name={name!r}, lifetime="detached").remote()
        ref = tessera.put(np.full(2**20, 9, dtype=np.uint8))
        assert tessera.get(k.keep.remote([ref]), timeout=60) == 1
        time.sleep(3)  # it has run a while (its reference table is published)
        os._exit(0)  # no shutdown: nothing is freed by the driver itself
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=120)
    k = tessera.get_actor(name)
    deadline = time.monotonic() + 60
    while True:
        try:
            tessera.get(k.read.remote(), timeout=60)
        except TaskError as e:
            assert isinstance(e.cause, OwnerDiedError), e
            break
        assert time.monotonic() < deadline, "the dead driver's object was never freed"
        time.sleep(1)
    tessera.kill(k)


def test_records_are_collected_with_their_objects(cluster: Cluster) -> None:
    refs = [block.remote(200 * 1024, 1) for _ in range(20)]  # stored results: object records too
    tessera.get(refs, timeout=60)
    oids = [r.id for r in refs]
    tids = [ids.producer_task_id(o) for o in oids]
    ch, cs = cluster.control_store()

    def recorded() -> int:
        n = 0
        for t in tids:
            try:
                n += len(cs.GetTasks(cpb.GetTasksRequest(task_ids=[t]), timeout=5).tasks)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
        return n

    with ch:
        deadline = time.monotonic() + 10
        while recorded() < len(tids):
            assert time.monotonic() < deadline, "the tasks were not recorded"
            time.sleep(0.1)
        assert len(cs.GetObjects(cpb.GetObjectsRequest(object_ids=oids), timeout=5).objects) == len(oids)
        del refs
        deadline = time.monotonic() + 30  # task records go a few seconds after their objects
        while True:
            tasks = recorded()
            objs = [o for o in cs.GetObjects(cpb.GetObjectsRequest(object_ids=oids), timeout=5).objects
                    if not o.freed_reason]
            if not tasks and not objs:
                break
            assert time.monotonic() < deadline, f"{tasks} task and {len(objs)} object records left"
            time.sleep(0.2)


@pytest.mark.long
def test_driver_tables_stay_flat_over_many_tasks(cluster: Cluster) -> None:
    @tessera.remote
    def noop(i: int) -> int:
        return i

    def run(n: int) -> None:
        for i in range(0, n, 1000):
            assert tessera.get([noop.remote(j) for j in range(i, i + 1000)], timeout=120)[-1] == i + 999

    refs = tessera._api.state().core.refs
    run(2000)
    time.sleep(0.1)
    run(18000)
    core = tessera._api.state().core
    core.flush_frees()
    s = refs.stats()
    assert s["refs"] < 50 and len(core.results) < 50, (s, len(core.results))
    assert s["tasks"] < 20000, s  # records wait a few seconds; then they go
    time.sleep(6)
    core.flush_frees()
    assert refs.stats()["tasks"] < 100, refs.stats()


def test_memory_lists_objects_by_owner(cluster: Cluster) -> None:
    keep = tessera.put(np.zeros(3 * MiB, dtype=np.uint8))
    k = Keeper.remote()
    assert tessera.get(k.keep.remote([keep]), timeout=60) == 1
    tessera._api.state().core.publish_refs(force=True)
    deadline = time.monotonic() + 30
    while True:  # the actor's worker publishes its table within a few seconds
        r = cluster.cli("memory", "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        mine = [o for o in report["objects"] if o["object_id"] == keep.hex()]
        if len(mine) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    owner = [o for o in mine if o["owned"]]
    assert len(owner) == 1 and owner[0]["size"] >= 3 * MiB and "local" in owner[0]["reference"], mine
    assert "borrowed" in owner[0]["reference"], owner  # the actor keeps it
    assert owner[0]["nodes"] == cluster.node_ids()[:1], owner
    assert any(not o["owned"] and o["refs"] >= 1 for o in mine), mine  # the actor's own table
    assert report["nodes"] and report["nodes"][0]["objects"] >= 1
    text = cluster.cli("memory")
    assert text.returncode == 0 and keep.hex() in text.stdout and "object stores" in text.stdout
    tessera.kill(k)


def test_memory_with_a_wrong_address_says_so(cluster: Cluster) -> None:
    t0 = time.monotonic()
    r = cluster.cli("memory", "--address", "127.0.0.1:1", timeout=60)
    assert r.returncode == 1 and "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr, r
    assert time.monotonic() - t0 < 40


def test_memory_says_which_copies_are_spilled(cluster: Cluster) -> None:
    held = [tessera.put(np.full(64 * MiB, i, dtype=np.uint8)) for i in range(5)]  # more than the store holds
    assert cluster.stats().spilled_objects >= 1
    tessera._api.state().core.publish_refs(force=True)
    report = json.loads(cluster.cli("memory", "--json").stdout)
    mine = {o["object_id"]: o for o in report["objects"] if o["owned"]}
    rows = [mine[r.hex()] for r in held]
    assert all(o["size"] >= 64 * MiB for o in rows), rows
    with tessera.ObjectStoreClient(cluster.address("object-store")) as c:
        truth = list(c._stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[r.id for r in held])).spilled)
    assert sum(truth) >= 1, "nothing of mine was spilled"
    assert [bool(o["spilled"]) for o in rows] == truth, rows
    assert all(set(o["spilled"]) <= set(o["nodes"]) for o in rows)
    oids = [r.id for r in held]
    del held
    deadline = time.monotonic() + 10
    with tessera.ObjectStoreClient(cluster.address("object-store")) as c:
        while any(c.contains(oids)):  # its copies, spilled ones included, go with the refs
            assert time.monotonic() < deadline, "dropped objects are still in the store"
            time.sleep(0.05)


def test_a_borrower_that_lets_go_of_a_ref_releases_it(cluster: Cluster) -> None:
    ref = tessera.put(np.full(MiB, 4, dtype=np.uint8))
    oid = ref.id
    pid = tessera.get(hold.remote([ref]), timeout=60)  # the worker keeps it in a module global
    del ref
    stays(cluster, oid, 5.0)  # longer than two rounds of the owner's reading of its borrowers' tables
    let_go_on(pid)
    took = goes(cluster, oid, 15.0)
    assert took < 6.0, f"freed {took:.1f}s after the borrower let go"


def test_a_borrower_that_dies_releases_its_borrow(cluster: Cluster) -> None:
    ref = tessera.put(np.full(MiB, 6, dtype=np.uint8))
    oid = ref.id
    pid = tessera.get(hold.remote([ref]), timeout=60)
    del ref
    stays(cluster, oid, 3.0)
    key = f"{socket.gethostname()}:{pid}".encode()
    ch, cs = cluster.control_store()
    with ch:
        assert cs.KvGet(cpb.KvGetRequest(namespace="refs", key=key), timeout=10).value
        os.kill(pid, signal.SIGKILL)  # no goodbye: its node agent sees it die and removes its table
        goes(cluster, oid, STALE_S + 20)
        deadline = time.monotonic() + 20
        while True:  # Redis does not keep the tables of killed workers
            try:
                cs.KvGet(cpb.KvGetRequest(namespace="refs", key=key), timeout=10)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                break
            assert time.monotonic() < deadline, "the killed worker's reference table is still there"
            time.sleep(0.2)


def test_a_borrower_of_a_borrower_keeps_the_object_until_both_let_go(cluster: Cluster) -> None:
    k = Keeper.remote()
    ref = tessera.put(np.full(MiB, 8, dtype=np.uint8))
    oid = ref.id
    pid = tessera.get(hold.remote([ref], k), timeout=60)  # B keeps it and lends it on to the actor C
    del ref
    let_go_on(pid)  # B lets go: C still holds it, and B's table says so
    stays(cluster, oid, 5.0)
    assert tessera.get(k.read.remote(), timeout=60) == 8.0 * MiB
    tessera.get(k.drop.remote(), timeout=60)  # C lets go too (the actor lives on)
    took = goes(cluster, oid, 20.0)
    assert took < 10.0, f"freed {took:.1f}s after the last borrower let go"
    tessera.kill(k)


@pytest.mark.long
def test_a_borrower_of_a_borrower_keeps_the_object_when_the_one_between_dies(cluster: Cluster) -> None:
    k = Keeper.remote()
    ref = tessera.put(np.full(MiB, 7, dtype=np.uint8))
    oid = ref.id
    pid = tessera.get(hold.remote([ref], k), timeout=60)  # B keeps it and lends it on to the actor C
    del ref
    stays(cluster, oid, 3.0)  # the owner reads B's table, which names C: it follows C too
    os.kill(pid, signal.SIGKILL)  # B dies without a word: its table goes stale
    stays(cluster, oid, STALE_S + 4.0)
    assert tessera.get(k.read.remote(), timeout=60) == 7.0 * MiB
    tessera.get(k.drop.remote(), timeout=60)
    goes(cluster, oid, 20.0)
    tessera.kill(k)
