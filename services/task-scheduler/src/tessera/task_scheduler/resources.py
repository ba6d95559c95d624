"""Resource sets: what a node has and what a task asks for (CPU, GPU, custom)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

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
    for k, v in req.items():  # a plain loop: called for each queued task a node agent looks at
        if avail.get(k, 0.0) + EPS < v:
            return False
    return True


def acquire(req: Mapping[str, float], avail: dict[str, float]) -> None:
    for k, v in req.items():
        avail[k] = avail.get(k, 0.0) - v


def release(req: Mapping[str, float], avail: dict[str, float]) -> None:
    for k, v in req.items():
        avail[k] = avail.get(k, 0.0) + v


def describe(res: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items())) or "nothing"


def missing(req: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> list[str]:
    """The resources of ``req`` that no node of ``nodes`` (their totals) has enough of, alone."""
    totals = list(nodes)
    return [k for k, v in sorted(req.items()) if not any(t.get(k, 0.0) + EPS >= v for t in totals)]


def largest(req: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The totals of the node that comes closest to ``req``: the most of the first resource no node has
    enough of, then the most CPUs (the node a user would look at to see why ``req`` cannot run)."""
    totals = list(nodes)
    if not totals:
        return {}
    short = missing(req, totals)
    key = short[0] if short else CPU
    best: Mapping[str, float] = max(totals, key=lambda t: (t.get(key, 0.0), t.get(CPU, 0.0), sum(t.values())))
    return dict(best)


def infeasible_message(name: str, req: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> str:
    """Why ``req`` can never run on a cluster whose nodes have ``nodes`` (their totals)."""
    totals = list(nodes)
    short = missing(req, totals) or sorted(req)
    what = ", ".join(f"{k}={req[k]:g}" for k in short)
    return (f"{name} needs {describe(req)}, and no node of the cluster can ever offer {what} "
            f"(the largest of its {len(totals)} node(s) has {describe(largest(req, totals))})")


class GpuSlots:
    """Which GPU ids the tasks and actors of a node hold, as Ray assigns them: a request of one GPU or
    more takes that many whole, free GPUs; a fraction takes a share of one GPU, packed onto the GPU with
    the least share left that still fits it (two tasks of 0.5 share one id)."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.free: dict[str, float] = dict.fromkeys(ids, 1.0)

    def assign(self, amount: float) -> tuple[str, ...] | None:
        """The ids for ``amount`` GPUs, now taken; () for none asked; None if the free shares cannot hold it."""
        if amount <= EPS:
            return ()
        if amount >= 1.0 - EPS:
            whole = [i for i, share in self.free.items() if share >= 1.0 - EPS][: int(round(amount))]
            if len(whole) < int(round(amount)):
                return None
            for i in whole:
                self.free[i] = 0.0
            return tuple(whole)
        fits_in = [(share, n, i) for n, (i, share) in enumerate(self.free.items()) if share + EPS >= amount]
        if not fits_in:
            return None
        _, _, best = min(fits_in)
        self.free[best] -= amount
        return (best,)

    def release(self, ids: Sequence[str], amount: float) -> None:
        """Give back what :meth:`assign` returned for ``amount``."""
        share = 1.0 if amount >= 1.0 - EPS else amount
        for i in ids:
            if i in self.free:
                self.free[i] = min(1.0, self.free[i] + share)


def gpu_ids(count: float, visible: str | None) -> list[str]:
    """The ids of a node's ``count`` GPUs: the first ``count`` of ``CUDA_VISIBLE_DEVICES`` when the node
    process was given one (its devices keep their names), else 0 .. count-1."""
    n = int(count)
    named = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if len(named) >= n:
        return named[:n]
    return [str(i) for i in range(n)]
