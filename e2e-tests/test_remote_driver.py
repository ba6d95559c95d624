"""A driver that maps no arena (as a Ray Client driver): forced to remote mode on a `tessera up` stack,
its puts and gets stream over gRPC and the whole task API works (large arguments and results, actors)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import grpc
import numpy as np
import pytest
import stacks

import tessera
from tessera import _api
from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.client import objects
from tessera.client._remote_objects import RemoteObjectStoreClient, arena_mappable
from tessera.common import ids
from tessera.common.errors import InvalidArgumentError
from tessera.exceptions import GetTimeoutError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 10**6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "remote-driver", TESSERA_NUM_CPUS="2",
                        TESSERA_OBJECT_STORE_MEMORY=str(1024 * 2**20)) as c:
        with c.driving("e2e-remote-driver", TESSERA_CLIENT_MODE="remote"):
            yield c


def _root(a: np.ndarray) -> Any:
    """The object an array's memory finally belongs to."""
    x: Any = a
    while isinstance(x, np.ndarray) and x.base is not None:
        x = x.base
    return x.obj if isinstance(x, memoryview) else x


@tessera.remote
def double(a: np.ndarray) -> np.ndarray:
    return a * 2


@tessera.remote
def make(n: int, value: float) -> np.ndarray:
    return np.full(n, value)


@tessera.remote
def pair(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n, dtype=np.float64), np.ones(n, dtype=np.int32)


@tessera.remote
def checksum(a: np.ndarray) -> float:
    return float(a.sum())


@tessera.remote
class Holder:
    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def scaled(self, k: float) -> np.ndarray:
        return self.a * k

    def add(self, b: np.ndarray) -> float:
        return float((self.a + b).sum())


def test_the_driver_streams_instead_of_mapping(cluster: stacks.Cluster) -> None:
    client = _api.object_client()
    assert isinstance(client, RemoteObjectStoreClient)
    assert not hasattr(client, "_arena")


def test_put_and_get_of_100_mb_both_ways(cluster: stacks.Cluster) -> None:
    a = np.random.default_rng(0).random(100 * MB // 8)
    ref = tessera.put(a)
    b = tessera.get(ref, timeout=120)
    assert np.array_equal(a, b)
    assert not b.flags.writeable
    root = _root(b)
    assert isinstance(root, np.ndarray) and np.shares_memory(b, root), "the array must be a view of the read buffer"
    # what the remote driver wrote is what a mapped client on the node reads in place
    with tessera.ObjectStoreClient(cluster.address("object-store")) as local:
        c = local.get(ref, timeout=30)
        assert np.shares_memory(c, local._arena) and np.array_equal(a, c)
        del c
        # and what a mapped client put, the remote driver reads
        ref2 = local.put(a[::-1].copy())
    assert np.array_equal(tessera.get(ref2, timeout=120), a[::-1])


def test_a_second_get_while_a_value_lives_reuses_its_buffer(cluster: stacks.Cluster) -> None:
    ref = tessera.put(np.arange(2 * MB // 8, dtype=np.float64))
    first = tessera.get(ref, timeout=60)
    second = tessera.get(ref, timeout=60)
    assert _root(first) is _root(second)


def test_tasks_take_and_return_large_arrays(cluster: stacks.Cluster) -> None:
    a = np.random.default_rng(1).random(20 * MB // 8)
    doubled = tessera.get(double.remote(a), timeout=120)  # a large argument by value: streamed up first
    assert np.array_equal(doubled, a * 2) and not doubled.flags.writeable
    ref = make.remote(30 * MB // 8, 3.0)
    out = tessera.get(ref, timeout=120)
    assert out.shape == (30 * MB // 8,) and np.all(out == 3.0)
    assert tessera.get(checksum.remote(ref), timeout=120) == 3.0 * (30 * MB // 8)  # a ref argument


def test_arrays_returned_are_views_of_one_buffer(cluster: stacks.Cluster) -> None:
    n = 4 * MB // 8
    x, y = tessera.get(pair.remote(n), timeout=120)
    assert np.array_equal(x, np.arange(n, dtype=np.float64)) and np.all(y == 1)
    rx, ry = _root(x), _root(y)
    assert rx is ry, "both arrays must be views of the one buffer the object was read into"
    assert isinstance(rx, np.ndarray) and rx.nbytes >= x.nbytes + y.nbytes
    assert np.shares_memory(x, rx) and np.shares_memory(y, rx)


def test_actors_with_large_state_arguments_and_results(cluster: stacks.Cluster) -> None:
    a = np.random.default_rng(2).random(10 * MB // 8)
    h = Holder.remote(a)
    assert np.array_equal(tessera.get(h.scaled.remote(0.5), timeout=120), a * 0.5)
    b = np.ones_like(a)
    assert tessera.get(h.add.remote(b), timeout=120) == pytest.approx(float((a + 1).sum()))
    tessera.kill(h)


def test_small_values_and_timeouts(cluster: stacks.Cluster) -> None:
    small = {"k": [1, 2, 3], "s": "text"}
    assert tessera.get(tessera.put(small), timeout=30) == small
    present = tessera.put(np.ones(MB // 8))
    assert np.all(_api.object_client().get(present, timeout=0) == 1.0)  # there now: no wait needed
    t0 = time.monotonic()
    with pytest.raises(GetTimeoutError):  # nowhere in the cluster: not available in time, as for a mapped client
        _api.object_client().get(tessera.ObjectRef(ids.new_id("object_id")), timeout=0.5)
    assert time.monotonic() - t0 < 5.0


def test_mode_selection(cluster: stacks.Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    address = cluster.address("object-store")
    monkeypatch.setenv("TESSERA_CLIENT_MODE", "bogus")
    with pytest.raises(InvalidArgumentError, match="TESSERA_CLIENT_MODE must be local, remote or auto, got 'bogus'"):
        objects.open_object_client(address)
    for mode, cls in (("local", tessera.ObjectStoreClient), ("remote", RemoteObjectStoreClient),
                      ("auto", tessera.ObjectStoreClient), ("", tessera.ObjectStoreClient)):
        monkeypatch.setenv("TESSERA_CLIENT_MODE", mode)
        with objects.open_object_client(address) as c:
            assert type(c) is cls, mode
    with RemoteObjectStoreClient(address) as c:  # what auto looks at: this host, where the arena file is
        hello = pb.OpenSessionResponse(hostname=c.hostname, arena_path=f"/dev/shm/tessera-{c.node_id.hex()}.arena")
    assert arena_mappable(hello)
    assert not arena_mappable(pb.OpenSessionResponse(hostname="another-host", arena_path=hello.arena_path))
    assert not arena_mappable(pb.OpenSessionResponse(hostname=hello.hostname, arena_path="/dev/shm/no-such-arena"))


def test_streams_carry_the_token_under_auth(tmp_path_factory: pytest.TempPathFactory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.common import auth

    with stacks.running(tmp_path_factory, "remote-secured", "--auth") as c:
        address = c.address("object-store")
        monkeypatch.setenv("TESSERA_AUTH_TOKEN_FILE", str(c.run_dir / auth.SECRETS_DIR / auth.TOKEN_FILE))
        a = np.random.default_rng(3).random(5 * MB // 8)
        with RemoteObjectStoreClient(address) as client:
            got = client.get(client.put(a), timeout=30)
            assert np.array_equal(got, a)
        monkeypatch.delenv("TESSERA_AUTH_TOKEN_FILE")
        monkeypatch.setenv("TESSERA_AUTH_TOKEN", "not-the-token")
        with pytest.raises(grpc.RpcError) as err:
            RemoteObjectStoreClient(address, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
