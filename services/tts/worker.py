"""`chorus tts`: wiring only. The core is `serving.py` (`TtsWorker`), a session's speech `speaker.py`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.tts.engine import Engine
from services.tts.serving import SERVICE, TtsWorker, session_services
from services.tts.settings import TtsSettings, get_settings
from shared.runtime import ServiceRuntime
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfileStore


@contextlib.asynccontextmanager
async def open_tts(runtime: ServiceRuntime, settings: TtsSettings) -> AsyncIterator[TtsWorker]:
    engine = await Engine.load(settings)
    try:
        store = VoiceProfileStore(LocalStorage(settings.data_dir))
        yield TtsWorker(session_services(runtime.bus, settings, engine, store), settings)
    finally:
        engine.close()


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime(
        SERVICE, settings, http_host=settings.tts_http_host, http_port=settings.tts_http_port or None
    )
    asyncio.run(runtime.run(lambda rt: open_tts(rt, settings)))
