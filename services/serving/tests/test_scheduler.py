"""The stage scheduler: one queue per physical stage, batching across pipelines at a shared stage, the order
in which queues are served, executors reserved for latency-critical pipelines, and the cache of featurizer rows
kept across requests.

An executor is held inside a stage by a gate (a threading.Event the stage waits on) so that what queues up
behind it is known exactly; nothing here depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import sys
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tessera.common.errors import InvalidArgumentError, ResourceExhaustedError
from tessera.serving.cache import ENTRY_OVERHEAD, OutputCache
from tessera.serving.engine import Engine
from tessera.serving.ir import Pipeline as IrPipeline
from tessera.serving.scheduler import Scheduler
from tessera.serving.sklearn_import import import_sklearn

from .conftest import serve

WAIT_S = 60.0  # the longest any step may take before the test fails (a deadline, not a measurement)


@pytest.fixture(scope="module")
def heads(texts: tuple[list[str], np.ndarray]) -> list[IrPipeline]:
    """Three pipelines over one fitted featurizer (char + word TF-IDF), each with its own head."""
    docs, y = texts
    feat = FeatureUnion([("c", TfidfVectorizer(analyzer="char", ngram_range=(1, 3))),
                         ("w", TfidfVectorizer(ngram_range=(1, 2)))]).fit(docs)
    X = feat.transform(docs)
    return [import_sklearn(Pipeline([("f", feat), ("m", LogisticRegression(C=c, max_iter=300).fit(X, y))]))
            for c in (0.3, 1.0, 3.0)]


@pytest.fixture(scope="module")
def other(texts: tuple[list[str], np.ndarray]) -> IrPipeline:
    """A text pipeline with a featurizer of its own (word counts)."""
    docs, y = texts
    return import_sklearn(make_pipeline(CountVectorizer(), LogisticRegression(max_iter=300)).fit(docs, y))


@pytest.fixture(scope="module")
def gate_pipe(tabular: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[IrPipeline, list[list[float]]]:
    """A numeric pipeline (columns -> scale -> ridge) whose source stage the tests hold shut."""
    X, y, _ = tabular
    num = X[:, :4].astype(float)
    return import_sklearn(make_pipeline(StandardScaler(), Ridge()).fit(num, y)), num[:3].tolist()


class Spy:
    """Records the calls of chosen stages, in order, across every pipeline that runs them; a stage may be
    made to wait at a gate."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []  # (label, rows given)
        self.gates: dict[str, threading.Event] = {}
        self.inside: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def watch(self, engine: Engine, pipeline: str, stage: int, label: str, *, gate: bool = False) -> str:
        key = engine.get(pipeline).plan.stages[stage].key
        if gate:
            self.gates[label] = threading.Event()
            self.inside[label] = threading.Event()
        for reg in engine.pipelines.values():
            for st in reg.plan.stages:
                if st.key == key:
                    st.fn = self._wrap(st.fn, label, source=not st.inputs)
        return key

    def _wrap(self, fn: Callable[..., Any], label: str, *, source: bool) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            with self._lock:
                self.calls.append((label, args[1] if source else args[0].shape[0]))
            if label in self.gates:
                self.inside[label].set()
                assert self.gates[label].wait(WAIT_S), "the gate was never opened"
            return fn(*args)

        return run

    def labels(self) -> list[str]:
        with self._lock:
            return [c[0] for c in self.calls]


async def _until(cond: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def _engine(heads: list[IrPipeline], other: IrPipeline, gate_pipe: tuple[IrPipeline, Any], *,
            budget_ms: float = 0.0, critical: tuple[str, ...] = ()) -> Engine:
    e = Engine()
    for i, h in enumerate(heads):
        serve(h, f"p{i}", engine=e, budget_ms=budget_ms, critical=f"p{i}" in critical)
    serve(other, "words", engine=e, budget_ms=budget_ms, critical="words" in critical)
    serve(gate_pipe[0], "gate", engine=e, budget_ms=0.0, critical="gate" in critical)
    return e


async def _hold_executor(s: Scheduler, spy: Spy, rows: list[list[float]]) -> asyncio.Task[Any]:
    """A request of the gate pipeline, its executor held inside the gated stage."""
    task = asyncio.ensure_future(s.submit("gate", rows))
    assert await asyncio.to_thread(spy.inside["gate"].wait, WAIT_S)
    return task


async def test_one_queue_per_stage_batches_across_pipelines_in_order(heads: list[IrPipeline], other: IrPipeline,
                                                                     gate_pipe: tuple[IrPipeline, Any]) -> None:
    e = _engine(heads, other, gate_pipe)
    ref = Engine(cache_bytes=0)
    for i, h in enumerate(heads):
        serve(h, f"p{i}", engine=ref)
    spy = Spy()
    spy.watch(e, "gate", 0, "gate", gate=True)
    spy.watch(e, "gate", len(e.get("gate").plan.stages) - 1, "gate.head")
    shared = spy.watch(e, "p0", 0, "featurize")
    for i in range(3):
        spy.watch(e, f"p{i}", 1, f"p{i}.head")
    s = Scheduler(e, workers=1, reserved=0)
    s.start()
    try:
        gate = await _hold_executor(s, spy, gate_pipe[1])
        texts = ["the soup was cold", "friendly staff and a view", "the soup was cold"]
        asks = [s.submit("p0", [texts[0]]), s.submit("p1", [texts[1], texts[0]]), s.submit("p2", [texts[2]])]
        pending = [asyncio.ensure_future(a) for a in asks]
        await _until(lambda: s.queued == 4)
        assert s.stats()["stage_queues"] >= 2  # the gate's source, the shared featurizer
        spy.gates["gate"].set()
        got = await asyncio.wait_for(asyncio.gather(*pending), WAIT_S)
        await asyncio.wait_for(gate, WAIT_S)
        # the in-flight request's next stage first (its deadline is the earliest), then the shared featurizer once
        # for the three pipelines' four records (two distinct texts), then each pipeline's head
        assert spy.calls == [("gate", 3), ("gate.head", 3), ("featurize", 2), ("p0.head", 1), ("p1.head", 2),
                             ("p2.head", 1)]
        assert e.stage_runs[shared] == 1 and e.rows_computed == 2 + 3 and e.rows_reused == 2
        for i, (name, recs) in enumerate((("p0", texts[:1]), ("p1", [texts[1], texts[0]]), ("p2", texts[2:]))):
            want = ref.predict(name, recs)
            assert [p.label for p in got[i]] == [p.label for p in want]
            assert [p.scores for p in got[i]] == [p.scores for p in want]  # identical, not merely close
    finally:
        await s.stop()


async def test_latency_critical_events_go_first(heads: list[IrPipeline], other: IrPipeline,
                                                gate_pipe: tuple[IrPipeline, Any]) -> None:
    e = _engine(heads, other, gate_pipe, critical=("words",))
    spy = Spy()
    spy.watch(e, "gate", 0, "gate", gate=True)
    spy.watch(e, "gate", len(e.get("gate").plan.stages) - 1, "gate.head")
    spy.watch(e, "p0", 0, "featurize")
    spy.watch(e, "words", 0, "words")
    s = Scheduler(e, workers=1, reserved=0)  # one executor for everything: the order is the scheduler's
    s.start()
    try:
        gate = await _hold_executor(s, spy, gate_pipe[1])
        bulk = [asyncio.ensure_future(s.submit("p0", [f"bulk request {i}"])) for i in range(5)]
        crit = asyncio.ensure_future(s.submit("words", ["good food"]))
        await _until(lambda: s.queued == 6)
        spy.gates["gate"].set()
        await asyncio.wait_for(asyncio.gather(crit, gate, *bulk), WAIT_S)
        # the latency-critical request, queued last, runs before the older stage of the gate's request and the bulk
        assert spy.labels() == ["gate", "words", "gate.head", "featurize"]
    finally:
        await s.stop()


async def test_reserved_executors_serve_latency_critical_pipelines_during_a_flood(
        heads: list[IrPipeline], other: IrPipeline, gate_pipe: tuple[IrPipeline, Any]) -> None:
    e = _engine(heads, other, gate_pipe, critical=("words",))
    spy = Spy()
    spy.watch(e, "gate", 0, "gate", gate=True)
    s = Scheduler(e, workers=1, reserved=1)
    s.start()
    try:
        gate = await _hold_executor(s, spy, gate_pipe[1])  # the only shared executor is busy ...
        flood = [asyncio.ensure_future(s.submit(f"p{i % 3}", [f"flood {i}"] * 2)) for i in range(300)]
        await _until(lambda: s.queued == 600)  # ... and 300 requests of other pipelines wait behind it
        want = Engine(cache_bytes=0)
        serve(other, "words", engine=want)
        for text in ("good food", "awful view", "rude staff"):
            got = await asyncio.wait_for(s.submit("words", [text]), WAIT_S)
            assert [p.scores for p in got] == [p.scores for p in want.predict("words", [text])]
        # answered by the reserved executor, which took nothing else: the flood still waits, untouched
        assert s.reserved_runs >= 3
        assert s.queued == 600 and not any(f.done() for f in flood) and not gate.done()
        spy.gates["gate"].set()
        done = await asyncio.wait_for(asyncio.gather(*flood), WAIT_S)
        assert all(len(d) == 2 for d in done) and s.queued == 0
        await asyncio.wait_for(gate, WAIT_S)
    finally:
        spy.gates["gate"].set()
        await s.stop()


async def test_predict_batch_runs_together_past_max_batch(heads: list[IrPipeline], other: IrPipeline,
                                                          gate_pipe: tuple[IrPipeline, Any]) -> None:
    e = _engine(heads, other, gate_pipe)
    spy = Spy()
    key = spy.watch(e, "p0", 0, "featurize")
    s = Scheduler(e, workers=1, reserved=0, max_batch=2)
    s.start()
    try:
        items = [(e.get(f"p{i}"), e.columns(e.get(f"p{i}"), ["one text", f"text {i}"]), 2) for i in range(3)]
        out = await asyncio.wait_for(s.submit_many(items), WAIT_S)
        assert [len(o) for o in out] == [2, 2, 2]
        assert spy.calls == [("featurize", 4)] and e.stage_runs[key] == 1  # 6 records, 4 distinct, one run
        assert e.rows_reused == 2
    finally:
        await s.stop()


async def test_a_full_queue_refuses_and_changes_nothing(heads: list[IrPipeline], other: IrPipeline,
                                                         gate_pipe: tuple[IrPipeline, Any]) -> None:
    e = _engine(heads, other, gate_pipe)
    spy = Spy()
    spy.watch(e, "gate", 0, "gate", gate=True)
    s = Scheduler(e, workers=1, reserved=0, max_queued=10)
    s.start()
    try:
        gate = await _hold_executor(s, spy, gate_pipe[1])
        first = asyncio.ensure_future(s.submit("p0", ["a"] * 8))
        await _until(lambda: s.queued == 8)
        with pytest.raises(ResourceExhaustedError, match="queue is full"):
            await s.submit("p1", ["b"] * 3)
        with pytest.raises(InvalidArgumentError, match="must be text"):
            await s.submit("p1", [{"text": 1.0}])
        assert s.queued == 8 and s.stats()["stage_queues"] == 2
        spy.gates["gate"].set()
        assert len(await asyncio.wait_for(first, WAIT_S)) == 8
        await asyncio.wait_for(gate, WAIT_S)
    finally:
        spy.gates["gate"].set()
        await s.stop()


async def test_stop_cancels_what_waits(heads: list[IrPipeline], other: IrPipeline,
                                       gate_pipe: tuple[IrPipeline, Any]) -> None:
    e = _engine(heads, other, gate_pipe)
    spy = Spy()
    spy.watch(e, "gate", 0, "gate", gate=True)
    s = Scheduler(e, workers=1, reserved=0)
    s.start()
    gate = await _hold_executor(s, spy, gate_pipe[1])
    waiting = asyncio.ensure_future(s.submit("p0", ["never run"]))
    await _until(lambda: s.queued == 1)
    stopping = asyncio.ensure_future(s.stop())
    await _until(lambda: waiting.done())
    assert waiting.cancelled()
    spy.gates["gate"].set()
    await asyncio.wait_for(stopping, WAIT_S)
    gate.cancel()


# ------------------------------------------------------------------ the cache of featurizer rows


def _row(nnz: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(nnz), np.sort(rng.choice(100_000, size=nnz, replace=False)).astype(np.int32)


def test_cache_is_an_lru_within_its_bound() -> None:
    c = OutputCache(20_000)
    key = ("x" * 50,)
    entry = 12 * 8 + 12 * 4 + sys.getsizeof(key) + sys.getsizeof(key[0]) + ENTRY_OVERHEAD  # 12 values, 12 columns
    per = 20_000 // entry
    c.put_many("s", [((f"{i:050d}",), _row(12, i)) for i in range(per)])
    assert len(c) == per and c.bytes <= c.capacity and c.evictions == 0
    assert c.get_many("s", [(f"{0:050d}",)])[0] is not None  # the oldest, now the most recently used
    c.put_many("s", [((f"{i:050d}",), _row(12, i)) for i in range(per, per + 3)])
    assert c.bytes <= c.capacity and len(c) == per and c.evictions == 3
    found = c.get_many("s", [(f"{i:050d}",) for i in range(4)])
    assert found[0] is not None and found[1] is None and found[2] is None and found[3] is None
    assert np.array_equal(found[0][0], _row(12, 0)[0]) and np.array_equal(found[0][1], _row(12, 0)[1])
    assert c.get_many("other-stage", [(f"{0:050d}",)]) == [None]  # keyed by stage too
    assert c.hits == 2 and c.misses == 4 and c.hit_rate == pytest.approx(2 / 6)
    # an entry past an eighth of the bound is not kept; a disabled cache keeps nothing
    c.put_many("s", [(("big",), _row(1000, 1))])
    assert c.get_many("s", [("big",)]) == [None]
    off = OutputCache(0)
    off.put_many("s", [(("a",), _row(3, 0))])
    assert len(off) == 0 and off.bytes == 0
    assert c.drop_stage("s") == per and c.bytes == 0
    with pytest.raises(ValueError):
        OutputCache(-1)


def test_cache_accounting_covers_its_real_memory() -> None:
    """The bound is on what the process holds: tracemalloc sees no more than the cache counts."""
    c = OutputCache(2 * 2**20)
    rows = [_row(60 + i % 80, i) for i in range(12_000)]
    keys = [(f"review number {i}: the food was fine and the staff friendly",) for i in range(12_000)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(0, 12_000, 100):
            c.put_many("stage", [(keys[j], (rows[j][0].copy(), rows[j][1].copy())) for j in range(i, i + 100)])
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert c.evictions > 0 and c.bytes <= c.capacity
    # the keys' strings were allocated before tracing: what is traced is the arrays and the map
    key_bytes = sum(sys.getsizeof(k[1]) + sys.getsizeof(k[1][0]) for k in list(c._entries))
    assert held <= c.bytes - key_bytes + 64 * 1024, (held, c.bytes)


def test_engine_keeps_rows_across_requests_and_predictions_stay_identical(
        heads: list[IrPipeline], texts: tuple[list[str], np.ndarray]) -> None:
    docs, _ = texts
    e = Engine(cache_bytes=8 * 2**20)
    off = Engine(cache_bytes=0)
    for i, h in enumerate(heads):
        serve(h, f"p{i}", engine=e)
        serve(h, f"p{i}", engine=off)
    spy = Spy()
    key = spy.watch(e, "p0", 0, "featurize")
    first = e.predict("p0", docs[:20])
    assert spy.calls == [("featurize", 20)] and e.cache.misses == 20
    # the same inputs through the other pipelines: kept rows, no featurization
    for name in ("p1", "p2"):
        got = e.predict(name, docs[:20])
        want = off.predict(name, docs[:20])
        assert [p.scores for p in got] == [p.scores for p in want]
    assert len(spy.calls) == 1 and e.cache.hits == 40
    # part kept, part new: only the new ones are featurized, in one call
    mixed = docs[10:30]
    got = e.predict("p0", mixed)
    assert spy.calls[-1] == ("featurize", 10)
    assert [p.scores for p in got] == [p.scores for p in off.predict("p0", mixed)]
    assert [p.scores for p in first] == [p.scores for p in off.predict("p0", docs[:20])]
    assert e.cache.stats()["hit_rate"] == pytest.approx(50 / 80)
    # the stage's rows go with its last pipeline
    for name in ("p0", "p1"):
        e.unregister(name)
    assert len(e.cache) == 30
    e.unregister("p2")
    assert len(e.cache) == 0 and e.cache.bytes == 0 and key not in {k for k, _ in e.cache._entries}


async def test_a_plan_with_two_sources_joins_them_under_concurrency() -> None:
    """Text and a category through two source stages into one head: each request's two source events may run on
    different executors at once, and its head runs once both are in."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(8)
    X = np.empty((200, 2), dtype=object)
    X[:, 0] = [" ".join(rng.choice(["good", "bad", "slow", "fast", "nice", "rude"], size=4)) for _ in range(200)]
    X[:, 1] = rng.choice(["a", "b", "c"], size=200)
    y = np.array([("good" in t) or c == "a" for t, c in X])
    ct = ColumnTransformer([("t", CountVectorizer(), 0), ("c", OneHotEncoder(), [1])])
    sk = Pipeline([("ct", ct), ("m", LogisticRegression(max_iter=500))]).fit(X, y)
    e = serve(import_sklearn(sk), budget_ms=1.0)
    assert len(e.get("p").plan.sources) == 2
    s = Scheduler(e, workers=2, reserved=1)
    s.start()
    try:
        asks = [s.submit("p", [list(X[i]), list(X[(i * 7) % 200])]) for i in range(200)]
        got = await asyncio.wait_for(asyncio.gather(*asks), WAIT_S)
        want = sk.predict_proba(X)
        for i, g in enumerate(got):
            np.testing.assert_allclose([p.scores for p in g], want[[i, (i * 7) % 200]], atol=1e-6)
        assert s.queued == 0
    finally:
        await s.stop()
