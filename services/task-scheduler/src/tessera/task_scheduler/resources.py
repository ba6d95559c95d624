"""Resource sets: what a node has and what a task asks for (CPU, GPU, custom)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from tessera.common.errors import InvalidArgumentError

CPU, GPU = "CPU", "GPU"
EPS = 1e-9


def check_request(req: Mapping[str, float], *, what: str = "task") -> dict[str, float]:
    """A validated copy of a resource request; bad amounts raise InvalidArgumentError."""
    out: dict[str, float] = {}
    for name, amount in req.items():
        if not name or len(name) > 128:
            raise InvalidArgumentError(f"{what}: resource names must be 1-128 characters, got {name!r}")
        if not isinstance(amount, int | float) or not math.isfinite(amount) or amount < 0:
            raise InvalidArgumentError(f"{what}: resource {name!r} must be a finite amount >= 0, got {amount!r}")
        if name == GPU and amount > 1 and amount != int(amount):
            raise InvalidArgumentError(f"{what}: more than one GPU must be a whole number, got {amount}")
        if amount > 0:
            out[name] = float(amount)
    return out


def fits(req: Mapping[str, float], avail: Mapping[str, float]) -> bool:
    return all(avail.get(k, 0.0) + EPS >= v for k, v in req.items())


def acquire(req: Mapping[str, float], avail: dict[str, float]) -> None:
    for k, v in req.items():
        avail[k] = avail.get(k, 0.0) - v


def release(req: Mapping[str, float], avail: dict[str, float]) -> None:
    for k, v in req.items():
        avail[k] = avail.get(k, 0.0) + v


def describe(res: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items())) or "nothing"
