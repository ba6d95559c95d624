from __future__ import annotations

import re

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from tessera.control_store.store import MAX_KV_KEY, MAX_KV_VALUE, ControlStore


async def test_put_get_overwrite(store: ControlStore, published) -> None:  # type: ignore[no-untyped-def]
    assert await store.kv_put("app", b"k", b"v1", overwrite=True) is True
    assert await store.kv_get("app", b"k") == b"v1"
    assert await store.kv_put("app", b"k", b"v2", overwrite=True) is False  # replaced, not created
    assert await store.kv_get("app", b"k") == b"v2"
    assert published.subjects() == ["tessera.events.kv.app.created", "tessera.events.kv.app.updated"]
    ev = published.events[1][1]
    assert (ev.table, ev.op, ev.namespace) == ("kv", pb.CHANGE_OP_UPDATED, "app")
    assert [(c.key, c.value) for c in ev.changes] == [(b"k", b"v2")]


async def test_put_without_overwrite(store: ControlStore, snapshot, published) -> None:  # type: ignore[no-untyped-def]
    assert await store.kv_put("app", b"once", b"first", overwrite=False) is True
    before = snapshot()
    published.clear()
    with pytest.raises(AlreadyExistsError, match="key b'once' already exists in namespace 'app'"):
        await store.kv_put("app", b"once", b"second", overwrite=False)
    assert snapshot() == before
    assert published.events == []
    assert await store.kv_get("app", b"once") == b"first"


async def test_get_and_delete(store: ControlStore, published) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFoundError, match="key b'nope' not found in namespace 'app'"):
        await store.kv_get("app", b"nope")
    await store.kv_put("app", b"k", b"", overwrite=True)  # an empty value is a value
    assert await store.kv_get("app", b"k") == b""
    published.clear()
    assert await store.kv_delete("app", b"k") is True
    assert await store.kv_delete("app", b"k") is False
    assert published.subjects() == ["tessera.events.kv.app.deleted"]  # once
    with pytest.raises(NotFoundError):
        await store.kv_get("app", b"k")
    assert await store.kv_list("app") == []


async def test_namespaces_are_separate(store: ControlStore) -> None:
    await store.kv_put("a", b"k", b"in a", overwrite=True)
    await store.kv_put("b", b"k", b"in b", overwrite=True)
    assert await store.kv_get("a", b"k") == b"in a"
    assert await store.kv_get("b", b"k") == b"in b"
    await store.kv_delete("a", b"k")
    assert await store.kv_list("a") == [] and await store.kv_list("b") == [b"k"]


KEYS = [b"a", b"ab", b"abc", b"a\xff", b"a\xff\x00", b"a\xff\xff", b"b", b"\x00", b"\xfe", b"\xff", b"\xff\x00",
        b"\xff\xff", b"\xff\xff\xff", b"z\x00\x01"]


@pytest.mark.parametrize(("prefix", "want"), [
    (b"", sorted(KEYS)),
    (b"a", [b"a", b"ab", b"abc", b"a\xff", b"a\xff\x00", b"a\xff\xff"]),
    (b"ab", [b"ab", b"abc"]),
    (b"a\xff", [b"a\xff", b"a\xff\x00", b"a\xff\xff"]),
    (b"a\xff\xff", [b"a\xff\xff"]),
    (b"\xff", [b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff"]),
    (b"\xff\xff", [b"\xff\xff", b"\xff\xff\xff"]),
    (b"\x00", [b"\x00"]),
    (b"c", []),
    (b"abcd", []),
])
async def test_list_by_prefix(store: ControlStore, prefix: bytes, want: list[bytes]) -> None:
    for k in KEYS:
        await store.kv_put("ns", k, b"v:" + k, overwrite=True)
    await store.kv_put("other", b"a-other", b"x", overwrite=True)
    assert await store.kv_list("ns", prefix) == want


async def test_many_keys_over_shards(store: ControlStore) -> None:
    keys = [f"user/{i:03d}".encode() for i in range(60)]
    for k in keys:
        await store.kv_put("big", k, k[::-1], overwrite=False)
    assert await store.kv_list("big", b"user/") == keys
    assert await store.kv_list("big", b"user/05") == keys[50:60]
    for k in keys[::7]:
        assert await store.kv_get("big", k) == k[::-1]


@pytest.mark.parametrize("ns", ["", "has space", "a.b", "a/b", "x" * 65, "ns\n", "ü"])
async def test_namespace_is_checked(store: ControlStore, snapshot, ns: str) -> None:  # type: ignore[no-untyped-def]
    before = snapshot()
    for call in (store.kv_put(ns, b"k", b"v", overwrite=True), store.kv_get(ns, b"k"), store.kv_delete(ns, b"k"),
                 store.kv_list(ns)):
        with pytest.raises(InvalidArgumentError, match=re.escape(f"namespace {ns!r} must be 1-64 characters")):
            await call
    assert snapshot() == before


async def test_key_and_value_limits(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match="key is empty"):
        await store.kv_put("ns", b"", b"v", overwrite=True)
    with pytest.raises(InvalidArgumentError, match=f"key of {MAX_KV_KEY + 1} bytes exceeds the limit of {MAX_KV_KEY}"):
        await store.kv_put("ns", b"k" * (MAX_KV_KEY + 1), b"v", overwrite=True)
    with pytest.raises(InvalidArgumentError,
                       match=f"value of {MAX_KV_VALUE + 1} bytes exceeds the limit of {MAX_KV_VALUE}; put bulk bytes"):
        await store.kv_put("ns", b"k", b"\x00" * (MAX_KV_VALUE + 1), overwrite=True)
    assert snapshot() == before
    assert await store.kv_put("ns", b"k" * MAX_KV_KEY, b"\x01" * MAX_KV_VALUE, overwrite=True)
    assert await store.kv_get("ns", b"k" * MAX_KV_KEY) == b"\x01" * MAX_KV_VALUE
