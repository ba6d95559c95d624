"""The parameter store of one server: every array kept once, by content hash.

Pipelines hold references to the hashes they use; an array goes when its last
pipeline does. Compiled objects built from shared arrays (an n-gram lookup table)
are kept the same way, by the key of what they were built from, so 250 pipelines
with one vocabulary share one table.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from tessera.common.errors import NotFoundError


class ParamStore:
    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._refs: Counter[str] = Counter()
        self._shared: dict[str, Any] = {}
        self._shared_refs: Counter[str] = Counter()
        self._lock = threading.RLock()

    def has(self, h: str) -> bool:
        return h in self._arrays

    def missing(self, hashes: Iterable[str]) -> list[str]:
        return [h for h in hashes if h not in self._arrays]

    def put(self, h: str, arr: np.ndarray) -> bool:
        """Keep ``arr`` under ``h`` unless it is already here; True if it was new."""
        with self._lock:
            if h in self._arrays:
                return False
            self._arrays[h] = arr
            return True

    def get(self, h: str) -> np.ndarray:
        try:
            return self._arrays[h]
        except KeyError:
            raise NotFoundError(f"parameter {h} is not in the store") from None

    def retain(self, hashes: Iterable[str], shared: Iterable[str] = ()) -> None:
        with self._lock:
            self._refs.update(hashes)
            self._shared_refs.update(shared)

    def release(self, hashes: Iterable[str], shared: Iterable[str] = ()) -> list[str]:
        """Drop one reference to each; returns the hashes no pipeline uses any more (removed)."""
        gone = []
        with self._lock:
            for h in hashes:
                self._refs[h] -= 1
                if self._refs[h] <= 0:
                    del self._refs[h]
                    self._arrays.pop(h, None)
                    gone.append(h)
            for k in shared:
                self._shared_refs[k] -= 1
                if self._shared_refs[k] <= 0:
                    del self._shared_refs[k]
                    obj = self._shared.pop(k, None)
                    close = getattr(obj, "close", None)
                    if close is not None:
                        close()
        return gone

    def shared(self, key: str, build: Callable[[], Any]) -> Any:
        """The compiled object under ``key``, built on first use."""
        with self._lock:
            obj = self._shared.get(key)
            if obj is None:
                obj = self._shared[key] = build()
            return obj

    def drop_unreferenced(self) -> None:
        """Forget arrays put but never retained (a registration that failed)."""
        with self._lock:
            for h in [h for h in self._arrays if self._refs[h] <= 0]:
                del self._arrays[h]
            for k in [k for k in self._shared if self._shared_refs[k] <= 0]:
                obj = self._shared.pop(k)
                close = getattr(obj, "close", None)
                if close is not None:
                    close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            arrays = sum(a.nbytes for a in self._arrays.values())
            tables = sum(int(getattr(o, "nbytes", 0)) for o in self._shared.values())
            return {"arrays": len(self._arrays), "array_bytes": arrays, "shared_objects": len(self._shared),
                    "table_bytes": tables, "references": sum(self._refs.values())}
