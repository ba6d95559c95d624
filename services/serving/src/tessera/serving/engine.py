"""The serving runtime of one replica: registered plans and the execution of their stages.

- :class:`Engine` keeps the plans and the :class:`ParamStore`, validates records against a
  pipeline's inputs and runs stages. A source stage (a featurizer) runs once over the
  distinct inputs of all the requests given to it, whichever pipelines they belong to, and
  every pipeline that shares it reads its rows (sub-plan materialization). Featurizer rows
  are also kept across requests in an :class:`~tessera.serving.cache.OutputCache` keyed
  by stage and input, so an input seen before is not featurized again.
- The stage scheduler that feeds it requests as events is :mod:`tessera.serving.scheduler`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.common.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tessera.serving import oven
from tessera.serving.cache import OutputCache, Row, assemble, row_of
from tessera.serving.csr import Csr
from tessera.serving.ir import Graph, check_name
from tessera.serving.models import DenseCompiler, Scores
from tessera.serving.params import ParamStore

log = logging.getLogger(__name__)
DEFAULT_CACHE_BYTES = 64 * 2**20


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


@dataclass(eq=False)
class Registered:
    name: str
    plan: oven.Plan
    budget_ms: float
    params: list[str]
    version: int = 0
    critical: bool = False  # latency-critical: served by the reserved executors too
    consumers: list[list[int]] = field(default_factory=list)  # per stage: the stages that read its output
    n_inputs: list[int] = field(default_factory=list)  # per stage: how many inputs it reads

    def __post_init__(self) -> None:
        stages = self.plan.stages
        self.consumers = [[] for _ in stages]
        for j, st in enumerate(stages):
            for i in st.inputs:
                self.consumers[i].append(j)
        self.n_inputs = [len(st.inputs) for st in stages]

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


def take_rows(X: Any, rows: np.ndarray, n_total: int) -> Any:
    """Rows ``rows`` of a stage output of ``n_total`` rows (the output itself when that is all of them, in order)."""
    if rows.size == n_total and np.array_equal(rows, np.arange(n_total)):
        return X
    if rows.size == 1 and isinstance(X, Csr):  # one record (most requests): its row's slice, copied
        s, e = int(X.indptr[rows[0]]), int(X.indptr[rows[0] + 1])
        return Csr(X.data[s:e].copy(), X.indices[s:e].copy(), np.array([0, e - s], dtype=np.int64), X.shape[1])
    return X[rows]


def distinct_rows(st: oven.Stage, cols: dict[str, list[Any]], n: int, index: dict[tuple[Any, ...], int],
                  uniq: list[tuple[Any, ...]]) -> np.ndarray:
    """For each of ``n`` records, the row of its input (the values of ``st.fields``) among the
    distinct inputs ``uniq`` of a source stage's run; inputs not seen yet are added."""
    rows = np.empty(n, dtype=np.int64)
    fc = [cols[f] for f in st.fields]
    for i in range(n):
        k = tuple(c[i] for c in fc)
        j = index.get(k)
        if j is None:
            j = index[k] = len(uniq)
            uniq.append(k)
        rows[i] = j
    return rows


class Engine:
    def __init__(self, *, max_records: int = 4096, max_text_chars: int = 100_000, prune: bool = True,
                 blackbox: bool = True, compiler: DenseCompiler | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.store = ParamStore()
        self.blackbox = blackbox  # opaque steps (pickles run in a worker process) accepted
        self.compiler = compiler  # builds dense heads into kernels at registration
        self.pipelines: dict[str, Registered] = {}
        self.max_records = max_records
        self.max_text_chars = max_text_chars
        self.prune = prune
        self.cache = OutputCache(cache_bytes)  # featurizer rows kept across requests
        self.stage_runs: Counter[str] = Counter()  # source-stage key -> times run
        self.rows_computed = 0  # rows source stages computed
        self.rows_reused = 0  # rows asked of a source stage beyond the distinct inputs of its run (shared in a batch)
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._plain: set[str] = set()  # source stages whose output is not a CSR matrix: never cached
        self._widths: dict[str, int] = {}  # columns of each cached source stage's output

    # ------------------------------------------------------------------ registry
    def register(self, name: str, graph: Graph, *, budget_ms: float = 5.0, replace: bool = True,
                 critical: bool = False) -> Registered:
        """Compile ``graph`` (its parameters must be in the store) and serve it as ``name``;
        ``critical``: latency-critical (the scheduler's reserved executors serve it)."""
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
        reg = Registered(name, plan, budget_ms, hashes, critical=critical)
        with self._lock:
            self.store.retain(hashes, plan.shared_keys)
            old = self.pipelines.get(name)
            self.pipelines[name] = reg
        if old is not None:
            self.store.release(old.params, old.plan.shared_keys)
            self._forget_stages(old)
        return reg

    def unregister(self, name: str) -> list[str]:
        with self._lock:
            reg = self.pipelines.pop(name, None)
        if reg is None:
            raise NotFoundError(f"no pipeline named {name!r}")
        self._forget_stages(reg)
        return self.store.release(reg.params, reg.plan.shared_keys)

    def _forget_stages(self, gone: Registered) -> None:
        """Drop the kept rows of source stages that no pipeline runs any more."""
        with self._lock:
            live = {st.key for r in self.pipelines.values() for st in r.plan.stages if not st.inputs}
        for st in gone.plan.stages:
            if not st.inputs and st.key not in live:
                self.cache.drop_stage(st.key)

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
    def source_output(self, st: oven.Stage, uniq: Sequence[tuple[Any, ...]]) -> Any:
        """The output of source stage ``st`` for the distinct inputs ``uniq`` (a tuple of the
        values of ``st.fields`` each): one row per input, in order. Rows kept in the cache
        are reused; the others are computed in one call and kept."""
        n = len(uniq)
        cached = self.cache.enabled and st.kind == "featurize" and st.key not in self._plain
        found: list[Row | None] = self.cache.get_many(st.key, uniq) if cached else [None] * n
        miss = [j for j, r in enumerate(found) if r is None]
        X: Any = None
        if miss:
            mk = uniq if len(miss) == n else [uniq[j] for j in miss]
            X = st.fn({f: [u[j] for u in mk] for j, f in enumerate(st.fields)}, len(mk))
            with self._stats_lock:
                self.stage_runs[st.key] += 1
                self.rows_computed += len(mk)
            if cached:
                if isinstance(X, Csr):
                    self._widths[st.key] = X.shape[1]
                    rows = [row_of(X, i) for i in range(len(mk))]
                    self.cache.put_many(st.key, list(zip(mk, rows, strict=True)))
                    if len(miss) < n:
                        for j, r in zip(miss, rows, strict=True):
                            found[j] = r
                else:
                    self._plain.add(st.key)
        if len(miss) == n:
            return X
        return assemble([r for r in found if r is not None], self._widths[st.key])

    def note_reuse(self, asked: int, distinct: int) -> None:
        """``asked`` rows of a source stage were served by ``distinct`` inputs' rows (the rest shared)."""
        with self._stats_lock:
            self.rows_reused += asked - distinct

    def run_stage(self, reg: Registered, i: int, outs: list[Any]) -> Any:
        """Stage ``i`` (not a source) of ``reg``'s plan on the outputs of its inputs."""
        st = reg.plan.stages[i]
        return st.fn(*(outs[j] for j in st.inputs))

    def execute(self, items: Sequence[tuple[Registered, dict[str, list[Any]], int]]) -> list[list[Prediction]]:
        """Run requests (possibly of many pipelines) to the end, synchronously: each source
        stage once over the distinct inputs of all of them, then the rest of each plan."""
        groups: dict[str, tuple[oven.Stage, dict[tuple[Any, ...], int], list[tuple[Any, ...]]]] = {}
        wants: list[dict[int, tuple[str, np.ndarray]]] = []
        for reg, cols, n in items:
            w: dict[int, tuple[str, np.ndarray]] = {}
            for si in reg.plan.sources:
                st = reg.plan.stages[si]
                g = groups.get(st.key)
                if g is None:
                    g = groups[st.key] = (st, {}, [])
                w[si] = (st.key, distinct_rows(st, cols, n, g[1], g[2]))
            wants.append(w)
        outputs = {key: (self.source_output(st, uniq), len(uniq)) for key, (st, _, uniq) in groups.items()}
        self.note_reuse(sum(rows.size for w in wants for _, rows in w.values()),
                        sum(total for _, total in outputs.values()))
        results = []
        for (reg, _, _), w in zip(items, wants, strict=True):
            outs: list[Any] = [None] * len(reg.plan.stages)
            for si, (key, rows) in w.items():
                X, total = outputs[key]
                outs[si] = take_rows(X, rows, total)
            for i, st in enumerate(reg.plan.stages):
                if st.inputs:
                    outs[i] = self.run_stage(reg, i, outs)
            results.append(to_predictions(outs[-1]))
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
