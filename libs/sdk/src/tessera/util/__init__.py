"""Utilities over tasks and actors, under Ray's names (``ray.util``): :class:`ActorPool`,
:mod:`tessera.util.queue` (a queue shared by tasks and actors) and :mod:`tessera.util.state` (list and
summarise the cluster's state).

Attributes load on first use, so that ``tessera.util.state`` (which the command line imports) does not
pull in the whole SDK."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tessera.util.actor_pool import ActorPool

__all__ = ["ActorPool"]


def __getattr__(name: str) -> Any:
    if name == "ActorPool":
        from tessera.util.actor_pool import ActorPool

        return ActorPool
    raise AttributeError(f"module 'tessera.util' has no attribute {name!r}")
