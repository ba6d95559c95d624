from __future__ import annotations

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common.errors import InvalidArgumentError
from tessera.control_store.store import ControlStore


def inst(service: str = "compiler", instance_id: str = "host-1", **kw: object) -> pb.ServiceInstance:
    return pb.ServiceInstance(service=service, instance_id=instance_id, address=kw.pop("address", "10.0.0.1:5000"),  # type: ignore[arg-type]
                              pid=1234, hostname="host", version="0.1.0", **kw)  # type: ignore[arg-type]


async def test_register_list_deregister(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    assert await store.register_instance(inst("compiler", "c-1"), 15) is True
    assert await store.register_instance(inst("serving", "s-1", address="10.0.0.2:5000"), 15) is True
    assert await store.register_instance(inst("compiler", "c-2"), 15) is True
    listed = await store.list_instances()
    assert [(i.service, i.instance_id) for i in listed] == [("compiler", "c-1"), ("compiler", "c-2"), ("serving", "s-1")]
    assert all(i.last_seen_ms == clock.now_ms for i in listed)
    assert [i.instance_id for i in await store.list_instances("compiler")] == ["c-1", "c-2"]
    assert await store.list_instances("gpu-scheduler") == []
    clock.advance(1000)
    assert await store.register_instance(inst("compiler", "c-1"), 15) is False  # a refresh
    (c1,) = [i for i in await store.list_instances("compiler") if i.instance_id == "c-1"]
    assert c1.last_seen_ms == clock.now_ms
    assert published.subjects() == ["tessera.events.instances.created"] * 3
    assert published.events[0][1].changes[0].key == b"compiler/c-1"
    assert await store.deregister_instance("compiler", "c-1") is True
    assert await store.deregister_instance("compiler", "c-1") is False
    assert [i.instance_id for i in await store.list_instances("compiler")] == ["c-2"]
    assert published.subjects()[-1] == "tessera.events.instances.deleted"


async def test_registration_expires(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    await store.register_instance(inst("compiler", "short"), 5)
    await store.register_instance(inst("compiler", "long"), 60)
    clock.advance(4_999)
    assert await store.reap_expired_instances() == []
    assert len(await store.list_instances()) == 2
    clock.advance(2)
    assert [i.instance_id for i in await store.list_instances()] == ["long"]  # expired ones are not listed
    published.clear()
    assert await store.reap_expired_instances() == [b"compiler/short"]
    assert await store.reap_expired_instances() == []  # announced once
    assert published.subjects() == ["tessera.events.instances.deleted"]
    assert published.events[0][1].changes[0].key == b"compiler/short"
    # a refresh before the TTL keeps it alive
    clock.advance(50_000)
    await store.register_instance(inst("compiler", "long"), 60)
    clock.advance(50_000)
    assert [i.instance_id for i in await store.list_instances()] == ["long"]


@pytest.mark.parametrize(("record", "ttl", "message"), [
    (inst(service="no such"), 15, "instance.service 'no such' must be 1-64 characters"),
    (inst(service=""), 15, "instance.service '' must be"),
    (inst(instance_id="a/b"), 15, "instance.instance_id 'a/b' must be 1-128 characters"),
    (inst(instance_id="host\n"), 15, "instance.instance_id 'host\\\\n' must be"),
    (inst(address=""), 15, "instance.address is required"),
    (inst(), 0, "ttl_s must be between 1 and 86400, got 0"),
    (inst(), -1, "ttl_s must be between 1 and 86400, got -1"),
    (inst(), 86_401, "ttl_s must be between 1 and 86400, got 86401"),
])
async def test_register_rejects_bad_input(store: ControlStore, snapshot, record: pb.ServiceInstance, ttl: int,  # type: ignore[no-untyped-def]
                                          message: str) -> None:
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match=message):
        await store.register_instance(record, ttl)
    assert snapshot() == before


async def test_bad_service_name_in_queries(store: ControlStore) -> None:
    with pytest.raises(InvalidArgumentError, match="service 'a b' must be"):
        await store.list_instances("a b")
    with pytest.raises(InvalidArgumentError, match="service '' must be"):
        await store.deregister_instance("", "x")
