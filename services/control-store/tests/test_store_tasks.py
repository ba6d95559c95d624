from __future__ import annotations

from typing import Any

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids
from tessera.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tessera.control_store.store import MAX_BATCH, ControlStore

T = pb.TaskState


def upd(task_id: bytes, state: int, **kw: object) -> pb.TaskStateUpdate:
    return pb.TaskStateUpdate(task_id=task_id, state=state, **kw)  # type: ignore[arg-type]


async def test_create_and_get_tasks(store: ControlStore, spec, clock, published) -> None:  # type: ignore[no-untyped-def]
    specs = [spec(args=f"arg{i}".encode(), resources={"CPU": 1.0}) for i in range(50)]
    assert await store.create_tasks(specs) == 50
    got = await store.get_tasks([s.task_id for s in reversed(specs)])
    assert [r.spec for r in got] == list(reversed(specs))  # request order
    for r in got:
        assert r.state == T.TASK_STATE_PENDING and r.attempt == 0
        assert r.created_ms == r.updated_ms == clock.now_ms
        assert not r.node_id and not r.error
    # one announcement carries every created record
    assert set(published.subjects()) == {"tessera.events.tasks.created"}
    changes = [c for _, ev in published.events for c in ev.changes]
    assert [c.key for c in changes] == [s.task_id for s in specs]
    assert [pb.TaskRecord.FromString(c.value).spec for c in changes] == specs


async def test_actor_task_and_optional_fields(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    parent = spec()
    actor_task = spec(function_id=b"", actor_id=ids.new_id("actor_id"), method_name="step",
                      parent_task_id=parent.task_id, arg_object_ids=[ids.object_id(parent.task_id, 1)])
    await store.create_tasks([parent, actor_task])
    (rec,) = await store.get_tasks([actor_task.task_id])
    assert rec.spec == actor_task


async def test_get_missing_tasks(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    s = spec()
    await store.create_tasks([s])
    a, b = ids.new_id("task_id"), ids.new_id("task_id")
    with pytest.raises(NotFoundError, match=f"^task {a.hex()} not found$"):
        await store.get_tasks([s.task_id, a])
    with pytest.raises(NotFoundError, match=rf"^task {a.hex()} not found \(and 1 more\)$"):
        await store.get_tasks([a, s.task_id, b])
    with pytest.raises(InvalidArgumentError, match="task_id must be 16 bytes, got 20 bytes"):
        await store.get_tasks([ids.object_id(s.task_id, 1)])
    with pytest.raises(InvalidArgumentError, match="GetTasks: the batch is empty"):
        await store.get_tasks([])


async def test_batch_with_an_existing_id_creates_nothing(store: ControlStore, spec, ids_on_shard, snapshot,  # type: ignore[no-untyped-def]
                                                         published) -> None:
    n = store.db.n
    existing = spec(ids_on_shard("task_id", 0, 1)[0])
    await store.create_tasks([existing])
    before = snapshot()
    published.clear()
    # new ids on every shard, the existing one in the middle of the batch
    fresh = [spec(t) for shard in range(n) for t in ids_on_shard("task_id", shard, 3)]
    batch = fresh[: len(fresh) // 2] + [spec(existing.task_id, function_name="changed")] + fresh[len(fresh) // 2:]
    with pytest.raises(AlreadyExistsError, match=f"^task {existing.task_id.hex()} already exists$"):
        await store.create_tasks(batch)
    assert snapshot() == before
    assert published.events == []
    for s in fresh:
        with pytest.raises(NotFoundError):
            await store.get_tasks([s.task_id])
    (rec,) = await store.get_tasks([existing.task_id])
    assert rec.spec == existing
    # the same batch without the conflict goes through
    assert await store.create_tasks(fresh) == len(fresh)


@pytest.mark.parametrize("shard_urls", [2], indirect=True, ids=["2shards"])
async def test_existing_id_on_the_other_shard(store: ControlStore, spec, ids_on_shard, snapshot) -> None:  # type: ignore[no-untyped-def]
    assert store.db.n == 2
    existing = spec(ids_on_shard("task_id", 1, 1)[0])
    await store.create_tasks([existing])
    before = snapshot()
    batch = [spec(t) for t in ids_on_shard("task_id", 0, 5)] + [existing]
    with pytest.raises(AlreadyExistsError, match=f"task {existing.task_id.hex()} already exists"):
        await store.create_tasks(batch)
    assert snapshot() == before


async def test_duplicate_ids_in_one_request(store: ControlStore, spec, snapshot) -> None:  # type: ignore[no-untyped-def]
    a, b = spec(), spec()
    before = snapshot()
    with pytest.raises(AlreadyExistsError, match=f"task {b.task_id.hex()} appears twice in the request"):
        await store.create_tasks([a, b, spec(b.task_id)])
    assert snapshot() == before


@pytest.mark.parametrize(("change", "message"), [
    (dict(task_id=b"\x00" * 15), "spec.task_id must be 16 bytes, got 15 bytes"),
    (dict(job_id=b""), "job_id must be 4 bytes, got empty"),
    (dict(function_id=b""), "function_id must be 32 bytes, got empty"),
    (dict(function_id=b"", actor_id=b"\x01" * 16), "an actor task needs method_name"),
    (dict(actor_id=b"\x01" * 5, method_name="m"), "actor_id must be 16 bytes, got 5 bytes"),
    (dict(arg_object_ids=[b"\x02" * 16]), "arg_object_ids must be 20 bytes, got 16 bytes"),
    (dict(parent_task_id=b"\x03" * 4), "parent_task_id must be 16 bytes, got 4 bytes"),
    (dict(resources={"GPU": -0.5}), "resource 'GPU' must be >= 0, got -0.5"),
    (dict(resources={"": 1.0}), "a resource name is empty"),
])
async def test_one_bad_spec_fails_the_batch(store: ControlStore, spec, snapshot, change: dict[str, object],  # type: ignore[no-untyped-def]
                                            message: str) -> None:
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(")):
        await store.create_tasks([spec(), spec(**change), spec()])
    assert snapshot() == before


async def test_batch_limits(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError, match="CreateTasks: the batch is empty"):
        await store.create_tasks([])
    s = spec()
    with pytest.raises(ResourceExhaustedError, match=f"CreateTasks: batch of {MAX_BATCH + 1} exceeds the limit of {MAX_BATCH}"):
        await store.create_tasks([s] * (MAX_BATCH + 1))


async def test_task_life_cycle(store: ControlStore, spec, clock, published) -> None:  # type: ignore[no-untyped-def]
    s = spec()
    await store.create_tasks([s])
    nid = ids.new_id("node_id")
    clock.advance(10)
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_SCHEDULED, node_id=nid)])
    assert (r.state, r.node_id, r.updated_ms, r.attempt) == (T.TASK_STATE_SCHEDULED, nid, clock.now_ms, 0)
    assert r.created_ms == clock.now_ms - 10
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_RUNNING)])
    assert r.state == T.TASK_STATE_RUNNING and r.node_id == nid  # kept when not given
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_FINISHED)])
    assert r.state == T.TASK_STATE_FINISHED and r.attempt == 0
    (stored,) = await store.get_tasks([s.task_id])
    assert stored == r and stored.spec == s
    assert published.subjects() == ["tessera.events.tasks.created"] + ["tessera.events.tasks.updated"] * 3
    last = pb.TaskRecord.FromString(published.events[-1][1].changes[0].value)
    assert last == r


async def test_attempt_counts_reruns(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    s = spec()
    await store.create_tasks([s])
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_RUNNING)])
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_FAILED, error="OOM")])
    assert r.error == "OOM" and r.attempt == 0
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_PENDING)])  # retry
    assert r.attempt == 1 and r.state == T.TASK_STATE_PENDING
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_PENDING)])  # no-op: not another attempt
    assert r.attempt == 1
    await store.update_task_states([upd(s.task_id, T.TASK_STATE_RUNNING)])
    await store.update_task_states([upd(s.task_id, T.TASK_STATE_FINISHED)])
    (r,) = await store.update_task_states([upd(s.task_id, T.TASK_STATE_PENDING)])  # lineage re-run
    assert r.attempt == 2


@pytest.mark.parametrize(("path", "illegal"), [
    ([T.TASK_STATE_FINISHED], T.TASK_STATE_RUNNING),
    ([T.TASK_STATE_RUNNING, T.TASK_STATE_FINISHED], T.TASK_STATE_RUNNING),
    ([T.TASK_STATE_CANCELLED], T.TASK_STATE_PENDING),
    ([T.TASK_STATE_RUNNING, T.TASK_STATE_FAILED], T.TASK_STATE_SCHEDULED),
])
async def test_illegal_transition(store: ControlStore, spec, snapshot, path: list[Any], illegal: Any) -> None:  # type: ignore[no-untyped-def]
    s = spec()
    await store.create_tasks([s])
    for st in path:
        await store.update_task_states([upd(s.task_id, st)])
    current = T.Name(path[-1] if path else T.TASK_STATE_PENDING)
    before = snapshot()
    with pytest.raises(FailedPreconditionError,
                       match=f"^task {s.task_id.hex()}: illegal transition {current} -> {T.Name(illegal)}$"):
        await store.update_task_states([upd(s.task_id, illegal)])
    assert snapshot() == before


async def test_an_illegal_update_in_a_batch_changes_nothing(store: ControlStore, spec, ids_on_shard, snapshot,  # type: ignore[no-untyped-def]
                                                            published) -> None:
    specs = [spec(t) for shard in range(store.db.n) for t in ids_on_shard("task_id", shard, 3)]
    await store.create_tasks(specs)
    bad = specs[-1].task_id
    await store.update_task_states([upd(bad, T.TASK_STATE_CANCELLED)])
    before = snapshot()
    published.clear()
    batch = [upd(s.task_id, T.TASK_STATE_SCHEDULED) for s in specs[:-1]] + [upd(bad, T.TASK_STATE_RUNNING)]
    with pytest.raises(FailedPreconditionError, match=f"task {bad.hex()}: illegal transition"):
        await store.update_task_states(batch)
    assert snapshot() == before
    assert published.events == []
    assert {r.state for r in await store.get_tasks([s.task_id for s in specs[:-1]])} == {T.TASK_STATE_PENDING}


async def test_update_rejects_bad_input(store: ControlStore, spec, snapshot) -> None:  # type: ignore[no-untyped-def]
    s = spec()
    await store.create_tasks([s])
    before = snapshot()
    missing = ids.new_id("task_id")
    with pytest.raises(NotFoundError, match=f"task {missing.hex()} not found"):
        await store.update_task_states([upd(s.task_id, T.TASK_STATE_RUNNING), upd(missing, T.TASK_STATE_RUNNING)])
    with pytest.raises(InvalidArgumentError, match=f"task {s.task_id.hex()} is updated twice in one request"):
        await store.update_task_states([upd(s.task_id, T.TASK_STATE_RUNNING), upd(s.task_id, T.TASK_STATE_FINISHED)])
    with pytest.raises(InvalidArgumentError, match="task state must be one of .* got TASK_STATE_UNSPECIFIED"):
        await store.update_task_states([upd(s.task_id, T.TASK_STATE_UNSPECIFIED)])
    with pytest.raises(InvalidArgumentError, match="node_id must be 16 bytes, got 3 bytes"):
        await store.update_task_states([upd(s.task_id, T.TASK_STATE_SCHEDULED, node_id=b"abc")])
    with pytest.raises(InvalidArgumentError, match="task_id must be 16 bytes, got empty"):
        await store.update_task_states([upd(b"", T.TASK_STATE_RUNNING)])
    with pytest.raises(InvalidArgumentError, match="UpdateTaskStates: the batch is empty"):
        await store.update_task_states([])
    assert snapshot() == before


async def test_record_finished_tasks_once_and_replace_on_rerun(store: ControlStore, spec) -> None:  # type: ignore[no-untyped-def]
    node = bytes(range(16))
    a, b = spec(), spec()
    await store.create_tasks([a, b], state=T.TASK_STATE_FINISHED, node_id=node)
    got = await store.get_tasks([a.task_id, b.task_id])
    assert [(t.state, t.node_id) for t in got] == [(T.TASK_STATE_FINISHED, node)] * 2
    with pytest.raises(AlreadyExistsError):
        await store.create_tasks([a], state=T.TASK_STATE_FINISHED)
    rerun = spec()
    rerun.task_id = a.task_id
    rerun.function_name = "rerun"
    await store.create_tasks([rerun], state=T.TASK_STATE_FAILED, replace=True)
    (t,) = await store.get_tasks([a.task_id])
    assert (t.state, t.spec.function_name) == (T.TASK_STATE_FAILED, "rerun")
    with pytest.raises(InvalidArgumentError):
        await store.create_tasks([a, a], replace=True)


async def test_list_tasks_newest_first_filtered_and_limited(store: ControlStore, spec, clock, snapshot) -> None:  # type: ignore[no-untyped-def]
    other_job = ids.new_id("job_id")
    mine = []
    for i in range(30):
        s = spec(args=f"{i}".encode())
        await store.create_tasks([s])
        mine.append(s)
        clock.advance(1)
    theirs = spec(job_id=other_job)
    await store.create_tasks([theirs])
    await store.update_task_states([upd(mine[3].task_id, T.TASK_STATE_SCHEDULED),
                                    upd(mine[7].task_id, T.TASK_STATE_SCHEDULED)])

    got, truncated = await store.list_tasks()
    assert [r.spec.task_id for r in got] == [theirs.task_id] + [s.task_id for s in reversed(mine)]
    assert not truncated
    got, truncated = await store.list_tasks(job_id=mine[0].job_id, limit=5)
    assert [r.spec.task_id for r in got] == [s.task_id for s in reversed(mine[-5:])]
    assert truncated
    got, truncated = await store.list_tasks(state=T.TASK_STATE_SCHEDULED)
    assert [r.spec.task_id for r in got] == [mine[7].task_id, mine[3].task_id] and not truncated
    got, _ = await store.list_tasks(job_id=other_job, state=T.TASK_STATE_SCHEDULED)
    assert got == []

    before = snapshot()
    with pytest.raises(InvalidArgumentError, match="job_id must be 4 bytes, got 3 bytes"):
        await store.list_tasks(job_id=b"abc")
    with pytest.raises(InvalidArgumentError, match="state must be a task state, got 99"):
        await store.list_tasks(state=99)
    with pytest.raises(InvalidArgumentError, match="limit must be at most 10000, got 10001"):
        await store.list_tasks(limit=10_001)
    assert snapshot() == before
