"""Opaque steps: scikit-learn objects the IR cannot express, run in a worker process.

A step the importer cannot translate travels as a ``blackbox`` node whose parameter is the
step's pickle. The serving process never unpickles it: a worker process (started with
``spawn``, so it shares no threads or locks with the server) loads each pickle once, keeps
the most recently used ones, and runs ``transform`` or ``predict``/``predict_proba``/
``decision_function`` on the batches sent to it. A worker that dies (a crashing step) is
replaced at the next call; every call has a deadline.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import pickle
import threading
from collections import OrderedDict
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import scipy.sparse as sp

from tessera.common.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from tessera.serving.csr import Csr
from tessera.serving.models import Scores

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 60.0  # one batch through an opaque step
LOAD_TIMEOUT_S = 120.0  # the first call of a worker also starts Python and imports scikit-learn
KEEP = 64  # unpickled steps each worker keeps

# ----------------------------------------------------------------------------- worker side
_loaded: OrderedDict[str, Any] = OrderedDict()
_NEED = "__need_pickle__"


def _get(key: str, blob: bytes | None) -> Any:
    est = _loaded.get(key)
    if est is not None:
        _loaded.move_to_end(key)
        return est
    if blob is None:
        return None
    est = pickle.loads(blob)  # noqa: S301 - the point of this process: opaque steps are pickles
    _loaded[key] = est
    while len(_loaded) > KEEP:
        _loaded.popitem(last=False)
    return est


def _describe(est: Any) -> dict[str, Any]:
    classes = getattr(est, "classes_", None)
    return {"type": type(est).__name__, "module": type(est).__module__,
            "classes": None if classes is None else np.asarray(classes).tolist(),
            "transform": hasattr(est, "transform"), "predict": hasattr(est, "predict"),
            "predict_proba": hasattr(est, "predict_proba"), "decision_function": hasattr(est, "decision_function")}


def _work(key: str, blob: bytes | None, method: str, X: Any) -> Any:
    """Runs in the worker: ``method`` of step ``key`` (unpickled from ``blob`` if not kept)."""
    est = _get(key, blob)
    if est is None:
        return _NEED
    if method == "describe":
        return _describe(est)
    if method == "transform":
        return est.transform(X)
    # a model: everything its source offers, so one call answers any requested output
    classes = getattr(est, "classes_", None)
    pred = np.asarray(est.predict(X))
    if classes is None:
        return {"value": pred.astype(np.float64).reshape(len(pred), -1)}
    where = {c: i for i, c in enumerate(np.asarray(classes).tolist())}
    out: dict[str, Any] = {"index": np.asarray([where[c] for c in pred.tolist()], dtype=np.int64)}
    if hasattr(est, "predict_proba"):
        out["proba"] = np.asarray(est.predict_proba(X), dtype=np.float64)
    if hasattr(est, "decision_function"):
        d = np.asarray(est.decision_function(X), dtype=np.float64)
        out["decision"] = d.reshape(len(pred), -1)
    return out


# ----------------------------------------------------------------------------- server side
class WorkerPool:
    """The worker processes of one server (started at the first opaque step)."""

    def __init__(self, workers: int = 1, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.calls = 0
        self.restarts = 0

    def _executor(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ProcessPoolExecutor(max_workers=self.workers,
                                                    mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _broken(self, pool: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
                self.restarts += 1
        pool.shutdown(wait=False, cancel_futures=True)

    def call(self, key: str, blob: np.ndarray | bytes, method: str, X: Any = None, *,
             timeout_s: float | None = None) -> Any:
        """``method`` of the step ``key`` on ``X`` in a worker (its pickle sent only to a worker that lacks it)."""
        self.calls += 1
        timeout = timeout_s or self.timeout_s
        if isinstance(X, Csr):
            X = X.scipy()
        data: bytes | None = None
        for _ in range(3):  # NEED: the worker had not loaded it (or dropped it); send the pickle along
            pool = self._executor()
            try:
                fut = pool.submit(_work, key, data, method, X)
                out = fut.result(timeout=timeout)
            except BrokenProcessPool:
                self._broken(pool)
                raise UnavailableError(f"the worker process running opaque step {key[:12]} died; it is restarted "
                                       "at the next call") from None
            except cf.TimeoutError:
                self._broken(pool)  # a step that hangs takes its worker with it
                raise DeadlineExceededError(f"opaque step {key[:12]} took more than {timeout:.0f} s") from None
            except (pickle.UnpicklingError, AttributeError, ImportError, ModuleNotFoundError, EOFError) as e:
                raise InvalidArgumentError(f"opaque step {key[:12]} cannot be loaded: {type(e).__name__}: {e}") from None
            if not (isinstance(out, str) and out == _NEED):
                return out
            data = blob.tobytes() if isinstance(blob, np.ndarray) else bytes(blob)
        raise UnavailableError(f"opaque step {key[:12]}: the worker kept dropping it")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_default: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """The process's worker pool (no process runs until an opaque step is registered)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = WorkerPool()
        return _default


def shutdown() -> None:
    """Stop the worker processes (server shutdown; a later opaque step starts them again)."""
    with _default_lock:
        pool = _default
    if pool is not None:
        pool.close()


class OpaqueStage:
    """A ``blackbox`` node as a stage: its pickle runs in the worker pool."""

    def __init__(self, key: str, blob: np.ndarray, attrs: dict[str, Any], pool: WorkerPool) -> None:
        self.key = key
        self.blob = blob
        self.pool = pool
        self.kind = str(attrs.get("kind", "model"))
        if self.kind not in ("model", "transform"):
            raise InvalidArgumentError(f"blackbox: kind must be model or transform, got {self.kind!r}")
        self.text = bool(attrs.get("text", False))  # the step reads a list of documents
        self.estimator = str(attrs.get("estimator", "?"))
        desc = pool.call(key, blob, "describe", timeout_s=LOAD_TIMEOUT_S)  # loads it now: a bad pickle fails here
        if not isinstance(desc, dict):
            raise InvalidArgumentError(f"blackbox {self.estimator}: the pickle is not a scikit-learn step")
        self.description = desc
        if self.kind == "model" and not desc["predict"]:
            raise InvalidArgumentError(f"blackbox {desc['type']}: an opaque model needs predict()")
        if self.kind == "transform" and not desc["transform"]:
            raise InvalidArgumentError(f"blackbox {desc['type']}: an opaque transform needs transform()")
        self.classes: list[Any] | None = desc["classes"] if self.kind == "model" else None
        want = attrs.get("classes")
        if self.kind == "model" and want is not None and want != self.classes:
            raise InvalidArgumentError(f"blackbox {desc['type']}: classes {want} in the graph, {self.classes} in the pickle")
        self.outputs = [o for o in ("predict_proba", "decision_function") if desc[o]] if self.classes is not None else []

    def _input(self, X: Any) -> Any:
        if self.text:
            X = np.asarray(X, dtype=object)
            return X[:, 0].tolist() if X.ndim == 2 else X.tolist()
        return X

    def __call__(self, X: Any) -> Any:
        out = self.pool.call(self.key, self.blob, self.kind, self._input(X))
        if self.kind == "transform":
            return sp.csr_matrix(out) if sp.issparse(out) else np.asarray(out, dtype=np.float64)
        if self.classes is None:
            return Scores(out["value"], None, None)
        proba, decision = out.get("proba"), out.get("decision")
        main = decision if decision is not None else proba
        if main is None:
            main = np.zeros((out["index"].size, 0))
        return Scores(main, proba, self.classes, index=out["index"], has_decision=decision is not None)
