"""One serving replica: the engine and scheduler of this process, kept in step with the
cluster's registry (the control store) and parameters (the object store).

A pipeline registered on any replica is served by all: a replica that is asked for a
pipeline it has not loaded fetches it (lazily); registry change events reload or drop it.
Parameters already held here are never fetched again (one copy per replica, shared by
every pipeline that names them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from opentelemetry import metrics

from tessera.common import heap
from tessera.common.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from tessera.serving.engine import Engine, Prediction, Registered
from tessera.serving.ir import Graph, check_name, check_tensor
from tessera.serving.scheduler import Scheduler

log = logging.getLogger(__name__)


class Spec(Protocol):
    name: str
    graph_json: str
    latency_budget_ms: float
    registered_ms: int
    latency_critical: bool


class Cluster(Protocol):
    async def put_pipeline(self, spec: Any, *, replace: bool) -> None: ...
    async def get_pipeline(self, name: str) -> Any: ...
    async def delete_pipeline(self, name: str) -> bool: ...
    async def pipeline_names(self) -> list[str]: ...
    async def missing(self, hashes: list[str]) -> list[str]: ...
    async def store_params(self, arrays: dict[str, np.ndarray]) -> int: ...
    async def check_fits(self, nbytes: int, what: str) -> None: ...
    async def param_sizes(self, hashes: list[str]) -> int: ...
    async def load_params(self, hashes: list[str]) -> dict[str, np.ndarray]: ...


class Replica:
    def __init__(self, engine: Engine, scheduler: Scheduler, cluster: Cluster, *, instance_id: str = "",
                 default_budget_ms: float = 2.0) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.cluster = cluster
        self.instance_id = instance_id
        self.default_budget_ms = default_budget_ms
        self._loading: dict[str, asyncio.Lock] = {}
        self._trim_task: asyncio.Task[None] | None = None
        self._trim_again = False

    # ------------------------------------------------------------------ parameters
    async def missing(self, hashes: Sequence[str]) -> list[str]:
        if len(hashes) > 100_000:
            raise InvalidArgumentError("too many hashes in one request")
        return await self._missing(list(dict.fromkeys(hashes)))

    async def _missing(self, hashes: list[str]) -> list[str]:
        """Those of ``hashes`` no live node holds. An array this replica has loaded is readable without asking:
        its view pins the object in the node's store."""
        return await self.cluster.missing(self.engine.store.missing(hashes))

    async def upload(self, tensors: Sequence[tuple[str, str, list[int], bytes]]) -> tuple[int, int]:
        # (the request's copies of the bytes are freed once it is answered: the registration that follows gives
        # their pages back to the system, see register)
        arrays = {h: check_tensor(h, dt, shape, data) for h, dt, shape, data in tensors}  # all checked first
        n = await self.cluster.store_params(arrays)
        return n, sum(a.nbytes for a in arrays.values())

    # ------------------------------------------------------------------ registry
    async def _load(self, spec: Spec) -> Registered:
        graph = Graph.from_json(spec.graph_json)
        need = self.engine.store.missing(graph.param_hashes())
        if need:
            for h, arr in (await self.cluster.load_params(need)).items():
                self.engine.store.put(h, arr)
        budget = spec.latency_budget_ms if spec.latency_budget_ms > 0 else self.default_budget_ms
        try:
            reg = await asyncio.to_thread(self.engine.register, spec.name, graph, budget_ms=budget,
                                          critical=spec.latency_critical)
        finally:
            self._trim_soon()
        reg.version = int(spec.registered_ms)
        return reg

    async def register(self, spec: Spec, *, replace: bool) -> Registered:
        check_name(spec.name)
        if spec.latency_budget_ms < 0:
            raise InvalidArgumentError("latency_budget_ms must be >= 0")
        graph = Graph.from_json(spec.graph_json)
        hashes = graph.param_hashes()
        missing = await self._missing(hashes)
        if missing:
            raise InvalidArgumentError(f"pipeline {spec.name!r}: parameters not uploaded: {', '.join(missing[:5])}")
        store = self.engine.store
        here = [h for h in hashes if store.has(h)]
        size = sum(store.get(h).nbytes for h in here) + await self.cluster.param_sizes(
            [h for h in hashes if not store.has(h)])
        await self.cluster.check_fits(size, f"pipeline {spec.name!r}")
        if not replace and await self.cluster.get_pipeline(spec.name) is not None:
            raise AlreadyExistsError(f"pipeline {spec.name!r} is already registered")
        spec.registered_ms = int(time.time() * 1000)
        try:
            reg = await self._load(spec)  # compiles here first: a bad graph never reaches the registry
            try:
                await self.cluster.put_pipeline(spec, replace=replace)
            except Exception:
                self.engine.unregister(spec.name)
                raise
        finally:
            self._trim_soon()  # the uploads' request copies and what building the plan used are freed by now
        return reg

    def _trim_soon(self) -> None:
        """Give the memory this process freed back to the system, in a thread, after the caller is answered
        (a few ms; one trim at a time, another after it if asked for meanwhile)."""
        if self._trim_task is not None and not self._trim_task.done():
            self._trim_again = True
            return
        self._trim_task = asyncio.get_running_loop().create_task(self._trim())

    async def _trim(self) -> None:
        self._trim_again = True
        while self._trim_again:
            self._trim_again = False
            await asyncio.to_thread(heap.trim)

    async def ensure(self, name: str) -> Registered:
        """The pipeline ``name``, loaded from the registry if this replica does not have it yet."""
        reg = self.engine.pipelines.get(name)
        if reg is not None:
            return reg
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            reg = self.engine.pipelines.get(name)
            if reg is not None:
                return reg
            spec = await self.cluster.get_pipeline(check_name(name))
            if spec is None:
                raise NotFoundError(f"no pipeline named {name!r}")
            log.info("loading pipeline %s", name)
            return await self._load(spec)

    async def unregister(self, name: str) -> None:
        check_name(name)
        deleted = await self.cluster.delete_pipeline(name)
        local = name in self.engine.pipelines
        if local:
            self.engine.unregister(name)
        if not deleted and not local:
            raise NotFoundError(f"no pipeline named {name!r}")

    async def on_change(self, op: str, name: str, spec: Spec | None) -> None:
        """A registry change announced by the control store."""
        try:
            if op == "deleted":
                if name in self.engine.pipelines:
                    self.engine.unregister(name)
                    log.info("pipeline %s unregistered", name)
            elif spec is not None and name in self.engine.pipelines:
                if self.engine.pipelines[name].version < spec.registered_ms:
                    await self._load(spec)
                    log.info("pipeline %s reloaded", name)
        except Exception:
            log.exception("applying registry change %s %s", op, name)

    async def infos(self) -> list[tuple[Spec, Registered | None, Graph]]:
        names = await self.cluster.pipeline_names()
        specs = await asyncio.gather(*(self.cluster.get_pipeline(n) for n in names))
        out = []
        for s in specs:
            if s is not None:
                out.append((s, self.engine.pipelines.get(s.name), Graph.from_json(s.graph_json)))
        return out

    # ------------------------------------------------------------------ prediction
    async def predict(self, name: str, records: Sequence[Any]) -> list[Prediction]:
        start, error = time.perf_counter(), ""
        try:
            reg = await self.ensure(name)
            return await self.scheduler.submit_checked(reg, self.engine.columns(reg, records), len(records))
        except Exception as e:
            error = type(e).__name__
            raise
        finally:
            _observe_request(self._label(name), len(records), time.perf_counter() - start, error)

    async def predict_many(self, requests: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Prediction]]:
        """Requests of several pipelines, executed together (shared featurizers run once per input)."""
        if not requests:
            raise InvalidArgumentError("no requests given")
        total = sum(len(r) for _, r in requests)
        if total > self.engine.max_records:
            from tessera.common.errors import ResourceExhaustedError

            raise ResourceExhaustedError(f"{total} records in one batch; at most {self.engine.max_records}")
        start, error = time.perf_counter(), ""
        try:
            regs = [await self.ensure(n) for n, _ in requests]
            items = [(reg, self.engine.columns(reg, recs), len(recs))
                     for reg, (_, recs) in zip(regs, requests, strict=True)]
            return await self.scheduler.submit_many(items)
        except Exception as e:
            error = type(e).__name__
            raise
        finally:
            took = time.perf_counter() - start
            for n, recs in requests:
                _observe_request(self._label(n), len(recs), took, error)

    def _label(self, name: str) -> str:
        """``name`` as a metric attribute: a pipeline this replica has, else "_unknown" (a caller's made-up names
        must not each become a series)."""
        return name if name in self.engine.pipelines else "_unknown"


_meter = metrics.get_meter("tessera.serving")
_request_duration = _meter.create_histogram(
    "tessera.serving.request.duration", unit="s", description="Prediction requests by pipeline, from arrival to reply",
    explicit_bucket_boundaries_advisory=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                         0.5, 1.0, 2.5, 5.0))
_records = _meter.create_counter("tessera.serving.records", unit="{record}",
                                 description="Records asked to predict, by pipeline")


def _observe_request(pipeline: str, records: int, seconds: float, error: str) -> None:
    """One prediction request in the metrics (its count is the requests; ``error.type`` names a failure)."""
    attrs = {"tessera.pipeline": pipeline, **({"error.type": error} if error else {})}
    _request_duration.record(seconds, attrs)
    _records.add(records, attrs)
