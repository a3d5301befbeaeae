"""`chorus dialogue`: wiring only. The core is `serving.py` (`DialogueWorker`), the batch `batcher.py`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.dialogue.model import load_moshi
from services.dialogue.serving import SERVICE, DialogueWorker
from services.dialogue.settings import DialogueSettings, get_settings
from shared.runtime import ServiceRuntime


@contextlib.asynccontextmanager
async def open_dialogue(runtime: ServiceRuntime, settings: DialogueSettings) -> AsyncIterator[DialogueWorker]:
    """Load the model off the event loop (the heartbeats say `loading` meanwhile). The worker beats its
    presence at once when a slot is taken or freed: placement sees it now."""
    model = await asyncio.to_thread(load_moshi, settings)
    yield DialogueWorker(runtime.bus, settings, model, runtime.presence)


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime(
        SERVICE,
        settings,
        http_host=settings.dialogue_http_host,
        http_port=settings.dialogue_http_port or None,
        loading={"capacity": settings.dialogue_capacity, "free_slots": 0},
    )
    asyncio.run(runtime.run(lambda rt: open_dialogue(rt, settings)))
