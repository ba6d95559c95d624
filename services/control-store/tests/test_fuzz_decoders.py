"""What the control store decodes from NATS, fuzzed: the ChangeEvents a Watch relays.

Anyone connected to NATS can publish on ``tessera.events.*``. A Watch relays the ChangeEvents
it finds there; bytes that are not one are dropped, and the stream goes on (it once ended with
INTERNAL on the first such message).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import nats
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common.registry import control_store_stub
from tessera.control_store import events

from .test_grpc import Watcher  # noqa: TID252 - the Watch reader of the gRPC tests

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def stub(control_store: str) -> Iterator[Any]:
    ch, s = control_store_stub(control_store, timeout=10)
    yield s
    ch.close()


def change_events() -> st.SearchStrategy[bytes]:
    """ChangeEvents with arbitrary fields, as bytes."""
    change = st.builds(pb.Change, key=st.binary(max_size=40), value=st.binary(max_size=64))
    event = st.builds(pb.ChangeEvent, table=st.text(max_size=12), op=st.integers(-(2**31), 2**31 - 1),
                      namespace=st.text(max_size=12), changes=st.lists(change, max_size=3),
                      time_ms=st.integers(-(2**63), 2**63 - 1))
    return event.map(lambda e: e.SerializeToString())


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), change_events())


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.lists(payloads(), min_size=1, max_size=4))
@example(data=[b"\xff"])  # not a protobuf: the Watch ended with INTERNAL (DecodeError)
@example(data=[b"\x0a\x05ab"])  # a truncated field
def test_a_watch_outlives_what_is_not_an_event(data: list[bytes], stub: Any, control_store: str, nats_url: str) -> None:
    namespace = "fz" + uuid.uuid4().hex[:10]
    w = Watcher(control_store, pb.WatchRequest(table="kv", namespace=namespace))
    try:
        async def publish() -> None:
            nc = await nats.connect(nats_url)
            try:
                for d in data:
                    await nc.publish(events.watch_subject("kv", namespace).replace("*", "created"), d)
                await nc.flush()
            finally:
                await nc.close()

        asyncio.run(publish())
        stub.KvPut(pb.KvPutRequest(namespace=namespace, key=b"real", value=b"1", overwrite=True))
        while True:  # what decoded is relayed as it is; then the real event comes
            item = w.events.get(timeout=10)
            assert not isinstance(item, grpc.RpcError), f"the Watch ended: {item.code()} {item.details()}"  # type: ignore[attr-defined]
            if item.namespace == namespace and [c.key for c in item.changes] == [b"real"]:
                break
    finally:
        w.close()
