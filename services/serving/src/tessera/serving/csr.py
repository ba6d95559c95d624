"""A light CSR matrix for the hot path: three arrays and a width, no validation or
dtype negotiation per operation (scipy's constructors cost more than a featurized
sentence). Converted to scipy only where an operator needs it."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp


class Csr:
    __slots__ = ("data", "indices", "indptr", "shape")

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int) -> None:
        self.data = data
        self.indices = indices
        self.indptr = indptr
        self.shape = (len(indptr) - 1, n_cols)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))

    def scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape)
        np.add.at(out, (self.rows(), self.indices), self.data)
        return out

    def take(self, rows: np.ndarray) -> Csr:
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lens = ends - starts
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        idx = np.repeat(starts - indptr[:-1], lens) + np.arange(indptr[-1])
        return Csr(self.data[idx], self.indices[idx], indptr, self.shape[1])

    def __getitem__(self, rows: Any) -> Csr:
        return self.take(np.asarray(rows, dtype=np.int64))

    def dot(self, coef: np.ndarray) -> np.ndarray:
        """self @ coef.T for a (k, d) C-ordered coef: only the non-zeros are touched."""
        n, k = self.shape[0], coef.shape[0]
        rows = self.rows()
        w = coef[:, self.indices] * self.data
        return np.stack([np.bincount(rows, weights=w[j], minlength=n) for j in range(k)], axis=1)


def hstack(blocks: list[Csr]) -> Csr:
    """Side by side: each row's entries of every block, column offsets added."""
    n = blocks[0].shape[0]
    lens = np.stack([np.diff(b.indptr) for b in blocks], axis=1)  # (n, B)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens.sum(axis=1), out=indptr[1:])
    total = int(indptr[-1])
    data = np.empty(total)
    indices = np.empty(total, dtype=np.int32)
    off = 0
    pos = indptr[:-1].copy()
    for j, b in enumerate(blocks):
        l_ = lens[:, j]
        dst = np.repeat(pos - b.indptr[:-1], l_) + np.arange(b.indptr[-1])
        data[dst] = b.data
        indices[dst] = b.indices + off
        pos += l_
        off += b.shape[1]
    return Csr(data, indices, indptr, off)
