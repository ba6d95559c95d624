"""Text featurizers that give scikit-learn's exact features: n-gram counts over a
vocabulary (C kernel, or Python without a compiler), hashing, TF-IDF weighting.

The analyzers follow scikit-learn's: ``lowercase`` and ``strip_accents`` first; ``char``
collapses runs of whitespace to one space and takes every n-gram; ``char_wb`` pads each
whitespace-separated word with spaces; ``word`` finds tokens with ``token_pattern``,
drops stop words and joins n consecutive tokens with single spaces.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from tessera.common.errors import InvalidArgumentError
from tessera.serving import native
from tessera.serving.csr import Csr
from tessera.serving.ir import decode_terms

_WS = re.compile(r"\s\s+")


def _strip_unicode(s: str) -> str:
    n = unicodedata.normalize("NFKD", s)
    return s if n == s else "".join(c for c in n if not unicodedata.combining(c))


def _strip_ascii(s: str) -> str:
    return unicodedata.normalize("NFKD", s).encode("ASCII", "ignore").decode("ASCII")


class Analyzer:
    """Turns documents into the strings whose n-grams are counted (and the n-grams themselves)."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.kind = attrs.get("analyzer", "word")
        if self.kind not in ("word", "char", "char_wb"):
            raise InvalidArgumentError(f"analyzer must be word, char or char_wb, got {self.kind!r}")
        lo, hi = attrs.get("ngram_range", [1, 1])
        self.n_min, self.n_max = int(lo), int(hi)
        if not 1 <= self.n_min <= self.n_max <= 16:
            raise InvalidArgumentError(f"bad ngram_range {[lo, hi]}")
        self.lowercase = bool(attrs.get("lowercase", True))
        accents = attrs.get("strip_accents")
        self.strip: Callable[[str], str] | None = {None: None, "unicode": _strip_unicode, "ascii": _strip_ascii}.get(accents)
        if accents is not None and self.strip is None:
            raise InvalidArgumentError(f"strip_accents must be null, 'unicode' or 'ascii', got {accents!r}")
        try:
            self.pattern = re.compile(attrs.get("token_pattern", r"(?u)\b\w\w+\b"))
        except re.error as e:
            raise InvalidArgumentError(f"bad token_pattern: {e}") from None
        self.stop = frozenset(attrs.get("stop_words") or ())

    def preprocess(self, doc: str) -> str:
        if self.lowercase:
            doc = doc.lower()
        if self.strip is not None:
            doc = self.strip(doc)
        return doc

    def tokens(self, doc: str) -> list[str]:
        toks = self.pattern.findall(doc)
        return [t for t in toks if t not in self.stop] if self.stop else toks

    def ngrams(self, doc: str) -> list[str]:
        """All counted n-grams of one document (the Python path; the C path counts the same)."""
        doc = self.preprocess(doc)
        out: list[str] = []
        if self.kind == "word":
            toks = self.tokens(doc)
            for n in range(self.n_min, min(self.n_max, len(toks)) + 1):
                out.extend(" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1))
        elif self.kind == "char":
            doc = _WS.sub(" ", doc)
            for n in range(self.n_min, self.n_max + 1):
                out.extend(doc[i:i + n] for i in range(len(doc) - n + 1))
        else:
            for w in doc.split():
                w = " " + w + " "
                for n in range(self.n_min, self.n_max + 1):
                    off = 0
                    out.append(w[off:off + n])
                    while off + n < len(w):
                        off += 1
                        out.append(w[off:off + n])
                    if off == 0:
                        break
        return out


_INT32_MAX = 2**31 - 1


def vstack(blocks: list[Csr]) -> Csr:
    """The rows of ``blocks`` one after the other (same width)."""
    indptr = [blocks[0].indptr]
    for b in blocks[1:]:
        indptr.append(b.indptr[1:] + indptr[-1][-1])
    return Csr(np.concatenate([b.data for b in blocks]), np.concatenate([b.indices for b in blocks]),
               np.concatenate(indptr), blocks[0].shape[1])


class _Scratch(threading.local):
    """Per-thread buffers of the C kernel, kept between calls (no allocation per request): the output's
    indices and counts, and for each vocabulary two int32 arrays of its size (the document in which each term
    was last seen, and where its count is)."""

    def __init__(self) -> None:
        self.mark: dict[int, np.ndarray] = {}
        self.pos: dict[int, np.ndarray] = {}
        self.doc = 0
        self.indices = np.empty(1 << 16, dtype=np.int32)
        self.counts = np.empty(1 << 16, dtype=np.float64)

    def grow(self, cap: int) -> None:
        if self.indices.size < cap:
            size = 1 << max(16, int(cap - 1).bit_length())
            self.indices = np.empty(size, dtype=np.int32)
            self.counts = np.empty(size, dtype=np.float64)


class NgramCounter:
    """Counts of vocabulary n-grams per document as a CSR matrix (n_docs x n_terms).

    One per vocabulary on a server: all pipelines with that vocabulary share it (and
    its lookup table).
    """

    def __init__(self, terms: np.ndarray, offsets: np.ndarray, attrs: dict[str, Any]) -> None:
        self.an = Analyzer(attrs)
        self.binary = bool(attrs.get("binary", False))
        self.terms = np.ascontiguousarray(terms, dtype="<u4")
        self.offsets = np.ascontiguousarray(offsets, dtype="<i8")
        self.n_terms = len(self.offsets) - 1
        self.lib = native.load() if self.an.kind in ("word", "char") else None
        self._table: int | None = None
        self._dict: dict[str, int] | None = None
        self._scratch = _Scratch()
        self._lock = threading.Lock()
        if self.lib is not None:
            t = self.lib.table_build(self.terms.ctypes.data, self.offsets.ctypes.data, self.n_terms)
            if not t:
                raise MemoryError("n-gram table")
            self._table = t

    @property
    def nbytes(self) -> int:
        """Bytes of the lookup structures beyond the shared parameter arrays."""
        if self._table is not None and self.lib is not None:
            return int(self.lib.table_bytes(self._table))
        return 0

    def close(self) -> None:
        if self._table is not None and self.lib is not None:
            self.lib.table_free(self._table)
            self._table = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _lookup_dict(self) -> dict[str, int]:
        with self._lock:
            if self._dict is None:
                self._dict = {t: i for i, t in enumerate(decode_terms(self.terms, self.offsets))}
            return self._dict

    def __call__(self, docs: Sequence[str]) -> Csr:
        if self._table is not None:
            X = self._native(docs)
        else:
            X = self._python(docs)
        if self.binary:
            X.data.fill(1.0)
        return X

    def _python(self, docs: Sequence[str]) -> Csr:
        vocab = self._lookup_dict()
        indptr: list[int] = [0]
        indices: list[int] = []
        data: list[int] = []
        for d in docs:
            counts: dict[int, int] = {}
            for g in self.an.ngrams(d):
                j = vocab.get(g)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            indices.extend(counts)
            data.extend(counts.values())
            indptr.append(len(indices))
        return Csr(np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int32),
                   np.asarray(indptr, dtype=np.int64), self.n_terms)

    def _buffers(self, n_docs: int) -> tuple[_Scratch, np.ndarray, np.ndarray]:
        s = self._scratch
        key = id(self)
        if key not in s.mark:
            s.mark[key] = np.full(self.n_terms, -1, dtype=np.int32)
            s.pos[key] = np.empty(self.n_terms, dtype=np.int32)
        if s.doc + n_docs >= _INT32_MAX:  # document numbers are int32: start again from 0 with clean marks
            for m in s.mark.values():
                m.fill(-1)
            s.doc = 0
        return s, s.mark[key], s.pos[key]

    def _native(self, docs: Sequence[str]) -> Csr:
        assert self.lib is not None
        an = self.an
        n = len(docs)
        span = an.n_max - an.n_min + 1
        if n > 1 and sum(len(d) for d in docs) * span >= _INT32_MAX:  # positions are int32: in two halves
            return vstack([self._native(docs[: n // 2]), self._native(docs[n // 2:])])
        s, mark, pos = self._buffers(n)
        indptr = np.empty(n + 1, dtype=np.int64)
        if an.kind == "char":
            pre = [_WS.sub(" ", an.preprocess(d)) for d in docs]
            lens = np.fromiter((len(p) for p in pre), dtype=np.int64, count=n)
            doc_off = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lens, out=doc_off[1:])
            buf = np.frombuffer("".join(pre).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            cap = int(doc_off[-1]) * span + 1
            s.grow(cap)
            nnz = self.lib.char_ngrams(self._table, buf.ctypes.data, doc_off.ctypes.data, n, an.n_min, an.n_max,
                                       indptr.ctypes.data, s.indices.ctypes.data, s.counts.ctypes.data, cap,
                                       mark.ctypes.data, pos.ctypes.data, s.doc)
        else:
            toks_all: list[str] = []
            tok_off = np.zeros(n + 1, dtype=np.int64)
            for i, d in enumerate(docs):
                toks_all.extend(an.tokens(an.preprocess(d)))
                tok_off[i + 1] = len(toks_all)
            lens = np.fromiter((len(t) for t in toks_all), dtype=np.int64, count=len(toks_all))
            starts = np.zeros(len(toks_all), dtype=np.int64)
            if len(toks_all) > 1:
                np.cumsum(lens[:-1] + 1, out=starts[1:])
            ends = starts + lens
            buf = np.frombuffer(" ".join(toks_all).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            cap = len(toks_all) * span + 1
            s.grow(cap)
            nnz = self.lib.word_ngrams(self._table, buf.ctypes.data, starts.ctypes.data, ends.ctypes.data,
                                       tok_off.ctypes.data, n, an.n_min, an.n_max, indptr.ctypes.data,
                                       s.indices.ctypes.data, s.counts.ctypes.data, cap, mark.ctypes.data,
                                       pos.ctypes.data, s.doc)
        s.doc += n
        if nnz < 0:  # cannot happen: cap bounds every n-gram of the batch
            raise RuntimeError("n-gram buffer overflow")
        return Csr(s.counts[:nnz].copy(), s.indices[:nnz].copy(), indptr, self.n_terms)


class Hasher:
    """A HashingVectorizer: signed murmur3 of each n-gram, modulo ``n_features``."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.an = Analyzer(attrs)
        self.n_features = int(attrs.get("n_features", 2**20))
        if not 1 <= self.n_features <= 2**31 - 1:
            raise InvalidArgumentError(f"bad n_features {self.n_features}")
        self.alternate_sign = bool(attrs.get("alternate_sign", True))
        self.binary = bool(attrs.get("binary", False))
        self.norm = attrs.get("norm", "l2")
        check_norm(self.norm)
        from sklearn.utils import murmurhash3_32

        self._mm = murmurhash3_32

    def __call__(self, docs: Sequence[str]) -> Csr:
        indptr: list[int] = [0]
        indices: list[int] = []
        data: list[float] = []
        for d in docs:
            for g in self.an.ngrams(d):
                h = int(self._mm(g, seed=0))
                indices.append(abs(h) % self.n_features)
                data.append(-1.0 if (self.alternate_sign and h < 0) else 1.0)
            indptr.append(len(indices))
        X = sp.csr_matrix((np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int32),
                           np.asarray(indptr, dtype=np.int64)), shape=(len(docs), self.n_features))
        X.sum_duplicates()
        X = Csr(X.data, X.indices, X.indptr.astype(np.int64), self.n_features)
        if self.binary:
            X.data.fill(1.0)
        return normalize_rows(X, self.norm)


def check_norm(norm: Any) -> None:
    if norm not in (None, "l1", "l2"):
        raise InvalidArgumentError(f"norm must be null, 'l1' or 'l2', got {norm!r}")


def normalize_rows(X: Csr, norm: str | None) -> Csr:
    """Divide each row by its l1/l2 norm (rows of norm 0 stay as they are), in place."""
    if norm is None or X.nnz == 0:
        return X
    sq = np.abs(X.data) if norm == "l1" else X.data * X.data
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    norms = np.bincount(rows, weights=sq, minlength=X.shape[0])
    if norm == "l2":
        norms = np.sqrt(norms)
    norms[norms == 0.0] = 1.0
    X.data /= norms[rows]
    return X


class Tfidf:
    """scikit-learn's TfidfTransformer: optional sublinear tf, idf weights, row norm."""

    def __init__(self, attrs: dict[str, Any], idf: np.ndarray | None) -> None:
        self.sublinear = bool(attrs.get("sublinear_tf", False))
        self.norm = attrs.get("norm", "l2")
        check_norm(self.norm)
        self.idf = None if idf is None else np.ascontiguousarray(idf, dtype=np.float64)

    def __call__(self, X: Csr) -> Csr:
        if self.idf is not None and self.idf.shape[0] != X.shape[1]:
            raise InvalidArgumentError(f"idf has {self.idf.shape[0]} entries for {X.shape[1]} features")
        if self.sublinear:
            np.log(X.data, out=X.data)
            X.data += 1.0
        if self.idf is not None:
            X.data *= self.idf[X.indices]
        return normalize_rows(X, self.norm)


