"""Serving on a stack brought up by `tessera up`, plus two more serving replicas.

Real processes throughout: NATS, Redis, control store, object store and the serving
replicas; scikit-learn pipelines registered through the SDK, predictions over gRPC,
HTTP/JSON and the NATS queue group, a replica killed under load.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import stacks
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tessera.api.serving.v1 import serving_pb2 as pb
from tessera.api.serving.v1 import serving_pb2_grpc as pb_grpc
from tessera.common import procs
from tessera.common.rpc import health_status
from tessera.serving import Client
from tessera.serving.sklearn_import import UnsupportedEstimatorError, import_sklearn
from tessera.testing import track

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WORDS = "good great awful bad food slow quick friendly rude cheap tasty bland staff room view noisy quiet".split()


class Cluster(stacks.Cluster):
    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        super().__init__(run_dir, env)
        self.extra: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start_replica(self, name: str) -> str:
        """One more serving replica (a process of its own) against the same NATS and control store."""
        info = self.info()
        port = procs.free_port()
        env = dict(self.env, TESSERA_NATS_URL=info["nats_url"], TESSERA_CONTROL_STORE_ADDRESS=info["control_store_address"],
                   TESSERA_GRPC_PORT=str(port), TESSERA_INSTANCE_ID=name, OTEL_TRACES_SAMPLER="always_off",
                   TESSERA_SERVING_HTTP_PORT="0")
        proc = procs.start([sys.executable, "-m", "tessera.serving"], log_path=self.run_dir / f"{name}.log", env=env)
        track(proc)
        address = f"127.0.0.1:{port}"
        self.extra.append((address, proc))
        deadline = time.monotonic() + 60
        while health_status(address) != "SERVING":
            assert proc.poll() is None, (self.run_dir / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "replica did not become SERVING"
            time.sleep(0.2)
        return address

    def stop_replicas(self) -> None:
        for _, p in self.extra:
            if p.poll() is None:
                p.terminate()
        for _, p in self.extra:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with stacks.running(tmp_path_factory, "serving", cls=Cluster, TESSERA_OBJECT_STORE_MEMORY=str(256 * 2**20),
                        OTEL_TRACES_SAMPLER="always_off") as c:
        try:
            yield c
        finally:
            c.stop_replicas()


@pytest.fixture(scope="module")
def data() -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) for _ in range(300)]
    y = np.array(["pos" if sum(w in ("good", "great", "tasty", "friendly") for w in d.split()) >
                  sum(w in ("awful", "bad", "rude", "bland") for w in d.split()) else "neg" for d in docs])
    return docs, y


@pytest.fixture(scope="module")
def fitted(data: tuple[list[str], np.ndarray]) -> list[Pipeline]:
    """Two sentiment pipelines sharing one fitted featurizer, different heads."""
    docs, y = data
    feat = FeatureUnion([("c", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                         ("w", TfidfVectorizer(ngram_range=(1, 2)))]).fit(docs)
    X = feat.transform(docs)
    return [Pipeline([("f", feat), ("m", LogisticRegression(C=c).fit(X, y))]) for c in (0.5, 5.0)]


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster_address=cluster.info()["control_store_address"]) as c:
        yield c


def test_register_predict_and_share(client: Client, fitted: list[Pipeline], data: tuple[list[str], np.ndarray]) -> None:
    docs, _ = data
    info = client.register("sentiment-a", fitted[0])
    assert info.inputs == [("text", "text")] and info.classes == ["neg", "pos"]
    assert info.rules == ["fuse_featurizers", "sparse_dot"] and info.stages == ["featurize", "head"]
    preds = client.predict("sentiment-a", docs[:40])
    assert [p.label for p in preds] == fitted[0].predict(docs[:40]).tolist()
    np.testing.assert_allclose([p.scores for p in preds], fitted[0].predict_proba(docs[:40]), atol=1e-6)
    # the same inputs again: their featurizer rows are kept, the answers identical
    kept = client.stats()
    again = client.predict("sentiment-a", docs[:40])
    assert [p.scores for p in again] == [p.scores for p in preds]
    st = client.stats()
    assert st.cache_hits - kept.cache_hits == len(set(docs[:40])) and st.cache_misses == kept.cache_misses
    assert 0 < st.cache_hit_rate < 1 and 0 < st.cache_bytes <= st.cache_capacity_bytes and st.cache_entries > 0
    assert st.executors >= 1 and st.reserved_executors >= 1 and st.stage_queues >= 1
    # the second pipeline's vocabularies and idf are in the cluster already: only its head is new
    ir = import_sklearn(fitted[1])
    stub = client._stubs[0]
    missing = stub.FindMissingParameters(pb.FindMissingParametersRequest(hashes=list(ir.params)), timeout=10).missing
    heads = {h for n in ir.graph.nodes if n.op == "linear" for h in n.params.values()}
    assert set(missing) == heads
    before = client.stats()
    info_b = client.register("sentiment-b", fitted[1], latency_critical=True)
    assert info_b.latency_critical and not info.latency_critical
    after = client.stats()
    assert after.param_bytes - before.param_bytes == sum(ir.params[h].nbytes for h in heads)
    assert after.table_bytes == before.table_bytes
    # both together: one featurization per input
    out = client.predict_batch([("sentiment-a", docs[:5]), ("sentiment-b", docs[:5])])
    np.testing.assert_allclose([p.scores for p in out[1]], fitted[1].predict_proba(docs[:5]), atol=1e-6)
    st = client.stats()
    computed, reused = st.rows_computed - after.rows_computed, st.rows_reused - after.rows_reused
    hits = st.cache_hits - after.cache_hits
    # (these inputs were featurized above: their rows come from the cache, or from the other pipeline's share)
    assert computed == 0 and reused + hits == 10, (computed, reused, hits)
    listed = {i.name: i for i in client.list()}
    assert listed["sentiment-b"].latency_critical and not listed["sentiment-a"].latency_critical


def test_tabular_and_http(client: Client) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 3))
    y = X @ [1.0, -2.0, 0.5] + 3.0
    sk = make_pipeline(StandardScaler(), Ridge(alpha=0.1)).fit(X, y)
    client.register("house", sk)
    got = client.predict("house", X[:10].tolist())
    np.testing.assert_allclose([p.value for p in got], sk.predict(X[:10]), atol=1e-6)
    http = client.stats().http_address
    body = json.dumps({"records": [{"x0": 0.1, "x1": 0.2, "x2": 0.3}]}).encode()
    req = urllib.request.Request(f"http://{http}/v1/pipelines/house:predict", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        value = json.loads(r.read())["predictions"][0]["value"]
    assert value == pytest.approx(sk.predict([[0.1, 0.2, 0.3]])[0], abs=1e-6)
    for path, payload, status in (("nope:predict", {"records": [[1, 2, 3]]}, 404),
                                  ("house:predict", {"records": [{"x0": "a", "x1": 1, "x2": 1}]}, 400),
                                  ("house:predict", {"rows": []}, 400)):
        req = urllib.request.Request(f"http://{http}/v1/pipelines/{path}", data=json.dumps(payload).encode(),
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code == status
        assert json.loads(ei.value.read())["error"]["message"]


def _post(url: str, payload: object) -> tuple[int, object]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_kserve_v2_over_the_stack(client: Client, fitted: list[Pipeline], data: tuple[list[str], np.ndarray]) -> None:
    """The KServe v2 protocol on the replica's HTTP port: metadata, inference equal to scikit-learn, bad input."""
    docs, _ = data
    client.register("kserve-a", fitted[0], replace=True)
    http = client.stats().http_address
    with urllib.request.urlopen(f"http://{http}/v2/models/kserve-a", timeout=10) as r:
        meta = json.loads(r.read())
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "scores"]
    status, out = _post(f"http://{http}/v2/models/kserve-a/infer",
                        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [5], "data": docs[:5]}]})
    assert status == 200, out
    assert isinstance(out, dict) and out["model_version"] == meta["versions"][0]
    label, scores = out["outputs"]
    assert label["data"] == fitted[0].predict(docs[:5]).tolist()
    np.testing.assert_allclose(np.reshape(scores["data"], scores["shape"]), fitted[0].predict_proba(docs[:5]), atol=1e-6)
    before = client.stats()
    for payload, text in (({"inputs": [{"name": "body", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
                           "no such input"),
                          ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
                           "does not fit a text field"),
                          ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 2], "data": ["a"] * 4}]},
                           "shape [2, 2]")):
        status, out = _post(f"http://{http}/v2/models/kserve-a/infer", payload)
        assert status == 400 and isinstance(out, dict) and text in out["error"], out
    after = client.stats()
    assert (after.rows_computed, after.batches) == (before.rows_computed, before.batches)
    with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=10) as r:
        assert json.loads(r.read()) == {"ready": True}


def test_bad_input_gets_precise_status_and_changes_nothing(client: Client, fitted: list[Pipeline],
                                                           data: tuple[list[str], np.ndarray]) -> None:
    docs, y = data
    names = sorted(i.name for i in client.list())
    cases = [
        (lambda: client.predict("no-such-pipeline", ["hi"]), grpc.StatusCode.NOT_FOUND, "no pipeline named"),
        (lambda: client.predict("sentiment-a", [{"text": 3.0}]), grpc.StatusCode.INVALID_ARGUMENT, "must be text"),
        (lambda: client.predict("sentiment-a", [{"body": "x"}]), grpc.StatusCode.INVALID_ARGUMENT, "missing field"),
        (lambda: client.predict("sentiment-a", ["x"] * 5000), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most"),
        (lambda: client.predict("sentiment-a", ["x" * 200_000]), grpc.StatusCode.RESOURCE_EXHAUSTED, "characters"),
        (lambda: client.unregister("no-such-pipeline"), grpc.StatusCode.NOT_FOUND, "no pipeline named"),
        (lambda: client.register("bad name!", fitted[0]), grpc.StatusCode.INVALID_ARGUMENT, "bad pipeline name"),
        (lambda: client.register("sentiment-a", fitted[0], replace=False), grpc.StatusCode.ALREADY_EXISTS, "already"),
    ]
    for call, code, text in cases:
        with pytest.raises(grpc.RpcError) as ei:
            call()
        assert ei.value.code() == code, ei.value.details()
        assert text in ei.value.details()
    stub: pb_grpc.ServingServiceStub = client._stubs[0]
    bad_graphs = [
        ('{"inputs":[["t","text"]],"nodes":[{"id":"a","op":"exec","params":{}}],"output":"a"}', "unknown operator"),
        ("not json", "malformed"),
        ('{"inputs":[["t","text"]],"nodes":[{"id":"m","op":"linear","inputs":["t"],"params":{"coef":"00","intercept":"11"}}],'
         '"output":"m"}', "not an earlier node"),
    ]
    for graph, text in bad_graphs:
        with pytest.raises(grpc.RpcError) as ei:
            stub.Register(pb.RegisterRequest(pipeline=pb.PipelineSpec(name="evil", graph_json=graph)), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:  # a tensor whose bytes do not match its hash
        stub.UploadParameters(pb.UploadParametersRequest(tensors=[pb.Tensor(hash="ab", dtype="<f8", shape=[1],
                                                                             data=b"\0" * 8)]), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hash" in ei.value.details()
    with pytest.raises(UnsupportedEstimatorError, match="MultinomialNB"):  # strict: refused on the client, nothing sent
        client.register("nb", make_pipeline(CountVectorizer(), MultinomialNB()).fit(docs, y), strict=True)
    assert sorted(i.name for i in client.list()) == names


def test_replicas_serve_every_pipeline_and_survive_a_kill(cluster: Cluster, client: Client,
                                                          data: tuple[list[str], np.ndarray],
                                                          fitted: list[Pipeline]) -> None:
    docs, _ = data
    extra = [cluster.start_replica("serving-x1"), cluster.start_replica("serving-x2")]
    client.register("sentiment-c", fitted[1])  # registered once, through the first replica
    want = fitted[1].predict_proba(docs[:8])
    for addr in extra:  # ... served by the others, which load it from the registry
        with Client(addr) as one:
            np.testing.assert_allclose([p.scores for p in one.predict("sentiment-c", docs[:8])], want, atol=1e-6)
    # unregistering on one replica removes it everywhere
    client.register("short-lived", fitted[0])
    with Client(extra[0]) as one:
        one.predict("short-lived", ["good"])
        client.unregister("short-lived")
        deadline = time.monotonic() + 10
        while True:  # the replica drops it when the registry's change event arrives
            try:
                one.predict("short-lived", ["good"])
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
                break
            assert time.monotonic() < deadline, "the other replica still serves an unregistered pipeline"
            time.sleep(0.05)
    # load through every replica; one is killed halfway; requests go on through the others
    addrs = [*client.addresses, *extra]
    errors: list[BaseException] = []
    done = [0]
    stop = threading.Event()

    def load() -> None:
        with Client(addrs, timeout=10) as c:
            while not stop.is_set():
                try:
                    p = c.predict("sentiment-c", docs[:2])
                    assert len(p) == 2
                    done[0] += 1
                except BaseException as e:  # noqa: BLE001 - collected and reported below
                    errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()

    def served_more_than(n: int, within_s: float) -> bool:  # progress, not a rate: the box may be loaded
        deadline = time.monotonic() + within_s
        while done[0] <= n and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        return done[0] > n

    try:
        assert served_more_than(0, 30), f"no prediction went through before the kill: {errors[:3]}"
        before_kill = done[0]
        victim = cluster.extra[0][1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        assert served_more_than(before_kill + 10, 30), f"predictions stopped after the kill: {errors[:3]}"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]


def test_nats_queue_group(cluster: Cluster, data: tuple[list[str], np.ndarray], fitted: list[Pipeline]) -> None:
    import nats

    docs, _ = data

    async def go() -> list[dict]:
        nc = await nats.connect(cluster.info()["nats_url"])
        try:
            out = []
            for d in docs[:6]:
                msg = await nc.request("tessera.serving.predict",
                                       json.dumps({"pipeline": "sentiment-c", "records": [d]}).encode(), timeout=10)
                out.append(json.loads(msg.data))
            bad = await nc.request("tessera.serving.predict", b'{"pipeline": "nope", "records": ["x"]}', timeout=10)
            out.append(json.loads(bad.data))
            return out
        finally:
            await nc.close()

    res = asyncio.run(go())
    got = [r["predictions"][0]["scores"] for r in res[:6]]
    np.testing.assert_allclose(got, fitted[1].predict_proba(docs[:6]), atol=1e-6)
    assert res[6]["error"]["code"] == "NOT_FOUND"
