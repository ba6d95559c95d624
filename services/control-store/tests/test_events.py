"""Change events on a real NATS: the store's publish wired to a tessera.common.bus.Bus."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

import pytest
from nats.aio.msg import Msg

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids
from tessera.common.bus import Bus
from tessera.control_store import events
from tessera.control_store.shards import ShardedRedis
from tessera.control_store.store import ControlStore


class Feed:
    def __init__(self) -> None:
        self.got: list[tuple[str, pb.ChangeEvent, int]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.got.append((msg.subject, pb.ChangeEvent.FromString(msg.data), len(msg.data)))

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, f"events so far: {[s for s, _, _ in self.got]}"
            await asyncio.sleep(0.01)

    def subjects(self) -> list[str]:
        return [s for s, _, _ in self.got]


@pytest.fixture
async def wired(nats_url: str, redis_urls2: list[str]) -> AsyncIterator[tuple[ControlStore, Feed]]:
    writer = await Bus.connect(nats_url, name="control-store-under-test")
    reader = await Bus.connect(nats_url, name="event-reader")
    feed = Feed()
    await reader.subscribe("tessera.events.>", feed.on_msg)
    db = ShardedRedis(redis_urls2)
    store = ControlStore(db, publish=writer.publish)
    try:
        yield store, feed
    finally:
        await writer.close()
        await reader.close()
        await db.close()


async def test_writes_are_announced(wired: tuple[ControlStore, Feed]) -> None:
    store, feed = wired
    nid, jid = ids.new_id("node_id"), ids.new_id("job_id")
    await store.register_node(pb.NodeInfo(node_id=nid, address="n:1", resources_total={"CPU": 1}))
    await store.create_job(pb.JobInfo(job_id=jid))
    fid, _ = await store.export_function(jid, "m.f", b"code")
    t = pb.TaskSpec(task_id=ids.new_id("task_id"), job_id=jid, function_id=fid)
    await store.create_tasks([t])
    await store.update_task_states([pb.TaskStateUpdate(task_id=t.task_id, state=pb.TASK_STATE_SCHEDULED, node_id=nid)])
    await store.kv_put("my-app", b"key", b"value", overwrite=True)
    await store.kv_delete("my-app", b"key")
    await store.update_job_state(jid, pb.JOB_STATE_SUCCEEDED)
    want = [
        "tessera.events.nodes.created", "tessera.events.jobs.created", "tessera.events.functions.created",
        "tessera.events.tasks.created", "tessera.events.tasks.updated", "tessera.events.kv.my-app.created",
        "tessera.events.kv.my-app.deleted", "tessera.events.jobs.updated",
    ]
    await feed.wait_for(lambda: len(feed.got) >= len(want))
    assert feed.subjects() == want  # one publisher: in order
    by_subject = {s: ev for s, ev, _ in feed.got}
    node_ev = by_subject["tessera.events.nodes.created"]
    assert (node_ev.table, node_ev.op, node_ev.time_ms > 0) == ("nodes", pb.CHANGE_OP_CREATED, True)
    assert pb.NodeInfo.FromString(node_ev.changes[0].value).address == "n:1"
    assert by_subject["tessera.events.functions.created"].changes[0].key == hashlib.sha256(b"code").digest()
    upd = pb.TaskRecord.FromString(by_subject["tessera.events.tasks.updated"].changes[0].value)
    assert (upd.spec.task_id, upd.state, upd.node_id) == (t.task_id, pb.TASK_STATE_SCHEDULED, nid)
    kv = by_subject["tessera.events.kv.my-app.created"]
    assert (kv.table, kv.namespace, kv.op) == ("kv", "my-app", pb.CHANGE_OP_CREATED)
    assert [(c.key, c.value) for c in kv.changes] == [(b"key", b"value")]
    kv_del = by_subject["tessera.events.kv.my-app.deleted"]
    assert [(c.key, c.value) for c in kv_del.changes] == [(b"key", b"")]
    assert pb.JobInfo.FromString(by_subject["tessera.events.jobs.updated"].changes[0].value).state == pb.JOB_STATE_SUCCEEDED


async def test_a_large_batch_is_split(wired: tuple[ControlStore, Feed]) -> None:
    store, feed = wired
    jid, fid = ids.new_id("job_id"), ids.new_id("function_id")
    specs = [pb.TaskSpec(task_id=ids.new_id("task_id"), job_id=jid, function_id=fid, args=bytes(600)) for _ in range(3000)]
    await store.create_tasks(specs)
    await feed.wait_for(lambda: sum(len(ev.changes) for _, ev, _ in feed.got) >= len(specs))
    assert len(feed.got) >= 3
    assert {s for s, _, _ in feed.got} == {"tessera.events.tasks.created"}
    assert [c.key for _, ev, _ in feed.got for c in ev.changes] == [s.task_id for s in specs]
    assert max(size for _, _, size in feed.got) <= events.MAX_EVENT_BYTES + 64 * 1024


async def test_a_record_too_large_for_an_event_is_announced_by_key(wired: tuple[ControlStore, Feed]) -> None:
    store, feed = wired
    big = b"\x07" * (2 * 1024 * 1024)  # within the kv limit, over NATS' default max payload
    assert await store.kv_put("blobs", b"big", big, overwrite=True)
    assert await store.kv_get("blobs", b"big") == big
    code = b"#" * (3 * 1024 * 1024)
    fid, created = await store.export_function(b"", "big.fn", code)
    assert created
    await store.kv_put("blobs", b"small", b"s", overwrite=True)
    await feed.wait_for(lambda: len(feed.got) >= 3)
    (s1, kv_big, _), (s2, fn, _), (s3, kv_small, _) = feed.got
    assert (s1, [(c.key, c.value) for c in kv_big.changes]) == ("tessera.events.kv.blobs.created", [(b"big", b"")])
    assert (s2, [(c.key, c.value) for c in fn.changes]) == ("tessera.events.functions.created", [(fid, b"")])
    assert (s3, [(c.key, c.value) for c in kv_small.changes]) == ("tessera.events.kv.blobs.created", [(b"small", b"s")])


@pytest.mark.parametrize("value_size", [0, 1000, events.MAX_VALUE_BYTES - 1, events.MAX_VALUE_BYTES,
                                        events.MAX_VALUE_BYTES + 1, 5 * 1024 * 1024])
async def test_every_event_fits_a_nats_message(value_size: int) -> None:
    sent: list[tuple[str, bytes]] = []

    async def publish(subject: str, data: bytes) -> None:
        sent.append((subject, data))

    changes = [(i.to_bytes(16, "big"), bytes([i % 256]) * value_size) for i in range(12)]
    await events.Events(publish).emit("tasks", pb.CHANGE_OP_UPDATED, changes)
    assert sent and all(len(d) <= 1024 * 1024 for _, d in sent)
    got = [c for _, d in sent for c in pb.ChangeEvent.FromString(d).changes]
    assert [c.key for c in got] == [k for k, _ in changes]
    keep = value_size <= events.MAX_VALUE_BYTES
    assert [c.value for c in got] == [v if keep else b"" for _, v in changes]


async def test_no_publisher_no_events() -> None:
    await events.Events(None).emit("kv", pb.CHANGE_OP_CREATED, [(b"k", b"v")], namespace="x")  # nothing to do
    assert events.subject_for("kv", pb.CHANGE_OP_DELETED, "ns") == "tessera.events.kv.ns.deleted"
    assert events.watch_subject("kv") == "tessera.events.kv.*.*"
    assert events.watch_subject("kv", "ns") == "tessera.events.kv.ns.*"
    assert events.watch_subject("nodes") == "tessera.events.nodes.*"
