"""`chorus tts`: wiring only; the core loop lands with its issue."""

from __future__ import annotations

import asyncio

from services.tts.settings import get_settings
from shared.runtime import ServiceRuntime


async def serve(runtime: ServiceRuntime) -> None:
    await runtime.stop.wait()


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime("tts", settings, http_port=settings.tts_http_port or None)
    asyncio.run(runtime.run(serve))
