"""Change events: what the control store announces after each write.

Subjects (core NATS, at most once; readers that must not miss a change re-read
the table after subscribing):

==========================================  =========================================
``tessera.events.<table>.created``          records created (tables below)
``tessera.events.<table>.updated``          records changed
``tessera.events.<table>.deleted``          records removed (value empty; a freed object: why)
``tessera.events.nodes.dead``               a node missed heartbeats for node_timeout_s
``tessera.events.objects.<copy event>``     sealed, evicted, spilled, restored, lost: sent by
                                            the object store of the node concerned
``tessera.events.kv.<namespace>.<op>``      the key-value table, per namespace
==========================================  =========================================

Tables: nodes, jobs, functions, tasks, objects, actors, instances, kv. Each
message is a ``ChangeEvent`` protobuf carrying the ids and, except for deletes,
the serialized records; a large batch is split into several messages, and a
record over ``MAX_VALUE_BYTES`` is announced by its key alone.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from tessera.api.control_store.v1 import control_store_pb2 as pb

ROOT = "tessera.events"
TABLES = ("nodes", "jobs", "functions", "tasks", "objects", "actors", "instances", "kv")
OPS: dict[int, str] = {
    pb.CHANGE_OP_CREATED: "created",
    pb.CHANGE_OP_UPDATED: "updated",
    pb.CHANGE_OP_DELETED: "deleted",
    pb.CHANGE_OP_DEAD: "dead",
    pb.CHANGE_OP_SEALED: "sealed",
    pb.CHANGE_OP_EVICTED: "evicted",
    pb.CHANGE_OP_SPILLED: "spilled",
    pb.CHANGE_OP_RESTORED: "restored",
    pb.CHANGE_OP_LOST: "lost",
}
#: Upper bound of one event message (NATS' default max payload is 1 MiB).
MAX_EVENT_BYTES = 512 * 1024
#: A record larger than this travels without its value (empty): the key announces the change; read the record.
MAX_VALUE_BYTES = MAX_EVENT_BYTES // 2

#: Publishes one serialized event on a subject (wired to NATS by server.py).
Publish = Callable[[str, bytes], Awaitable[None]]


def subject_for(table: str, op: int, namespace: str = "") -> str:
    if table == "kv":
        return f"{ROOT}.kv.{namespace}.{OPS[op]}"
    return f"{ROOT}.{table}.{OPS[op]}"


def watch_subject(table: str, namespace: str = "") -> str:
    if table == "kv":
        return f"{ROOT}.kv.{namespace or '*'}.*"
    return f"{ROOT}.{table}.*"


class Events:
    """Builds ChangeEvents and hands them to ``publish`` in bounded chunks."""

    def __init__(self, publish: Publish | None) -> None:
        self._publish = publish

    async def emit(self, table: str, op: int, changes: Sequence[tuple[bytes, bytes]], *, namespace: str = "") -> None:
        if self._publish is None or not changes:
            return
        subj = subject_for(table, op, namespace)
        now = int(time.time() * 1000)
        # changes.add() fills the event in place: a batch of thousands of records costs one
        # call per change, with no intermediate Change messages to build and copy.
        ev = pb.ChangeEvent(table=table, op=op, namespace=namespace, time_ms=now)  # type: ignore[arg-type]
        add = ev.changes.add
        size = 0
        for key, value in changes:
            if len(value) > MAX_VALUE_BYTES:  # would not fit in a NATS message: the key alone announces it
                value = b""
            add(key=key, value=value)
            size += len(key) + len(value) + 8
            if size >= MAX_EVENT_BYTES:
                await self._send(subj, ev)
                ev = pb.ChangeEvent(table=table, op=op, namespace=namespace, time_ms=now)  # type: ignore[arg-type]
                add, size = ev.changes.add, 0
        if ev.changes:
            await self._send(subj, ev)

    async def _send(self, subj: str, ev: pb.ChangeEvent) -> None:
        assert self._publish is not None
        await self._publish(subj, ev.SerializeToString())
