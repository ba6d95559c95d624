"""Serving's memory and cold start on a stack brought up by `tessera up` (two nodes: control store, two object
stores, one serving replica).

- Pipelines that share a featurizer: the second and later registrations upload only their heads, the replica's
  parameter bytes are the unique parameters, and its private (anonymous) memory does not grow by the heads it
  loads: they are views of the node's shared memory.
- A parameter the registry names is readable when a live node holds it (another node's copy is pulled when the
  pipeline loads) and missing, forgotten and uploaded again when no live node does: known from the control
  store's object locations, not by waiting for a copy.
- Parameters that would not fit the node's object store are refused with INVALID_ARGUMENT and change nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import stacks

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.serving.v1 import serving_pb2 as pb
from tessera.client.objects import open_object_client
from tessera.common.registry import control_store_stub
from tessera.serving import Client
from tessera.serving.cluster import PARAMS
from tessera.serving.ir import Field, Graph, Node, Pipeline, encode_terms

pytestmark = [pytest.mark.e2e, pytest.mark.long, pytest.mark.timeout(300)]

STORE_BYTES = 48 * 2**20  # per node: small, so that a pipeline can be too large for it
TERMS = 250_000  # vocabulary of the shared featurizer; each head has a dense weight per term (2 MB)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "serving-memory", "--nodes", "2", "--services",
                        "control-store,object-store,serving", TESSERA_OBJECT_STORE_MEMORY=str(STORE_BYTES),
                        OTEL_TRACES_SAMPLER="always_off") as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: stacks.Cluster) -> Iterator[Client]:
    with Client(cluster_address=cluster.info()["control_store_address"]) as c:
        yield c


@pytest.fixture(scope="module")
def vocabulary() -> tuple[np.ndarray, np.ndarray]:
    return encode_terms([f"w{i}" for i in range(TERMS)])


def pipeline(vocab: tuple[np.ndarray, np.ndarray], seed: int, *, coef: np.ndarray | None = None) -> Pipeline:
    """A word-count featurizer over ``vocab`` and a logistic head with a dense weight for every term."""
    p = Pipeline(Graph([Field("text", "text")], [], "head", "test"), {})
    terms, offsets = vocab
    feat = Node("words", "text_ngrams", [], {"field": "text", "analyzer": "word", "ngram_range": [1, 1]},
                {"terms": p.add(terms), "offsets": p.add(offsets)})
    w = coef if coef is not None else np.random.default_rng(seed).normal(size=(1, TERMS)) + 3.0  # no zero weight
    head = Node("head", "linear", ["words"], {"proba": "logistic", "classes": ["neg", "pos"]},
                {"coef": p.add(w), "intercept": p.add(np.array([0.1 * seed]))})
    p.graph.nodes.extend([feat, head])
    return p


def anonymous_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous line")


def settled_anonymous(pid: int) -> int:
    """The replica's anonymous memory once it stopped changing (it gives freed pages back in a thread after
    answering a registration)."""
    last = [anonymous_bytes(pid)]

    def steady() -> int | None:
        now = anonymous_bytes(pid)
        same = abs(now - last[0]) < 256 * 1024
        last[0] = now
        return now if same else None

    return int(stacks.poll_until(steady, timeout=30, interval=0.5, what="the replica's memory to settle"))


def test_shared_featurizer_is_stored_once_and_heads_are_views(cluster: stacks.Cluster, client: Client,
                                                              vocabulary: tuple[np.ndarray, np.ndarray]) -> None:
    pid = cluster.pid("serving")
    pipes = [pipeline(vocabulary, s) for s in range(1, 8)]
    featurizer = {h for n in pipes[0].graph.nodes if n.op == "text_ngrams" for h in n.params.values()}
    client.register("m0", pipes[0])
    assert client.predict("m0", ["w1 w2 w3"])[0].label in ("neg", "pos")
    before = settled_anonymous(pid)
    heads = 0
    for i, p in enumerate(pipes[1:], start=1):
        missing = set(client._call("FindMissingParameters", pb.FindMissingParametersRequest(hashes=list(p.params)))
                      .missing)
        assert missing == set(p.params) - featurizer  # the featurizer is not sent again: only the head
        heads += sum(p.params[h].nbytes for h in missing)
        client.register(f"m{i}", p)
        pred = client.predict(f"m{i}", ["w5 w6 w7 w5"])[0]
        assert pred.label in ("neg", "pos") and len(pred.scores) == 2
    grown = settled_anonymous(pid) - before
    # the heads (12 MB) live in the node's shared memory: the replica's own memory grows by a small part of them
    assert grown < heads // 4, f"the replica's anonymous memory grew {grown:,} bytes for {heads:,} of heads"
    unique = {h: a.nbytes for p in pipes for h, a in p.params.items()}
    stats = client.stats()
    assert stats.param_bytes == sum(unique.values())
    assert stats.param_arrays == len(unique)
    infos = {i.name: i for i in client.list()}
    assert all(infos[f"m{i}"].param_bytes == pipes[i].nbytes for i in range(len(pipes)))


def test_parameters_held_by_a_live_node_are_readable_and_lost_ones_uploaded_again(
        cluster: stacks.Cluster, client: Client, vocabulary: tuple[np.ndarray, np.ndarray]) -> None:
    info = cluster.info()
    other = next(p for p in info["procs"] if p["name"] == "object-store-1")["address"]
    w = np.random.default_rng(99).normal(size=(1, TERMS)) + 3.0
    p = pipeline(vocabulary, 9, coef=w)
    head = p.graph.node("head")
    ch, cs = control_store_stub(info["control_store_address"])
    with ch, open_object_client(other, name="test-other-node", durable=True) as objects:
        # the head's weights exist only in the second node's store, named in the registry as a replica names them
        ref = objects.put(p.params[head.params["coef"]])
        cs.KvPut(cpb.KvPutRequest(namespace=PARAMS, key=head.params["coef"].encode(), value=ref.id))
        # and a parameter whose only copy went with a node: an object id no store holds
        gone = pipeline(vocabulary, 10)
        lost = gone.graph.node("head").params["coef"]
        cs.KvPut(cpb.KvPutRequest(namespace=PARAMS, key=lost.encode(), value=os.urandom(len(ref.id))))

        missing = client._call("FindMissingParameters", pb.FindMissingParametersRequest(
            hashes=[head.params["coef"], lost])).missing
        assert list(missing) == [lost]  # held by a live node: readable; held by none: missing
        with pytest.raises(grpc.RpcError) as e:  # (forgotten: the registry no longer names it)
            cs.KvGet(cpb.KvGetRequest(namespace=PARAMS, key=lost.encode()))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

        client.register("held-elsewhere", p)  # nothing of the head is uploaded: the replica's node pulls it
        assert client.predict("held-elsewhere", ["w1 w2"])[0].label in ("neg", "pos")
        client.register("uploaded-again", gone)  # the lost parameter is uploaded again
        assert client.predict("uploaded-again", ["w1 w2"])[0].label in ("neg", "pos")


def test_parameters_that_cannot_fit_are_refused_and_change_nothing(
        client: Client, vocabulary: tuple[np.ndarray, np.ndarray]) -> None:
    names = {i.name for i in client.list()}
    stats = client.stats()
    big = pipeline(vocabulary, 11, coef=np.ones((26, TERMS)))  # 52 MB of weights: more than the store holds
    with pytest.raises(grpc.RpcError) as e:
        client.register("too-big", big)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not fit in the node's object store" in (e.value.details() or "")
    coef = big.graph.node("head").params["coef"]
    assert list(client._call("FindMissingParameters", pb.FindMissingParametersRequest(hashes=[coef])).missing) \
        == [coef]

    # arrays that fit one by one but not together: each is stored, the registration is refused
    parts = pipeline(vocabulary, 12, coef=np.full((1, TERMS), 0.5))
    for k in range(6):  # 6 x 7 MB and the featurizer pass the store's capacity
        parts.graph.nodes[-1].params[f"extra{k}"] = parts.add(np.full(7 * 2**20 // 8, float(k)))
    for h in parts.params:
        arr = parts.params[h]
        client._call("UploadParameters", pb.UploadParametersRequest(tensors=[pb.Tensor(
            hash=h, dtype=arr.dtype.str, shape=list(arr.shape), data=arr.tobytes())]))
    spec = pb.PipelineSpec(name="too-big-together", graph_json=parts.graph.to_json())
    with pytest.raises(grpc.RpcError) as e:
        client._call("Register", pb.RegisterRequest(pipeline=spec), failover=False)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pipeline 'too-big-together'" in (e.value.details() or "")
    assert {i.name for i in client.list()} == names
    after = client.stats()
    assert (after.pipelines, after.param_bytes) == (stats.pipelines, stats.param_bytes)
