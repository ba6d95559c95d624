from __future__ import annotations

from typing import Any

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids
from tessera.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from tessera.control_store.store import ControlStore

TIMEOUT_MS = 10_000  # node_timeout_s of the store fixture


def node(node_id: bytes | None = None, **kw: object) -> pb.NodeInfo:
    base: dict[str, object] = dict(node_id=ids.new_id("node_id") if node_id is None else node_id, address="10.0.0.1:7000",
                                   resources_total={"CPU": 8.0, "GPU": 1.0})
    base.update(kw)
    return pb.NodeInfo(**base)  # type: ignore[arg-type]


async def test_register_node(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    n = node(labels={"zone": "a"}, object_store_address="10.0.0.1:7001")
    rec = await store.register_node(n)
    assert rec.state == pb.NODE_STATE_ALIVE
    assert rec.registered_ms == rec.last_heartbeat_ms == clock.now_ms
    assert dict(rec.resources_available) == {"CPU": 8.0, "GPU": 1.0}  # defaults to the total
    assert dict(rec.labels) == {"zone": "a"} and rec.object_store_address == "10.0.0.1:7001"
    assert await store.get_node(n.node_id) == rec
    ((subject, ev),) = published.events
    assert subject == "tessera.events.nodes.created"
    assert ev.table == "nodes" and ev.op == pb.CHANGE_OP_CREATED
    assert [(c.key, pb.NodeInfo.FromString(c.value)) for c in ev.changes] == [(n.node_id, rec)]


async def test_reregister_keeps_registration_time(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    n = node()
    first = await store.register_node(n)
    clock.advance(5_000)
    again = await store.register_node(node(n.node_id, address="10.0.0.2:7000", resources_available={"CPU": 2.0}))
    assert again.registered_ms == first.registered_ms
    assert again.last_heartbeat_ms == clock.now_ms
    assert again.address == "10.0.0.2:7000"
    assert dict(again.resources_available) == {"CPU": 2.0}
    assert published.subjects() == ["tessera.events.nodes.created", "tessera.events.nodes.updated"]
    assert [n.node_id for n in await store.list_nodes()] == [n.node_id]


@pytest.mark.parametrize(("bad", "message"), [
    (dict(node_id=b"\x01" * 3), "node_id must be 16 bytes, got 3 bytes"),
    (dict(node_id=b""), "node_id must be 16 bytes, got empty"),
    (dict(address=""), "node.address is required"),
    (dict(resources_total={"CPU": -1.0}), "node.resources_total: resource 'CPU' must be >= 0, got -1.0"),
    (dict(resources_total={"": 1.0}), "node.resources_total: a resource name is empty"),
    (dict(resources_available={"GPU": float("nan")}), "node.resources_available: resource 'GPU' must be >= 0"),
])
async def test_register_rejects_bad_input(store: ControlStore, snapshot, bad: dict[str, Any], message: str) -> None:  # type: ignore[no-untyped-def]
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        await store.register_node(node(**bad))
    assert snapshot() == before


async def test_heartbeat(store: ControlStore, clock) -> None:  # type: ignore[no-untyped-def]
    n = node()
    await store.register_node(n)
    clock.advance(3_000)
    assert await store.node_heartbeat(n.node_id, {"CPU": 3.0}) == pb.NODE_STATE_ALIVE
    rec = await store.get_node(n.node_id)
    assert rec.last_heartbeat_ms == clock.now_ms
    assert dict(rec.resources_available) == {"CPU": 3.0}
    clock.advance(1_000)
    assert await store.node_heartbeat(n.node_id, {}) == pb.NODE_STATE_ALIVE  # empty: resources unchanged
    rec = await store.get_node(n.node_id)
    assert dict(rec.resources_available) == {"CPU": 3.0} and rec.last_heartbeat_ms == clock.now_ms


async def test_heartbeat_of_unknown_node(store: ControlStore) -> None:
    nid = ids.new_id("node_id")
    with pytest.raises(NotFoundError, match=f"node {nid.hex()} not found"):
        await store.node_heartbeat(nid, {})
    with pytest.raises(NotFoundError, match=f"node {nid.hex()} not found"):
        await store.get_node(nid)
    with pytest.raises(InvalidArgumentError, match="node_id must be 16 bytes, got 4 bytes"):
        await store.node_heartbeat(b"abcd", {})


async def test_silent_node_is_declared_dead(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    quiet, chatty = node(), node()
    await store.register_node(quiet)
    await store.register_node(chatty)
    clock.advance(TIMEOUT_MS - 1)
    assert await store.reap_dead_nodes() == []
    assert await store.node_heartbeat(chatty.node_id, {}) == pb.NODE_STATE_ALIVE
    clock.advance(1)  # quiet has now been silent for exactly the timeout
    published.clear()
    dead = await store.reap_dead_nodes()
    assert [d.node_id for d in dead] == [quiet.node_id]
    assert dead[0].state == pb.NODE_STATE_DEAD
    assert (await store.get_node(quiet.node_id)).state == pb.NODE_STATE_DEAD
    assert (await store.get_node(chatty.node_id)).state == pb.NODE_STATE_ALIVE
    ((subject, ev),) = published.events
    assert subject == "tessera.events.nodes.dead" and ev.op == pb.CHANGE_OP_DEAD
    assert [c.key for c in ev.changes] == [quiet.node_id]
    assert pb.NodeInfo.FromString(ev.changes[0].value).state == pb.NODE_STATE_DEAD
    # reaping again marks nothing and announces nothing
    published.clear()
    assert await store.reap_dead_nodes() == []
    assert published.events == []
    assert [n.node_id for n in await store.list_nodes(pb.NODE_STATE_DEAD)] == [quiet.node_id]
    assert [n.node_id for n in await store.list_nodes(pb.NODE_STATE_ALIVE)] == [chatty.node_id]
    assert sorted(n.node_id for n in await store.list_nodes()) == sorted([quiet.node_id, chatty.node_id])
    # chatty goes quiet too, later
    clock.advance(TIMEOUT_MS)
    assert [d.node_id for d in await store.reap_dead_nodes()] == [chatty.node_id]


async def test_dead_node_stays_dead(store: ControlStore, clock, snapshot) -> None:  # type: ignore[no-untyped-def]
    n = node()
    await store.register_node(n)
    clock.advance(TIMEOUT_MS + 1)
    assert len(await store.reap_dead_nodes()) == 1
    before = snapshot()
    assert await store.node_heartbeat(n.node_id, {"CPU": 1.0}) == pb.NODE_STATE_DEAD
    with pytest.raises(FailedPreconditionError, match=f"node {n.node_id.hex()} was declared dead"):
        await store.register_node(n)
    assert snapshot() == before
    rec = await store.get_node(n.node_id)
    assert rec.state == pb.NODE_STATE_DEAD and dict(rec.resources_available) == {"CPU": 8.0, "GPU": 1.0}
    clock.advance(TIMEOUT_MS * 3)
    assert await store.reap_dead_nodes() == []  # a dead node is not declared dead twice


async def test_many_nodes_over_shards(store: ControlStore, clock) -> None:  # type: ignore[no-untyped-def]
    nodes = [node() for _ in range(20)]
    for n in nodes:
        await store.register_node(n)
    clock.advance(TIMEOUT_MS // 2)
    for n in nodes[:10]:
        await store.node_heartbeat(n.node_id, {})
    clock.advance(TIMEOUT_MS // 2)
    dead = await store.reap_dead_nodes()
    assert sorted(d.node_id for d in dead) == sorted(n.node_id for n in nodes[10:])
    assert len(await store.list_nodes(pb.NODE_STATE_ALIVE)) == 10


async def test_a_node_with_a_late_index_update_is_still_watched(store: ControlStore, clock) -> None:  # type: ignore[no-untyped-def]
    # A heartbeat writes the record, then the heartbeat index: a sweep that reads the index in
    # between sees a stale score but a fresh record. The node must stay watched.
    n = node()
    await store.register_node(n)
    clock.advance(TIMEOUT_MS + 1)
    await store.node_heartbeat(n.node_id, {})
    await store.db.shard(n.node_id).zadd(b"node:heartbeats", {n.node_id.hex(): clock.now_ms - TIMEOUT_MS - 1})
    assert await store.reap_dead_nodes() == []  # its record says it is alive
    assert (await store.get_node(n.node_id)).state == pb.NODE_STATE_ALIVE
    clock.advance(TIMEOUT_MS + 1)  # then it really goes silent
    assert [d.node_id for d in await store.reap_dead_nodes()] == [n.node_id]
