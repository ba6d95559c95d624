"""Wiring of the gpu-scheduler service."""

from __future__ import annotations

from tessera.common.config import Settings
from tessera.common.service import ServiceApp

NAME = "gpu-scheduler"


def build(settings: Settings) -> ServiceApp:
    return ServiceApp(NAME, settings)


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
