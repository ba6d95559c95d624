"""Liveness sweeps and service registration: in the domain, and in running processes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.api.control_store.v1 import control_store_pb2_grpc as pb_grpc
from tessera.common import ids
from tessera.common.config import Settings
from tessera.common.registry import control_store_aio_stub, grpc_registration, instance_record
from tessera.common.rpc import stream_channel
from tessera.control_store.liveness import LivenessMonitor
from tessera.control_store.store import ControlStore


async def test_sweep_marks_nodes_dead_and_drops_expired_instances(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    nid = ids.new_id("node_id")
    await store.register_node(pb.NodeInfo(node_id=nid, address="n:1"))
    await store.register_instance(pb.ServiceInstance(service="compiler", instance_id="c1", address="a:1"), 5)
    monitor = LivenessMonitor(store, interval_s=60)
    await monitor.sweep()
    assert (await store.get_node(nid)).state == pb.NODE_STATE_ALIVE
    clock.advance(10_001)
    published.clear()
    await monitor.sweep()
    assert (await store.get_node(nid)).state == pb.NODE_STATE_DEAD
    assert await store.list_instances() == []
    assert published.subjects() == ["tessera.events.nodes.dead", "tessera.events.instances.deleted"]


async def test_monitor_runs_until_stopped(store: ControlStore, clock) -> None:  # type: ignore[no-untyped-def]
    nid = ids.new_id("node_id")
    await store.register_node(pb.NodeInfo(node_id=nid, address="n:1"))
    clock.advance(60_000)
    monitor = LivenessMonitor(store, interval_s=0.05)
    monitor.start()
    try:
        deadline = time.monotonic() + 5
        while (await store.get_node(nid)).state != pb.NODE_STATE_DEAD:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await monitor.stop()
    assert monitor._task is not None and monitor._task.done()


def test_a_silent_node_is_declared_dead_by_the_service(launcher) -> None:  # type: ignore[no-untyped-def]
    cs = launcher.start("cs-live", TESSERA_NODE_TIMEOUT_S="1", TESSERA_HEARTBEAT_INTERVAL_S="0.2")
    ch, stub = cs.stub()
    nid = ids.new_id("node_id")
    with stream_channel(cs.address) as sch:
        watch = pb_grpc.ControlStoreServiceStub(sch).Watch(pb.WatchRequest(table="nodes"), timeout=15)
        watch.initial_metadata()
        stub.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(node_id=nid, address="n:1")))
        for _ in range(4):  # the node keeps beating for longer than the timeout: it stays ALIVE
            time.sleep(0.3)
            assert stub.NodeHeartbeat(pb.NodeHeartbeatRequest(node_id=nid)).state == pb.NODE_STATE_ALIVE
        last_beat = time.monotonic()
        ops = []
        for resp in watch:  # then it goes silent
            ops.append(resp.event.op)
            if resp.event.op == pb.CHANGE_OP_DEAD:
                assert [c.key for c in resp.event.changes] == [nid]
                break
        watch.cancel()
    assert ops[0] == pb.CHANGE_OP_CREATED and ops[-1] == pb.CHANGE_OP_DEAD
    assert time.monotonic() - last_beat >= 0.9  # not before node_timeout_s (1 s) of silence
    assert stub.GetNode(pb.GetNodeRequest(node_id=nid)).node.state == pb.NODE_STATE_DEAD
    assert stub.NodeHeartbeat(pb.NodeHeartbeatRequest(node_id=nid)).state == pb.NODE_STATE_DEAD
    ch.close()


async def test_grpc_registration_of_another_service(control_store: str) -> None:
    settings = Settings(control_store_address=control_store, instance_id="compiler-test-1", heartbeat_interval_s=0.1,
                        instance_ttl_s=5)
    channel, stub = control_store_aio_stub(settings)
    record = instance_record("compiler", settings, "10.9.9.9:5000")
    reg = grpc_registration(record, settings, stub)

    async def listed() -> list[Any]:
        resp = await stub.ListInstances(pb.ListInstancesRequest(service="compiler"))
        return [i for i in resp.instances if i.instance_id == "compiler-test-1"]

    try:
        await reg.start()
        (me,) = await listed()
        assert (me.address, me.pid, me.version) == ("10.9.9.9:5000", record.pid, record.version)
        first_seen = me.last_seen_ms
        deadline = time.monotonic() + 5
        while (await listed())[0].last_seen_ms == first_seen:  # refreshed every heartbeat
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await reg.stop()
        assert await listed() == []
        await asyncio.sleep(0.3)
        assert await listed() == [], "a stopped registration must not refresh itself"
    finally:
        await channel.close()


async def test_registration_outlives_a_failing_refresh() -> None:
    from tessera.common.registry import Registration

    calls: list[str] = []

    async def register(rec: pb.ServiceInstance, ttl: int) -> None:
        calls.append("register")
        if len(calls) == 2:
            raise ConnectionError("control store restarting")

    async def deregister(service: str, instance_id: str) -> None:
        calls.append("deregister")
        raise ConnectionError("already gone")

    reg = Registration(pb.ServiceInstance(service="s", instance_id="i"), register=register, deregister=deregister,
                       interval_s=0.02, ttl_s=1)
    await reg.start()
    deadline = time.monotonic() + 5
    while calls.count("register") < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await reg.stop()  # a failing deregistration is logged, not raised
    n = len(calls)
    await asyncio.sleep(0.1)
    assert len(calls) == n and calls[-1] == "deregister"
