"""Materialized outputs of shared sub-plans, kept across requests (PRETZEL's sub-plan materialization).

A featurize stage is a pure function of the record fields it reads: its output row for one input is the same in
every batch, for every pipeline that shares the stage. :class:`OutputCache` keeps those rows: a least-recently-used
map keyed by (stage key, input) whose values are one CSR row each (its values and column indices). The dictionary
hashes the input and compares it for equality, so a hit is always the row of that very input, never of another
that hashes alike.

The bound is in bytes: each entry counts its arrays, its key (the input text) and a fixed overhead per entry
(:data:`ENTRY_OVERHEAD`, the Python objects that hold it); entries are evicted, least recently used first, while
the total passes the bound. An input whose entry alone would take more than an eighth of the bound is not kept.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from tessera.serving.csr import Csr

Row = tuple[np.ndarray, np.ndarray]  # (values, column indices) of one CSR row
ENTRY_OVERHEAD = 640  # bytes per entry beyond its arrays' data and its key: ndarray and tuple headers, the map's node


def _key_bytes(key: tuple[Any, ...]) -> int:
    return sys.getsizeof(key) + sum(sys.getsizeof(v) for v in key)


def row_of(X: Csr, i: int) -> Row:
    """Row ``i`` of ``X`` as arrays of its own (the batch's arrays are not kept alive)."""
    s, e = int(X.indptr[i]), int(X.indptr[i + 1])
    return X.data[s:e].copy(), X.indices[s:e].copy()


def assemble(rows: Sequence[Row], n_cols: int) -> Csr:
    """Rows stacked into one CSR matrix (``n_cols`` wide), in order."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([r[0].size for r in rows], out=indptr[1:])
    return Csr(np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]), indptr, n_cols)


class OutputCache:
    """An LRU of stage output rows, at most ``capacity_bytes`` (0: nothing is kept). Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("the cache's capacity must be >= 0 bytes")
        self.capacity = capacity_bytes
        self._entries: OrderedDict[tuple[str, tuple[Any, ...]], tuple[Row, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def get_many(self, stage: str, keys: Sequence[tuple[Any, ...]]) -> list[Row | None]:
        """The kept row of each input (None where there is none); found ones become the most recently used."""
        out: list[Row | None] = []
        with self._lock:
            entries = self._entries
            for k in keys:
                e = entries.get((stage, k))
                if e is None:
                    out.append(None)
                else:
                    entries.move_to_end((stage, k))
                    out.append(e[0])
            found = sum(r is not None for r in out)
            self.hits += found
            self.misses += len(out) - found
        return out

    def put_many(self, stage: str, items: Sequence[tuple[tuple[Any, ...], Row]]) -> None:
        """Keep each (input, row), evicting the least recently used entries past the bound."""
        if not self.enabled:
            return
        limit = self.capacity // 8
        sized = []
        for k, row in items:
            size = row[0].nbytes + row[1].nbytes + _key_bytes(k) + ENTRY_OVERHEAD
            if size <= limit:
                sized.append(((stage, k), row, size))
        if not sized:
            return
        with self._lock:
            entries = self._entries
            for key, row, size in sized:
                old = entries.pop(key, None)
                if old is not None:
                    self.bytes -= old[1]
                entries[key] = (row, size)
                self.bytes += size
            while self.bytes > self.capacity:
                _, (_, size) = entries.popitem(last=False)
                self.bytes -= size
                self.evictions += 1

    def drop_stage(self, stage: str) -> int:
        """Forget every row of ``stage`` (its last pipeline is gone); returns how many."""
        with self._lock:
            gone = [k for k in self._entries if k[0] == stage]
            for k in gone:
                self.bytes -= self._entries.pop(k)[1]
        return len(gone)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "entries": len(self._entries),
                    "bytes": self.bytes, "capacity_bytes": self.capacity, "evictions": self.evictions}
