"""Generator tasks (Ray's test_generators, in behaviour): ``num_returns="streaming"`` gives an
ObjectRefGenerator whose refs are ready as the task yields them; ``"dynamic"`` one ref to the list of them."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import stacks

import tessera
from tessera.common import ids
from tessera.exceptions import TaskCancelledError, TaskError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "generators", "--services", "control-store,object-store,task-scheduler",
                        TESSERA_NUM_CPUS="2", TESSERA_OBJECT_STORE_MEMORY=str(128 * MiB)) as c:
        with c.driving("e2e-generators"):
            yield c


@tessera.remote(num_returns="streaming")
def count(n: int) -> Iterator[int]:
    for i in range(n):
        yield i * 10


@tessera.remote
def squares(n: int) -> Iterator[int]:  # a generator function: streaming by default (Ray 2.x)
    for i in range(n):
        yield i * i


@tessera.remote
def gated(flag: str) -> Iterator[str]:
    """Yields one item, then waits (at most 60 s) for the consumer to say it saw it."""
    yield "first"
    deadline = time.monotonic() + 60
    while not Path(flag).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer never saw the first item")
        time.sleep(0.02)
    yield "second"


@tessera.remote
def fails_after(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError(f"broke after {n}")


@tessera.remote
def blocks(n: int, mib: int) -> Iterator[np.ndarray]:
    for i in range(n):
        yield np.full(mib * MiB // 8, float(i))


@tessera.remote
def endless() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1
        time.sleep(0.05)


@tessera.remote(num_returns="streaming")
def not_a_generator() -> int:
    return 7


@tessera.remote
class Producer:
    def __init__(self, base: int) -> None:
        self.base = base

    def items(self, n: int) -> Iterator[int]:
        for i in range(n):
            yield self.base + i


@tessera.remote
class AsyncProducer:
    async def items(self, n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield -i


def stored(cluster: stacks.Cluster, oids: list[bytes]) -> list[bool]:
    with tessera.ObjectStoreClient(cluster.address("object-store")) as c:
        return list(c.contains(oids))


def test_streaming_yields_refs_in_order_then_stops(cluster: stacks.Cluster) -> None:
    gen = count.remote(5)
    assert isinstance(gen, tessera.ObjectRefGenerator)
    refs = list(gen)
    assert all(isinstance(r, tessera.ObjectRef) for r in refs)
    assert tessera.get(refs) == [0, 10, 20, 30, 40]
    assert gen.is_finished()
    with pytest.raises(StopIteration):
        next(gen)


def test_a_generator_function_streams_by_default(cluster: stacks.Cluster) -> None:
    gen = squares.remote(4)
    assert isinstance(gen, tessera.ObjectRefGenerator)
    assert [tessera.get(r) for r in gen] == [0, 1, 4, 9]
    assert [tessera.get(r) for r in squares.options(num_returns="streaming").remote(2)] == [0, 1]


def test_the_first_item_is_ready_before_the_task_ends(cluster: stacks.Cluster, tmp_path: Path) -> None:
    flag = tmp_path / "seen"
    gen = gated.remote(str(flag))
    first = next(gen)
    assert tessera.get(first, timeout=30) == "first"  # the task still waits for the flag: it has not ended
    flag.touch()
    assert tessera.get(next(gen), timeout=30) == "second"
    with pytest.raises(StopIteration):
        next(gen)


def test_next_with_a_timeout_says_the_item_is_not_ready(cluster: stacks.Cluster, tmp_path: Path) -> None:
    flag = tmp_path / "seen"
    gen = gated.remote(str(flag))
    next(gen)
    with pytest.raises(tessera.exceptions.GetTimeoutError):
        gen._next_sync(timeout_s=0.3)
    flag.touch()
    assert tessera.get(gen._next_sync(timeout_s=30)) == "second"


def test_an_exception_mid_stream_surfaces_at_the_next_item(cluster: stacks.Cluster) -> None:
    gen = fails_after.remote(2)
    a, b, c = next(gen), next(gen), next(gen)
    assert tessera.get([a, b]) == [0, 1]
    with pytest.raises(ValueError, match="broke after 2") as e:
        tessera.get(c)
    assert isinstance(e.value, TaskError)
    with pytest.raises(StopIteration):
        next(gen)


def test_async_iteration(cluster: stacks.Cluster) -> None:
    async def consume() -> list[int]:
        return [await asyncio.to_thread(tessera.get, r) async for r in count.remote(3)]

    assert asyncio.run(consume()) == [0, 10, 20]


def test_dynamic_gives_one_ref_to_the_list_of_refs(cluster: stacks.Cluster) -> None:
    ref = squares.options(num_returns="dynamic").remote(3)
    assert isinstance(ref, tessera.ObjectRef)
    dyn = tessera.get(ref, timeout=30)
    assert isinstance(dyn, tessera.DynamicObjectRefGenerator)
    assert len(dyn) == 3
    assert [tessera.get(r) for r in dyn] == [0, 1, 4]
    failed = fails_after.options(num_returns="dynamic").remote(1)
    with pytest.raises(ValueError, match="broke after 1"):
        tessera.get(failed, timeout=30)


@tessera.remote
def total(dyn: tessera.DynamicObjectRefGenerator) -> int:
    return sum(tessera.get(list(dyn)))


@tessera.remote
def total_nested(refs: list[tessera.ObjectRef]) -> int:
    return sum(sum(tessera.get(list(tessera.get(r)))) for r in refs)


def test_a_dynamic_ref_passed_to_a_task_carries_its_refs(cluster: stacks.Cluster) -> None:
    ref = squares.options(num_returns="dynamic").remote(4)
    assert tessera.get(total.remote(ref), timeout=30) == 0 + 1 + 4 + 9
    other = squares.options(num_returns="dynamic").remote(3)
    tessera.get(other, timeout=30)
    assert tessera.get(total_nested.remote([other]), timeout=30) == 0 + 1 + 4  # nested: through the store


def test_actor_methods_that_are_generators_stream(cluster: stacks.Cluster) -> None:
    p = Producer.remote(100)
    gen = p.items.remote(3)
    assert isinstance(gen, tessera.ObjectRefGenerator)
    assert [tessera.get(r) for r in gen] == [100, 101, 102]
    a = AsyncProducer.remote()
    assert [tessera.get(r) for r in a.items.remote(3)] == [0, -1, -2]
    tessera.kill(p)
    tessera.kill(a)


def test_items_are_freed_when_their_refs_and_the_generator_are_gone(cluster: stacks.Cluster) -> None:
    gen = blocks.remote(4, 2)  # 2 MiB each: in the object store
    first = next(gen)
    assert float(tessera.get(first)[0]) == 0.0
    tid = gen.task_id()
    oids = [ids.object_id(tid, i + 1) for i in range(4)]
    deadline = time.monotonic() + 30
    while not all(stored(cluster, oids)):  # the task yields them all, whether or not they were taken
        assert time.monotonic() < deadline, "the task's items never all arrived"
        time.sleep(0.1)
    del gen  # three were never handed out
    deadline = time.monotonic() + 30
    while any(stored(cluster, oids[1:])):
        assert time.monotonic() < deadline, "the items the dropped generator never handed out were not freed"
        time.sleep(0.1)
    assert stored(cluster, oids[:1]) == [True], "the item still referenced was freed"
    del first
    deadline = time.monotonic() + 30
    while stored(cluster, oids[:1])[0]:
        assert time.monotonic() < deadline, "the item whose ref was dropped was not freed"
        time.sleep(0.1)


def test_bad_num_returns_and_a_non_iterable_result_are_refused(cluster: stacks.Cluster) -> None:
    with pytest.raises(ValueError, match="num_returns"):
        count.options(num_returns="stream")
    with pytest.raises(ValueError, match="num_returns"):
        count.options(num_returns=True)
    gen = not_a_generator.remote()
    with pytest.raises(TypeError, match="not iterable"):
        tessera.get(next(gen), timeout=30)
    with pytest.raises(TypeError, match="cannot be passed"):
        cloudpickle.dumps(count.remote(1))


def test_cancelling_a_streaming_task_ends_its_stream(cluster: stacks.Cluster) -> None:
    gen = endless.remote()
    first = next(gen)
    assert tessera.get(first, timeout=30) == 0
    tessera.cancel(gen)
    refs = list(gen)  # what it yielded before the cancel, then the cancellation, then the end
    assert refs, "the stream ended with no item saying it was cancelled"
    with pytest.raises(TaskCancelledError):
        tessera.get(refs[-1], timeout=30)
    assert tessera.get(refs[:-1], timeout=30) == list(range(1, len(refs)))
    with pytest.raises(TypeError, match="ObjectRefGenerator"):
        tessera.cancel("not a ref")
