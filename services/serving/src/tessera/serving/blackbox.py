"""Black-box mode: each pipeline an opaque scikit-learn object, as a model zoo serves them.

For comparison with the white-box engine: same records in, same :class:`Prediction` out,
but nothing is shared (every pipeline holds its own vocabularies) and every request runs
the whole pipeline. Objects come from the caller's own process or files it trusts (the
benchmark's pickles): a black box is never received over the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from tessera.common.errors import InvalidArgumentError, NotFoundError
from tessera.serving.engine import Prediction
from tessera.serving.ir import check_name


class BlackBox:
    def __init__(self) -> None:
        self.pipelines: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, name: str, estimator: Any) -> None:
        check_name(name)
        if not hasattr(estimator, "predict"):
            raise InvalidArgumentError(f"{type(estimator).__name__} has no predict()")
        with self._lock:
            self.pipelines[name] = estimator

    def unregister(self, name: str) -> None:
        with self._lock:
            if self.pipelines.pop(name, None) is None:
                raise NotFoundError(f"no pipeline named {name!r}")

    def predict(self, name: str, records: Sequence[Any]) -> list[Prediction]:
        est = self.pipelines.get(name)
        if est is None:
            raise NotFoundError(f"no pipeline named {name!r}")
        X: Any = list(records)
        if X and isinstance(X[0], (list, tuple, np.ndarray)):
            X = np.asarray(X, dtype=object if any(isinstance(v, str) for v in X[0]) else float)
        classes = getattr(est, "classes_", None)
        if classes is None:
            return [Prediction(value=float(v), scores=[float(v)]) for v in np.ravel(est.predict(X))]
        scores = est.predict_proba(X) if hasattr(est, "predict_proba") else est.decision_function(X)
        scores = np.asarray(scores).reshape(len(X), -1)
        # the label from the same scores (as scikit-learn's predict does): one pass, not two
        idx = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else np.argmax(scores, axis=1)
        cls = classes.tolist()
        return [Prediction(label=cls[i], class_index=int(i), scores=s.tolist())
                for i, s in zip(idx.tolist(), scores, strict=True)]
