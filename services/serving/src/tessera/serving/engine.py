"""The serving runtime of one replica: registered plans, one stage scheduler, an executor pool.

- :class:`Engine` keeps the plans and the :class:`ParamStore`, validates records against a
  pipeline's inputs and runs batches. A batch may mix pipelines: each source stage
  (featurizer) present in it runs once over the distinct inputs of all its requests, and
  every pipeline that shares it reads its rows (sub-plan materialization).
- :class:`Scheduler` is the one event-driven scheduler of all pipelines: requests queue up
  and are dispatched to the executor pool as batches, no later than each request's
  latency budget allows (the reservation of its pipeline, minus the measured cost of a
  batch), or as soon as a batch is full. Waiting is skipped while it gathers nothing
  (a single caller waiting for each answer), so batching never costs an idle system latency.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opentelemetry import metrics

from tessera.common.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tessera.serving import oven
from tessera.serving.ir import Graph, check_name
from tessera.serving.models import DenseCompiler, Scores
from tessera.serving.params import ParamStore

log = logging.getLogger(__name__)
_batch_records = metrics.get_meter("tessera.serving").create_histogram(
    "tessera.serving.batch.size", unit="{record}", description="Records in each batch the stage scheduler ran",
    explicit_bucket_boundaries_advisory=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))


@dataclass
class Prediction:
    """One record's prediction: a class (index into the pipeline's classes) with its
    scores (probabilities when the model has them, else decision values), or a value."""

    label: Any = None
    class_index: int = -1
    value: float = 0.0
    scores: list[float] = field(default_factory=list)
    # the decision function, where it is not already ``scores`` (a classifier with probabilities)
    decision: list[float] | None = None


@dataclass
class Registered:
    name: str
    plan: oven.Plan
    budget_ms: float
    params: list[str]
    version: int = 0

    @property
    def classes(self) -> list[Any] | None:
        head = self.plan.stages[-1].fn
        return getattr(head, "classes", None)

    @property
    def outputs(self) -> list[str]:
        """What a request may ask besides ``predict``: ``predict_proba``, ``decision_function``."""
        return list(getattr(self.plan.stages[-1].fn, "outputs", []))


def to_predictions(s: Scores) -> list[Prediction]:
    if s.classes is None:
        return [Prediction(value=float(v), scores=[float(v)]) for v in s.decision[:, 0]]
    idx = s.labels()
    if s.proba is None:
        return [Prediction(label=s.classes[int(i)], class_index=int(i), scores=r.tolist())
                for i, r in zip(idx, s.decision, strict=True)]
    if not s.has_decision:
        return [Prediction(label=s.classes[int(i)], class_index=int(i), scores=r.tolist())
                for i, r in zip(idx, s.proba, strict=True)]
    return [Prediction(label=s.classes[int(i)], class_index=int(i), scores=r.tolist(), decision=d.tolist())
            for i, r, d in zip(idx, s.proba, s.decision, strict=True)]


def _take_rows(X: Any, rows: np.ndarray, n_total: int) -> Any:
    if rows.size == n_total and np.array_equal(rows, np.arange(n_total)):
        return X
    return X[rows]


class Engine:
    def __init__(self, *, max_records: int = 4096, max_text_chars: int = 100_000, prune: bool = True,
                 blackbox: bool = True, compiler: DenseCompiler | None = None) -> None:
        self.store = ParamStore()
        self.blackbox = blackbox  # opaque steps (pickles run in a worker process) accepted
        self.compiler = compiler  # builds dense heads into kernels at registration
        self.pipelines: dict[str, Registered] = {}
        self.max_records = max_records
        self.max_text_chars = max_text_chars
        self.prune = prune
        self.stage_runs: Counter[str] = Counter()  # source-stage key -> times run
        self.rows_computed = 0
        self.rows_reused = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ registry
    def register(self, name: str, graph: Graph, *, budget_ms: float = 5.0, replace: bool = True) -> Registered:
        """Compile ``graph`` (its parameters must be in the store) and serve it as ``name``."""
        check_name(name)
        if budget_ms < 0 or budget_ms > 60_000:
            raise InvalidArgumentError(f"latency budget must be 0..60000 ms, got {budget_ms}")
        if not replace and name in self.pipelines:
            raise AlreadyExistsError(f"pipeline {name!r} is already registered")
        hashes = graph.param_hashes()
        missing = self.store.missing(hashes)
        if missing:
            raise InvalidArgumentError(f"pipeline {name!r}: parameters not uploaded: {', '.join(missing[:5])}")
        try:
            plan = oven.bake(name, graph, self.store, prune=self.prune, blackbox=self.blackbox,
                             compiler=self.compiler)
        except Exception:
            self.store.drop_unreferenced()
            raise
        reg = Registered(name, plan, budget_ms, hashes)
        with self._lock:
            self.store.retain(hashes, plan.shared_keys)
            old = self.pipelines.get(name)
            self.pipelines[name] = reg
        if old is not None:
            self.store.release(old.params, old.plan.shared_keys)
        return reg

    def unregister(self, name: str) -> list[str]:
        with self._lock:
            reg = self.pipelines.pop(name, None)
        if reg is None:
            raise NotFoundError(f"no pipeline named {name!r}")
        return self.store.release(reg.params, reg.plan.shared_keys)

    def get(self, name: str) -> Registered:
        reg = self.pipelines.get(name)
        if reg is None:
            raise NotFoundError(f"no pipeline named {name!r}")
        return reg

    # ------------------------------------------------------------------ records
    def columns(self, reg: Registered, records: Sequence[Any]) -> dict[str, list[Any]]:
        """Check ``records`` against the pipeline's inputs; returns them as columns."""
        n = len(records)
        if n == 0:
            raise InvalidArgumentError("no records given")
        if n > self.max_records:
            raise ResourceExhaustedError(f"{n} records in one request; at most {self.max_records}")
        inputs = reg.plan.graph.inputs
        cols: dict[str, list[Any]] = {f.name: [None] * n for f in inputs}
        single = inputs[0] if len(inputs) == 1 else None
        for i, r in enumerate(records):
            if isinstance(r, np.ndarray):
                r = r.tolist()
            if isinstance(r, dict):
                rec = r
            elif single is not None and not isinstance(r, (list, tuple)):
                rec = {single.name: r}
            elif isinstance(r, (list, tuple)):
                if len(r) != len(inputs):
                    raise InvalidArgumentError(f"record {i}: {len(r)} values for {len(inputs)} inputs "
                                               f"({', '.join(f.name for f in inputs)})")
                rec = {f.name: v for f, v in zip(inputs, r, strict=True)}
            else:
                raise InvalidArgumentError(f"record {i}: expected an object with fields "
                                           f"{', '.join(f.name for f in inputs)}")
            for f in inputs:
                if f.name not in rec:
                    raise InvalidArgumentError(f"record {i}: missing field {f.name!r}")
                v = rec[f.name]
                if f.kind == "text":
                    if not isinstance(v, str):
                        raise InvalidArgumentError(f"record {i}: field {f.name!r} must be text, got {type(v).__name__}")
                    if len(v) > self.max_text_chars:
                        raise ResourceExhaustedError(f"record {i}: field {f.name!r} has {len(v)} characters; "
                                                     f"at most {self.max_text_chars}")
                elif f.kind == "number":
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise InvalidArgumentError(f"record {i}: field {f.name!r} must be a number, got {type(v).__name__}")
                elif not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise InvalidArgumentError(f"record {i}: field {f.name!r} must be a string or number")
                cols[f.name][i] = v
        return cols

    # ------------------------------------------------------------------ execution
    def execute(self, items: Sequence[tuple[Registered, dict[str, list[Any]], int]]) -> list[list[Prediction]]:
        """Run a batch of requests (possibly of many pipelines); shared source stages run once."""
        # 1. source stages, grouped by content key over every request in the batch
        groups: dict[str, tuple[oven.Stage, dict[tuple[Any, ...], int], list[tuple[Any, ...]]]] = {}
        wants: list[dict[int, tuple[str, np.ndarray]]] = []
        for reg, cols, n in items:
            w: dict[int, tuple[str, np.ndarray]] = {}
            for si in reg.plan.sources:
                st = reg.plan.stages[si]
                g = groups.get(st.key)
                if g is None:
                    g = groups[st.key] = (st, {}, [])
                index, uniq = g[1], g[2]
                rows = np.empty(n, dtype=np.int64)
                fc = [cols[f] for f in st.fields]
                for i in range(n):
                    k = tuple(c[i] for c in fc)
                    j = index.get(k)
                    if j is None:
                        j = index[k] = len(uniq)
                        uniq.append(k)
                    rows[i] = j
                w[si] = (st.key, rows)
            wants.append(w)
        outputs: dict[str, tuple[Any, int]] = {}
        for key, (st, _, uniq) in groups.items():
            ucols = {f: [u[j] for u in uniq] for j, f in enumerate(st.fields)}
            outputs[key] = (st.fn(ucols, len(uniq)), len(uniq))
            self.stage_runs[key] += 1
            self.rows_computed += len(uniq)
        # 2. the rest of each plan on its rows
        results = []
        for (reg, cols, n), w in zip(items, wants, strict=True):
            sources = {}
            for si, (key, rows) in w.items():
                X, total = outputs[key]
                sources[si] = _take_rows(X, rows, total)
            scores = oven.run(reg.plan, cols, n, sources=sources)
            results.append(to_predictions(scores))
        asked = sum(rows.size for w in wants for _, rows in w.values())
        self.rows_reused += asked - sum(total for _, total in outputs.values())
        return results

    def predict(self, name: str, records: Sequence[Any]) -> list[Prediction]:
        """Synchronous prediction (no scheduler): for tests and the black-box comparison."""
        reg = self.get(name)
        return self.execute([(reg, self.columns(reg, records), len(records))])[0]

    def memory(self) -> dict[str, int]:
        s = self.store.stats()
        s["plan_bytes"] = sum(r.plan.extra_bytes for r in self.pipelines.values())
        s["total_bytes"] = s["array_bytes"] + s["table_bytes"] + s["plan_bytes"]
        return s


@dataclass
class _Request:
    reg: Registered
    cols: dict[str, list[Any]]
    n: int
    deadline: float
    future: asyncio.Future[list[Prediction]]


class Scheduler:
    """One scheduler for every pipeline of the replica (see module doc)."""

    def __init__(self, engine: Engine, *, workers: int = 2, max_batch: int = 64, inline_rows: int = 4,
                 max_queued: int = 65536) -> None:
        self.engine = engine
        self.max_queued = max_queued  # records waiting for an executor; more are refused (back-pressure)
        self.queued = 0
        self.inline_rows = inline_rows  # batches this small run on the event loop (no thread handoff)
        self.workers = workers
        self.max_batch = max_batch
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serving-exec")
        self._queue: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task[None] | None = None
        self.cost_s = 0.0005  # EWMA of one batch's execution time
        self.wait_gain = 1.0  # EWMA of the requests that waiting for the budget gathered
        self._probe = 0
        self.batches = 0
        self.batch_sizes: Counter[int] = Counter()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.create_task(self._loop(), name="serving-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for r in self._queue:
            if not r.future.done():
                r.future.cancel()
        self._queue.clear()
        self.queued = 0
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def submit(self, name: str, records: Sequence[Any]) -> list[Prediction]:
        reg = self.engine.get(name)
        return await self.submit_checked(reg, self.engine.columns(reg, records), len(records))

    async def submit_checked(self, reg: Registered, cols: dict[str, list[Any]], n: int) -> list[Prediction]:
        assert self._wake is not None, "scheduler not started"
        if self.queued + n > self.max_queued:
            raise ResourceExhaustedError(
                f"the serving queue is full: {self.queued} records wait, {n} more would pass the limit of "
                f"{self.max_queued} (serving_max_queued_records); retry later or on another replica")
        fut: asyncio.Future[list[Prediction]] = asyncio.get_running_loop().create_future()
        self.queued += n
        self._queue.append(_Request(reg, cols, n, time.monotonic() + reg.budget_ms / 1000.0, fut))
        self._wake.set()
        return await fut

    async def _loop(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()  # a free executor: now decide what it runs
            # wait for more requests while every queued one can still make its budget, unless
            # waiting has stopped paying (a lone sequential caller: nothing else ever arrives);
            # every 16th batch waits anyway, to notice when traffic picks up
            self._probe += 1
            wait = self.wait_gain >= 0.25 or self._probe % 16 == 0
            queued = len(self._queue)
            while wait and self._queue:
                size = sum(r.n for r in self._queue)
                if size >= self.max_batch:
                    break
                slack = min(r.deadline for r in self._queue) - time.monotonic() - self.cost_s
                if slack <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=slack)
                except TimeoutError:
                    break
            if wait:
                self.wait_gain = 0.7 * self.wait_gain + 0.3 * (len(self._queue) - queued)
            if not self._queue:
                self._slots.release()
                continue
            batch: list[_Request] = []
            total = 0
            self._queue.sort(key=lambda r: r.deadline)
            while self._queue and (not batch or total + self._queue[0].n <= self.max_batch):
                r = self._queue.pop(0)
                self.queued -= r.n
                batch.append(r)
                total += r.n
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _execute(self, items: list[tuple[Registered, dict[str, list[Any]], int]]) -> list[list[Prediction]]:
        if sum(n for _, _, n in items) <= self.inline_rows:
            return self.engine.execute(items)  # sub-millisecond: a thread handoff would cost more
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.engine.execute, items)

    async def _run(self, batch: list[_Request]) -> None:
        assert self._slots is not None
        t0 = time.monotonic()
        try:
            live = [r for r in batch if not r.future.done()]
            items = [(r.reg, r.cols, r.n) for r in live]
            try:
                results = await self._execute(items)
            except Exception:
                if len(live) == 1:
                    raise
                # one bad request (an unknown category, say) must not fail the others batched with it
                for r, item in zip(live, items, strict=True):
                    try:
                        res1 = (await self._execute([item]))[0]
                    except Exception as e1:
                        if not r.future.done():
                            r.future.set_exception(e1)
                    else:
                        if not r.future.done():
                            r.future.set_result(res1)
                return
            for r, res in zip(live, results, strict=True):
                if not r.future.done():
                    r.future.set_result(res)
        except Exception as e:
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
        finally:
            self._slots.release()
            dt = time.monotonic() - t0
            self.cost_s = 0.8 * self.cost_s + 0.2 * dt
            self.batches += 1
            _batch_records.record(sum(r.n for r in batch))
            self.batch_sizes[sum(r.n for r in batch)] += 1
