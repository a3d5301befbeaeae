"""`chorus dialogue`: wiring only; the core loop lands with its issue."""

from __future__ import annotations

import asyncio

from services.dialogue.settings import get_settings
from shared.runtime import ServiceRuntime


async def serve(runtime: ServiceRuntime) -> None:
    await runtime.stop.wait()


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime("dialogue", settings, http_port=settings.dialogue_http_port or None)
    asyncio.run(runtime.run(serve))
