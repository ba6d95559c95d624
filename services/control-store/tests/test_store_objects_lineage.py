from __future__ import annotations

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids
from tessera.common.errors import FailedPreconditionError, InvalidArgumentError
from tessera.control_store.store import ControlStore


def loc(oid: bytes, node_id: bytes, size: int = 0, owner: str = "") -> pb.ObjectLocation:
    return pb.ObjectLocation(object_id=oid, node_id=node_id, size=size, owner=owner)


# ------------------------------------------------------------------ objects


async def test_object_locations(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    tid = ids.new_id("task_id")
    oid = ids.object_id(tid, 1)
    n1, n2 = sorted([ids.new_id("node_id"), ids.new_id("node_id")])
    await store.add_object_locations([loc(oid, n2, 1234, "driver-1"), loc(oid, n1, 1234, "driver-1")])
    (info,) = await store.get_objects([oid])
    assert info.object_id == oid and info.size == 1234 and info.owner == "driver-1"
    assert info.producer_task_id == tid and info.created_ms == clock.now_ms
    assert list(info.locations) == [n1, n2]
    assert published.subjects() == ["tessera.events.objects.updated"]
    assert pb.ObjectInfo.FromString(published.events[0][1].changes[0].value) == info

    await store.add_object_locations([loc(oid, n1, 1234)])  # adding a copy twice is a no-op
    assert list((await store.get_objects([oid]))[0].locations) == [n1, n2]

    assert await store.remove_object_locations([loc(oid, n2)]) == []  # one copy is left
    assert list((await store.get_objects([oid]))[0].locations) == [n1]
    assert await store.remove_object_locations([loc(oid, n1)]) == [oid]  # the last copy: lost
    (info,) = await store.get_objects([oid])
    assert list(info.locations) == [] and info.size == 1234  # still known, with no copy


async def test_lost_objects_and_unknown_objects(store: ControlStore) -> None:
    node = ids.new_id("node_id")
    other = ids.new_id("node_id")
    a, b, c = (ids.object_id(ids.new_id("task_id"), 1) for _ in range(3))
    unknown = ids.object_id(ids.new_id("task_id"), 2)
    await store.add_object_locations([loc(a, node), loc(b, node), loc(b, other), loc(c, node)])
    lost = await store.remove_object_locations([loc(a, node), loc(b, node), loc(unknown, node), loc(c, other)])
    assert lost == [a]  # b has another copy, c still has its copy, the unknown object is not reported
    got = await store.get_objects([unknown, c, a, b])
    assert [o.object_id for o in got] == [c, a, b]  # request order, unknown omitted
    assert await store.get_objects([unknown]) == []


async def test_delete_objects(store: ControlStore, published) -> None:  # type: ignore[no-untyped-def]
    node = ids.new_id("node_id")
    objs = [ids.object_id(ids.new_id("task_id"), 1) for _ in range(6)]
    await store.add_object_locations([loc(o, node) for o in objs])
    published.clear()
    assert await store.delete_objects(objs[:4] + [ids.object_id(ids.new_id("task_id"), 1)]) == 4
    assert [o.object_id for o in await store.get_objects(objs)] == objs[4:]
    assert published.subjects() == ["tessera.events.objects.deleted"]


async def test_object_calls_reject_bad_ids(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    node = ids.new_id("node_id")
    good = ids.object_id(ids.new_id("task_id"), 1)
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match="object_id must be 20 bytes, got 16 bytes"):
        await store.add_object_locations([loc(good, node), loc(node, node)])
    with pytest.raises(InvalidArgumentError, match="node_id must be 16 bytes, got empty"):
        await store.add_object_locations([loc(good, b"")])
    with pytest.raises(InvalidArgumentError, match="AddObjectLocations: the batch is empty"):
        await store.add_object_locations([])
    with pytest.raises(InvalidArgumentError, match="object_id must be 20 bytes, got 21 bytes"):
        await store.get_objects([good + b"x"])
    with pytest.raises(InvalidArgumentError, match="object_id must be 20 bytes, got 3 bytes"):
        await store.delete_objects([b"abc"])
    assert snapshot() == before


async def test_many_objects_over_shards(store: ControlStore) -> None:
    nodes = [ids.new_id("node_id") for _ in range(3)]
    objs = [ids.object_id(ids.new_id("task_id"), i) for i in range(1, 41)]
    await store.add_object_locations([loc(o, nodes[i % 3], size=i) for i, o in enumerate(objs)])
    got = await store.get_objects(objs)
    assert [(o.object_id, o.size, list(o.locations)) for o in got] == [(o, i, [nodes[i % 3]]) for i, o in enumerate(objs)]
    lost = await store.remove_object_locations([loc(o, nodes[0]) for o in objs])
    assert lost == [o for i, o in enumerate(objs) if i % 3 == 0]


# ------------------------------------------------------------------ lineage


async def _task(store: ControlStore, spec, args: list[bytes], returns: int = 1) -> bytes:  # type: ignore[no-untyped-def]
    s = spec(arg_object_ids=args, num_returns=returns)
    await store.create_tasks([s])
    return s.task_id  # type: ignore[no-any-return]


async def test_lineage_of_a_chain_with_a_lost_middle(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    node = ids.new_id("node_id")
    t1 = await _task(store, spec, [])
    o1 = ids.object_id(t1, 1)
    t2 = await _task(store, spec, [o1])
    o2 = ids.object_id(t2, 1)
    t3 = await _task(store, spec, [o2])
    o3 = ids.object_id(t3, 1)
    await store.add_object_locations([loc(o1, node), loc(o2, node)])
    assert await store.remove_object_locations([loc(o2, node)]) == [o2]  # the middle object is lost

    got = await store.get_lineage(o3)
    assert [r.spec.task_id for r in got] == [t2, t3]  # rebuild o2 first, then o3
    assert all(r.state == pb.TASK_STATE_PENDING for r in got)

    # with o1 lost too, the whole chain re-runs, producers first
    await store.remove_object_locations([loc(o1, node)])
    assert [r.spec.task_id for r in await store.get_lineage(o3)] == [t1, t2, t3]
    assert [r.spec.task_id for r in await store.get_lineage(o2)] == [t1, t2]
    # an object whose inputs are all present needs only its producer
    await store.add_object_locations([loc(o2, node)])
    assert [r.spec.task_id for r in await store.get_lineage(o3)] == [t3]


async def test_lineage_runs_producers_before_consumers(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    # b -> c -> a and b -> a: every input of a is lost; b must re-run before c, c before a
    tb = await _task(store, spec, [])
    ob = ids.object_id(tb, 1)
    tc = await _task(store, spec, [ob])
    oc = ids.object_id(tc, 1)
    ta = await _task(store, spec, [ob, oc])
    order = [r.spec.task_id for r in await store.get_lineage(ids.object_id(ta, 1))]
    assert sorted(order) == sorted([ta, tb, tc]) and len(order) == 3
    assert order.index(tb) < order.index(tc) < order.index(ta), "a task must come after the producers of its inputs"


async def test_lineage_each_task_once(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    t1 = await _task(store, spec, [], returns=2)
    t2 = await _task(store, spec, [ids.object_id(t1, 1), ids.object_id(t1, 2)])
    got = [r.spec.task_id for r in await store.get_lineage(ids.object_id(t2, 1))]
    assert got == [t1, t2]


async def test_lineage_of_a_put_object(store: ControlStore) -> None:
    put = ids.new_id("object_id")
    with pytest.raises(FailedPreconditionError,
                       match=f"object {put.hex()} was not produced by a task \\(it was put\\) and cannot be rebuilt"):
        await store.get_lineage(put)


async def test_lineage_through_a_lost_put_object(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    t1 = await _task(store, spec, [], returns=2)
    put = ids.new_id("object_id")
    # two lost outputs of t1 come first among t2's inputs; the lost put object is the one that cannot be rebuilt
    t2 = await _task(store, spec, [ids.object_id(t1, 1), ids.object_id(t1, 2), put])
    with pytest.raises(FailedPreconditionError, match=f"^object {put.hex()} was not produced by a task"):
        await store.get_lineage(ids.object_id(t2, 1))


async def test_lineage_depth_limit(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    t1 = await _task(store, spec, [])
    t2 = await _task(store, spec, [ids.object_id(t1, 1)])
    t3 = await _task(store, spec, [ids.object_id(t2, 1)])
    o3 = ids.object_id(t3, 1)
    assert len(await store.get_lineage(o3, max_depth=3)) == 3
    with pytest.raises(FailedPreconditionError, match=f"lineage of {o3.hex()} is deeper than max_depth=2"):
        await store.get_lineage(o3, max_depth=2)
    with pytest.raises(InvalidArgumentError, match="object_id must be 20 bytes, got 16 bytes"):
        await store.get_lineage(t3)


async def test_lineage_order_on_a_random_dag(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    import random

    rnd = random.Random(7)
    node = ids.new_id("node_id")
    tasks: list[bytes] = []
    inputs: dict[bytes, list[bytes]] = {}
    for _ in range(25):
        args = [ids.object_id(t, 1) for t in rnd.sample(tasks, min(len(tasks), rnd.randint(0, 3)))]
        t = await _task(store, spec, args)
        tasks.append(t)
        inputs[t] = [ids.producer_task_id(a) for a in args]
    kept = [t for t in tasks if rnd.random() < 0.3]  # some outputs survive on a node
    if kept:
        await store.add_object_locations([loc(ids.object_id(t, 1), node) for t in kept])
    order = [r.spec.task_id for r in await store.get_lineage(ids.object_id(tasks[-1], 1))]
    assert len(order) == len(set(order)) and order[-1] == tasks[-1]
    pos = {t: i for i, t in enumerate(order)}
    for t in order:
        for p in inputs[t]:
            if p in pos:
                assert pos[p] < pos[t]
            else:
                assert p in kept, "a lost input's producer is missing from the lineage"
