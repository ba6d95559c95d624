"""Wiring of the serving service."""

from __future__ import annotations

from tessera.common.config import Settings
from tessera.common.service import ServiceApp

NAME = "serving"


def build(settings: Settings) -> ServiceApp:
    return ServiceApp(NAME, settings)


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
