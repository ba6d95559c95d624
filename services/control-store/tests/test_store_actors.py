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
)
from tessera.control_store.store import ControlStore

A = pb.ActorState


def actor(**kw: object) -> pb.ActorInfo:
    base: dict[str, object] = dict(actor_id=ids.new_id("actor_id"), job_id=ids.new_id("job_id"),
                                   class_function_id=ids.new_id("function_id"))
    base.update(kw)
    return pb.ActorInfo(**base)  # type: ignore[arg-type]


async def test_create_and_get_actor(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    a = actor(name="counter", max_restarts=2)
    rec = await store.create_actor(a)
    assert rec.state == A.ACTOR_STATE_PENDING and rec.restarts == 0 and rec.namespace == "default"
    assert rec.created_ms == rec.updated_ms == clock.now_ms
    assert await store.get_actor(a.actor_id) == rec
    assert await store.get_actor(name="counter") == rec
    assert await store.get_actor(name="counter", namespace="default") == rec
    assert rec in await store.list_actors()
    assert published.subjects() == ["tessera.events.actors.created"]


async def test_named_actor_is_unique_per_namespace(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    first = await store.create_actor(actor(name="svc", namespace="team-a"))
    before = snapshot()
    with pytest.raises(AlreadyExistsError, match="an actor named 'svc' already exists in namespace 'team-a'"):
        await store.create_actor(actor(name="svc", namespace="team-a"))
    assert snapshot() == before
    other = await store.create_actor(actor(name="svc", namespace="team-b"))  # another namespace: fine
    assert (await store.get_actor(name="svc", namespace="team-a")).actor_id == first.actor_id
    assert (await store.get_actor(name="svc", namespace="team-b")).actor_id == other.actor_id
    with pytest.raises(NotFoundError, match="no live actor named 'svc' in namespace 'default'"):
        await store.get_actor(name="svc")


async def test_duplicate_actor_id_does_not_claim_the_name(store: ControlStore) -> None:
    a = await store.create_actor(actor())
    with pytest.raises(AlreadyExistsError, match=f"actor {a.actor_id.hex()} already exists"):
        await store.create_actor(actor(actor_id=a.actor_id, name="taken-not"))
    with pytest.raises(NotFoundError):
        await store.get_actor(name="taken-not")
    assert (await store.create_actor(actor(name="taken-not"))).name == "taken-not"


async def test_name_is_released_when_the_actor_dies(store: ControlStore) -> None:
    a = await store.create_actor(actor(name="worker"))
    await store.update_actor(a.actor_id, A.ACTOR_STATE_ALIVE, node_id=ids.new_id("node_id"), address="10.0.0.1:9000")
    dead = await store.update_actor(a.actor_id, A.ACTOR_STATE_DEAD, death_cause="node lost")
    assert dead.state == A.ACTOR_STATE_DEAD and dead.death_cause == "node lost" and dead.address == "10.0.0.1:9000"
    with pytest.raises(NotFoundError, match="no live actor named 'worker'"):
        await store.get_actor(name="worker")
    b = await store.create_actor(actor(name="worker"))
    assert (await store.get_actor(name="worker")).actor_id == b.actor_id
    # the dead actor is still readable by id, and its death does not free the new owner's name
    assert (await store.get_actor(a.actor_id)).state == A.ACTOR_STATE_DEAD
    assert (await store.update_actor(a.actor_id, A.ACTOR_STATE_DEAD)).state == A.ACTOR_STATE_DEAD  # a no-op
    assert (await store.get_actor(name="worker")).actor_id == b.actor_id


async def test_restarts_are_limited(store: ControlStore, clock, snapshot) -> None:  # type: ignore[no-untyped-def]
    a = await store.create_actor(actor(max_restarts=1))
    await store.update_actor(a.actor_id, A.ACTOR_STATE_ALIVE)
    clock.advance(5)
    r = await store.update_actor(a.actor_id, A.ACTOR_STATE_RESTARTING)
    assert r.restarts == 1 and r.updated_ms == clock.now_ms
    await store.update_actor(a.actor_id, A.ACTOR_STATE_ALIVE)
    before = snapshot()
    with pytest.raises(FailedPreconditionError, match=f"actor {a.actor_id.hex()} has used all 1 restarts; mark it DEAD"):
        await store.update_actor(a.actor_id, A.ACTOR_STATE_RESTARTING)
    assert snapshot() == before
    assert (await store.update_actor(a.actor_id, A.ACTOR_STATE_DEAD)).state == A.ACTOR_STATE_DEAD


async def test_no_restarts_and_unlimited_restarts(store: ControlStore) -> None:
    never = await store.create_actor(actor(max_restarts=0))
    await store.update_actor(never.actor_id, A.ACTOR_STATE_ALIVE)
    with pytest.raises(FailedPreconditionError, match="has used all 0 restarts"):
        await store.update_actor(never.actor_id, A.ACTOR_STATE_RESTARTING)
    forever = await store.create_actor(actor(max_restarts=-1))
    await store.update_actor(forever.actor_id, A.ACTOR_STATE_ALIVE)
    for i in range(1, 6):
        assert (await store.update_actor(forever.actor_id, A.ACTOR_STATE_RESTARTING)).restarts == i
        await store.update_actor(forever.actor_id, A.ACTOR_STATE_ALIVE)


@pytest.mark.parametrize(("path", "illegal"), [
    ([], A.ACTOR_STATE_RESTARTING),
    ([A.ACTOR_STATE_ALIVE, A.ACTOR_STATE_DEAD], A.ACTOR_STATE_ALIVE),
    ([A.ACTOR_STATE_ALIVE], A.ACTOR_STATE_PENDING),
])
async def test_illegal_actor_transitions(store: ControlStore, path: list[Any], illegal: Any) -> None:
    a = await store.create_actor(actor(max_restarts=-1))
    for st in path:
        await store.update_actor(a.actor_id, st)
    cur = A.Name(path[-1] if path else A.ACTOR_STATE_PENDING)
    with pytest.raises(FailedPreconditionError, match=f"illegal transition {cur} -> {A.Name(illegal)}"):
        await store.update_actor(a.actor_id, illegal)


async def test_actor_bad_input(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match="actor.actor_id must be 16 bytes, got 4 bytes"):
        await store.create_actor(actor(actor_id=b"abcd"))
    with pytest.raises(InvalidArgumentError, match="actor.job_id must be 4 bytes, got empty"):
        await store.create_actor(actor(job_id=b""))
    with pytest.raises(InvalidArgumentError, match="actor.class_function_id must be 32 bytes"):
        await store.create_actor(actor(class_function_id=b"x"))
    with pytest.raises(InvalidArgumentError, match="actor.max_restarts must be >= -1, got -2"):
        await store.create_actor(actor(max_restarts=-2))
    for bad_name in ("has space", "a" * 65, "dots.are.not.ok", "trailing\n"):
        with pytest.raises(InvalidArgumentError, match="actor.name"):
            await store.create_actor(actor(name=bad_name))
    with pytest.raises(InvalidArgumentError, match="actor.namespace 'bad/ns'"):
        await store.create_actor(actor(namespace="bad/ns", name="ok"))
    assert snapshot() == before
    with pytest.raises(InvalidArgumentError, match="give either actor_id or name, not both"):
        await store.get_actor(ids.new_id("actor_id"), name="x")
    with pytest.raises(InvalidArgumentError, match="actor_id or name is required"):
        await store.get_actor()
    with pytest.raises(InvalidArgumentError, match="actor state must be one of"):
        await store.update_actor(ids.new_id("actor_id"), A.ACTOR_STATE_UNSPECIFIED)
    missing = ids.new_id("actor_id")
    with pytest.raises(NotFoundError, match=f"actor {missing.hex()} not found"):
        await store.update_actor(missing, A.ACTOR_STATE_ALIVE)


async def test_list_actors_by_state(store: ControlStore) -> None:
    a = await store.create_actor(actor())
    b = await store.create_actor(actor())
    await store.update_actor(b.actor_id, A.ACTOR_STATE_ALIVE)
    assert [x.actor_id for x in await store.list_actors(A.ACTOR_STATE_PENDING)] == [a.actor_id]
    assert [x.actor_id for x in await store.list_actors(A.ACTOR_STATE_ALIVE)] == [b.actor_id]
    assert sorted(x.actor_id for x in await store.list_actors()) == sorted([a.actor_id, b.actor_id])


async def test_a_restart_elsewhere_is_claimed_once(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    """Two schedulers see the actor's node die: the conditional update lets only the first restart it."""
    dead, other = ids.new_id("node_id"), ids.new_id("node_id")
    a = await store.create_actor(actor(max_restarts=2))
    await store.update_actor(a.actor_id, A.ACTOR_STATE_ALIVE, node_id=dead, address="10.0.0.2:9000",
                             creation_spec=b"the creation task")
    r = await store.update_actor(a.actor_id, A.ACTOR_STATE_RESTARTING, if_node_id=dead, clear_node=True)
    assert (r.state, r.restarts, r.node_id, r.address, r.creation_spec) == (
        A.ACTOR_STATE_RESTARTING, 1, b"", "", b"the creation task")
    before = snapshot()
    with pytest.raises(FailedPreconditionError, match=f"recorded on node \\(none\\), not {dead.hex()}"):
        await store.update_actor(a.actor_id, A.ACTOR_STATE_RESTARTING, if_node_id=dead, clear_node=True)
    assert snapshot() == before
    back = await store.update_actor(a.actor_id, A.ACTOR_STATE_ALIVE, node_id=other)
    assert (back.node_id, back.restarts) == (other, 1)
    with pytest.raises(FailedPreconditionError, match=f"recorded on node {other.hex()}, not {dead.hex()}"):
        await store.update_actor(a.actor_id, A.ACTOR_STATE_DEAD, if_node_id=dead)
    with pytest.raises(InvalidArgumentError, match="either node_id or clear_node"):
        await store.update_actor(a.actor_id, A.ACTOR_STATE_RESTARTING, node_id=other, clear_node=True)
    assert (await store.get_actor(a.actor_id)).state == A.ACTOR_STATE_ALIVE
