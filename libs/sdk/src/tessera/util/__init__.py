"""Utilities over tasks and actors, under Ray's names (``ray.util``): :class:`ActorPool`, and
:mod:`tessera.util.queue` (a queue shared by tasks and actors)."""

from __future__ import annotations

from tessera.util.actor_pool import ActorPool

__all__ = ["ActorPool"]
