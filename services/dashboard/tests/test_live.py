"""Change events fanned out to the open pages: every listener sees every table changed, merged while it is slow,
and a heartbeat while nothing changes."""

from __future__ import annotations

import asyncio

from tessera.dashboard.live import Broadcaster


async def test_every_listener_gets_the_changes_merged() -> None:
    b = Broadcaster()
    fast, slow = b.changes(heartbeat_s=5), b.changes(heartbeat_s=5)
    first = asyncio.ensure_future(anext(fast))
    second = asyncio.ensure_future(anext(slow))
    await asyncio.sleep(0)  # both listening
    assert b.listeners == 2
    b.publish("tasks")
    assert await asyncio.wait_for(first, 1) == {"tasks"}
    assert await asyncio.wait_for(second, 1) == {"tasks"}
    for table in ("tasks", "kv", "tasks", "nodes"):  # nobody reading: merged, not queued
        b.publish(table)
    assert await asyncio.wait_for(anext(slow), 1) == {"tasks", "kv", "nodes"}
    assert await asyncio.wait_for(anext(fast), 1) == {"tasks", "kv", "nodes"}
    await fast.aclose()
    await slow.aclose()
    assert b.listeners == 0 and b.published == 5


async def test_a_heartbeat_while_nothing_changes() -> None:
    b = Broadcaster()
    it = b.changes(heartbeat_s=0.05)
    assert await asyncio.wait_for(anext(it), 1) == set()
    b.publish("actors")
    assert await asyncio.wait_for(anext(it), 1) == {"actors"}
    await it.aclose()
