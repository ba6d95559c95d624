"""The object store on a two-node cluster brought up by `tessera up --nodes 2`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import stacks

import tessera
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.object_store.v1 import object_store_pb2 as pb
from tessera.api.object_store.v1 import object_store_pb2_grpc as pb_grpc
from tessera.exceptions import GetTimeoutError, ObjectStoreFullError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MiB = 2**20
CAPACITY = 48 * MiB


class Cluster(stacks.Cluster):
    def client(self, name: str = "object-store") -> tessera.ObjectStoreClient:
        return tessera.ObjectStoreClient(self.address(name))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with stacks.running(tmp_path_factory, "objects", "--nodes", "2", cls=Cluster,
                        TESSERA_OBJECT_STORE_MEMORY=str(CAPACITY),
                        TESSERA_OBJECT_STORE_SPILL_CAPACITY=str(256 * MiB)) as c:
        yield c


def test_zero_copy_read_only_views(cluster: Cluster) -> None:
    with cluster.client() as c:
        a = np.arange(1_000_000, dtype=np.float64)
        ref = c.put(a)
        v = c.get(ref)
        assert np.array_equal(v, a)
        assert np.shares_memory(v, c._arena), "the value must be a view of the shared arena"
        assert not v.flags.writeable
        with pytest.raises(ValueError):
            v[0] = 1.0
        small = {"k": [1, 2, 3], "s": "text", "b": b"bytes"}
        assert c.get(c.put(small)) == small


def test_pinned_object_is_never_moved_while_viewed(cluster: Cluster) -> None:
    with cluster.client() as c:
        keep = np.full(4 * MiB // 8, 7.0)
        view = c.get(c.put(keep))  # pinned while `view` lives
        refs = [c.put(np.full(4 * MiB // 8, float(i))) for i in range(20)]  # 80 MiB through a 48 MiB store
        assert np.all(view == 7.0), "a pinned object's memory was reused"
        stats = c.stats()
        assert stats.spills > 0 and stats.spilled_bytes > 0
        for i, r in enumerate(refs):  # spilled ones come back from disk, intact
            assert np.all(c.get(r) == float(i))
        assert c.stats().restores > 0


def test_cross_node_pull_is_deduplicated(cluster: Cluster) -> None:
    data = np.random.default_rng(0).random(2 * MiB // 8)
    with cluster.client("object-store") as c0, cluster.client("object-store-1") as c1:
        ref = c0.put(data)
        before = c1.stats().pulls
        out: list[np.ndarray] = []
        threads = [threading.Thread(target=lambda: out.append(np.array(c1.get(ref, timeout=30)))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(out) == 4 and all(np.array_equal(o, data) for o in out)
        assert c1.stats().pulls == before + 1
        with tessera.connect(cluster.info()["control_store_address"]) as cs:
            [info] = cs.stub.GetObjects(cpb.GetObjectsRequest(object_ids=[ref.id]), timeout=5).objects
        assert len(info.locations) == 2  # the new copy is recorded


def test_cross_node_pull_goes_over_the_data_socket(cluster: Cluster) -> None:
    data = np.random.default_rng(1).random(24 * MiB // 8)
    with tessera.connect(cluster.info()["control_store_address"]) as cs:
        nodes = cs.stub.ListNodes(cpb.ListNodesRequest(), timeout=5).nodes
    data_addresses = [n.labels.get("object_store_transfer_address", "") for n in nodes]
    assert all(a.rpartition(":")[2].isdigit() for a in data_addresses), data_addresses  # each store advertises one
    with cluster.client("object-store") as c0, cluster.client("object-store-1") as c1:
        s0, s1 = c0.stats(), c1.stats()
        ref = c0.put(data)
        assert np.array_equal(c1.get(ref, timeout=30), data)
        t0, t1 = c0.stats(), c1.stats()
    assert (t1.pulls - s1.pulls, t1.transfer_pulls - s1.transfer_pulls) == (1, 1)
    assert t1.transfer_fallbacks == s1.transfer_fallbacks
    received = t1.transfer_bytes_received - s1.transfer_bytes_received
    assert received == t0.transfer_bytes_served - s0.transfer_bytes_served
    assert data.nbytes <= received < data.nbytes + 64 * 1024  # the array and its header


def test_bad_input_and_limits(cluster: Cluster) -> None:
    with cluster.client() as c:
        stub = pb_grpc.ObjectStoreServiceStub(grpc.insecure_channel(cluster.address("object-store")))
        with pytest.raises(grpc.RpcError) as e:
            stub.GetObjects(pb.GetObjectsRequest(session_id=c.session_id, object_ids=[b"short"]), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "object_id must be 20 bytes" in e.value.details()
        ref = c.put(np.zeros(1 * MiB // 8))
        with pytest.raises(grpc.RpcError) as e:
            stub.SealObject(pb.SealObjectRequest(session_id=c.session_id, object_id=ref.id), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already sealed" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateObject(pb.CreateObjectRequest(session_id="nope", object_id=os.urandom(20), size=10), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "unknown session" in e.value.details()
        t0 = time.monotonic()
        with pytest.raises(GetTimeoutError):
            c.get(tessera.ObjectRef(os.urandom(20)), timeout=0.3)
        assert time.monotonic() - t0 < 5
        with pytest.raises(ObjectStoreFullError):
            c.put(np.zeros((CAPACITY + MiB) // 8))


def test_copy_events_on_nats(cluster: Cluster) -> None:
    async def scenario() -> set[str]:
        import nats

        nc = await nats.connect(cluster.info()["nats_url"])
        sub = await nc.subscribe("tessera.events.objects.>")
        await nc.flush()
        with cluster.client() as c:
            ref = await asyncio.to_thread(c.put, np.ones(2 * MiB // 8))
        subjects = set()
        deadline = time.monotonic() + 10
        while "tessera.events.objects.sealed" not in subjects and time.monotonic() < deadline:
            msg = await sub.next_msg(timeout=10)
            ev = cpb.ChangeEvent.FromString(msg.data)
            if any(ch.key == ref.id for ch in ev.changes):
                subjects.add(msg.subject)
        await nc.close()
        return subjects

    assert "tessera.events.objects.sealed" in asyncio.run(scenario())


def test_kill9_object_store(cluster: Cluster) -> None:
    with cluster.client() as c:
        refs = [c.put(np.full(4 * MiB // 8, float(i))) for i in range(16)]  # forces spills
        assert c.stats().spilled_objects > 0
        before = cluster.proc("object-store")
        os.kill(before["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        try:
            got = c.get(refs[0], timeout=1)
        except (grpc.RpcError, ConnectionError, GetTimeoutError):
            pass  # reported
        else:  # the store came back within the client's reconnect wait, and this (spilled) object with it
            assert np.all(got == 0.0)
        assert time.monotonic() - t0 < 10, "a dead store must be reported promptly"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = cluster.proc("object-store")
            if p["restarts"] > before["restarts"] and p["health"] == "SERVING":
                break
            time.sleep(0.3)
        else:
            raise AssertionError("the object store was not restarted")
    with cluster.client() as c:  # spilled objects survived the restart; the ones in memory died with it
        assert c.stats().spilled_objects > 0
        stub = pb_grpc.ObjectStoreServiceStub(grpc.insecure_channel(cluster.address("object-store")))
        present = stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[r.id for r in refs]), timeout=5).present
        assert 0 < sum(present) < len(refs)
        for i, (r, here) in enumerate(zip(refs, present, strict=True)):
            if here:
                assert np.all(c.get(r, timeout=10) == float(i))
        gone = next(r for r, here in zip(refs, present, strict=True) if not here)
        with pytest.raises(GetTimeoutError):
            c.get(gone, timeout=0.5)


def test_pulls_from_a_restarted_store_find_its_new_data_socket(cluster: Cluster) -> None:
    """After test_kill9_object_store: node 0's store came back (same node id, a new data port);
    node 1 knew the old port, so its first pull may fall back to gRPC, and the next uses the new port."""
    with cluster.client("object-store") as c0, cluster.client("object-store-1") as c1:
        before = c1.stats()
        for i in range(2):
            data = np.full(3 * MiB // 8, float(i))
            assert np.array_equal(c1.get(c0.put(data), timeout=30), data)
        after = c1.stats()
    assert after.pulls - before.pulls == 2
    assert after.transfer_pulls - before.transfer_pulls >= 1
    assert (after.transfer_pulls - before.transfer_pulls) + (after.transfer_fallbacks - before.transfer_fallbacks) == 2


def test_small_objects_are_read_locally_and_reach_the_store(cluster: Cluster) -> None:
    with cluster.client() as owner, cluster.client() as other, cluster.client("object-store-1") as remote:
        refs = [owner.put({"i": i, "pad": "x" * 500}) for i in range(300)]
        assert [owner.get(r)["i"] for r in refs[:5]] == [0, 1, 2, 3, 4]  # the owner reads its own puts
        # another client of the node, and a client of the other node, wait for the batch to land
        assert other.get(refs[-1], timeout=10)["i"] == 299
        assert [v["i"] for v in remote.get(refs[:50], timeout=30)] == list(range(50))
        owner.flush()
        stub = pb_grpc.ObjectStoreServiceStub(grpc.insecure_channel(cluster.address("object-store")))
        present = stub.ContainsObjects(pb.ContainsObjectsRequest(object_ids=[r.id for r in refs]), timeout=5).present
        assert all(present)
        with pytest.raises(grpc.RpcError) as e:
            stub.PutObjects(pb.PutObjectsRequest(session_id=other.session_id, objects=[
                pb.InlineObject(object_id=os.urandom(20), data=b"ok"), pb.InlineObject(object_id=b"bad", data=b"x")]),
                timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # nothing of a bad batch is stored


def test_views_share_one_pin_and_release_it_when_gone(cluster: Cluster) -> None:
    import gc

    with cluster.client() as c, cluster.client() as reader:
        ref = c.put(np.arange(2 * MiB // 8, dtype=np.float64))
        first = reader.get(ref)
        second = reader.get(ref)  # served from the mapping the reader holds: same memory
        assert np.shares_memory(first, second)
        assert reader.stats().pinned > 0
        del first, second
        gc.collect()
        other = reader.get(c.put(np.ones(MiB // 8)))  # the next call carries the release
        pinned = reader.stats().pinned
        assert MiB <= pinned < 2 * MiB, pinned  # only `other` is still pinned
        del other


def test_status_reports_each_node_store(cluster: Cluster) -> None:
    rows = {p["name"]: p for p in json.loads(cluster.cli("status", "--json").stdout)["processes"]}
    nodes = {rows[n]["node"] for n in ("object-store", "object-store-1")}
    assert len(nodes) == 2  # two nodes, each with its own store
    for name in ("object-store", "object-store-1"):
        row = rows[name]
        assert row["capacity"] == CAPACITY - CAPACITY % 64 and row["used"] <= row["capacity"]
        assert {"spilled", "objects"} <= row.keys()
    table = cluster.cli("status").stdout
    assert "MiB used" in table and "objects" in table


#: A second process: gets the refs given, reports its transport and what it read.
READER = """
import json, sys
import numpy as np
import tessera
c = tessera.ObjectStoreClient(sys.argv[1])
big, small = (tessera.ObjectRef(bytes.fromhex(h)) for h in sys.argv[2:4])
v = c.get(big, timeout=30)
print(json.dumps({"transport": c.transport, "sum": float(v.sum()), "n": int(v.size),
                  "view": bool(np.shares_memory(v, c._arena)), "small": c.get(small, timeout=30)}))
del v
c.close()
"""


def _read_elsewhere(cluster: Cluster, refs: list[tessera.ObjectRef], **env: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", READER, cluster.address("object-store"), *(r.hex() for r in refs)],
                         env={**cluster.env, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("transport", ["socket", "grpc"])
def test_a_put_here_is_read_in_another_process(cluster: Cluster, transport: str) -> None:
    """Same host: a second process reads over the store's Unix socket (zero-copy); forced gRPC still works."""
    x = np.random.default_rng(3).random(3 * MiB // 8)
    with cluster.client() as c:
        assert c.transport == "socket"
        refs = [c.put(x), c.put({"small": [1, 2, 3]})]
        c.flush()
        pinned = c.stats().pinned
        env = {"TESSERA_OBJECT_TRANSPORT": "grpc"} if transport == "grpc" else {}
        got = _read_elsewhere(cluster, refs, **env)
        assert got["transport"] == transport
        assert got["n"] == x.size and got["sum"] == pytest.approx(float(x.sum()))
        assert got["view"], "a same-host get must be a view of the shared arena"
        assert got["small"] == {"small": [1, 2, 3]}
        # the reader's session ended with its process: none of its pins is left
        assert c.stats().pinned == pinned
        c.delete([refs[0]])
