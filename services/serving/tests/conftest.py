"""Shared data of the serving tests: small real text and tabular sets made in-process."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.serving.engine import Engine
from tessera.serving.ir import Pipeline

WORDS = ("good great awful bad service food slow quick friendly rude cheap pricey clean dirty tasty bland "
         "café naïve loved hated again never always staff room view noisy quiet").split()


@pytest.fixture(scope="session")
def texts() -> tuple[list[str], np.ndarray]:
    """400 short reviews (with accents, punctuation, repeated spaces) and a 3-class label."""
    rng = np.random.default_rng(7)
    docs, labels = [], []
    for i in range(400):
        words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
        sep = "  " if i % 7 == 0 else " "
        doc = sep.join(words) + ("!" if i % 3 else ".")
        docs.append(doc.upper() if i % 11 == 0 else doc)
        score = sum(1 for w in words if w in ("good", "great", "loved", "friendly", "tasty", "clean"))
        score -= sum(1 for w in words if w in ("awful", "bad", "hated", "rude", "dirty", "bland"))
        labels.append("pos" if score > 0 else "neg" if score < 0 else "mixed")
    return docs, np.asarray(labels)


@pytest.fixture(scope="session")
def tabular() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """300 rows: 4 numeric columns and a categorical one (as object array), a target and a class."""
    rng = np.random.default_rng(3)
    num = rng.normal(size=(300, 4)) * [1.0, 10.0, 0.1, 3.0] + [0.0, 50.0, 1.0, -2.0]
    cat = rng.choice(["red", "green", "blue"], size=300)
    X = np.empty((300, 5), dtype=object)
    X[:, :4] = num
    X[:, 4] = cat
    y = num @ [1.5, -0.2, 3.0, 0.5] + (cat == "red") * 2.0 + rng.normal(scale=0.1, size=300)
    cls = np.where(y > np.median(y), "high", "low")
    return X, y, cls


def serve(pipe: Pipeline, name: str = "p", engine: Engine | None = None, **kw: object) -> Engine:
    e = engine or Engine()
    for h, a in pipe.params.items():
        e.store.put(h, a)
    e.register(name, pipe.graph, **kw)  # type: ignore[arg-type]
    return e
