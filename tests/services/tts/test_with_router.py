"""The TTS worker and the router together through a real redis-server: what the router expects of `:tts`
(phrase text on the first frame, a `flush` event after a barge-in) holds with the real worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from services.router.routing import Router
from services.router.settings import RouterSettings
from services.router.speech import EnergyGate
from services.tts.engine import Engine
from shared.audio import FRAME_SAMPLES, silence_frame
from shared.bus import Bus
from shared.messages import (
    OUTPUT,
    DialogueFrame,
    EventName,
    OutputAudio,
    OutputMessage,
    SessionEvent,
    UserAudio,
)
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfileStore
from tests.support.sessions import open_session
from tests.support.tts import (
    SPEECH,
    add_profile,
    events,
    running_worker,
    tts_entries,
    tts_settings,
)
from tests.support.waiting import wait_until

SID = "s1"
USER_SPEAKING = (np.sin(np.arange(FRAME_SAMPLES) / 3) * 12000).astype("<i2").tobytes()


@contextlib.asynccontextmanager
async def running_router(bus: Bus) -> AsyncIterator[Router]:
    settings = RouterSettings(worker_id="router-1", router_tts_check_frames=1, session_ttl_s=60)
    # The energy detector: the loud tone below is "speech" to it, and the test stays about the contract.
    router = Router(bus, settings, EnergyGate())
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    try:
        yield router
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def output(bus: Bus) -> list[OutputMessage]:
    return [OUTPUT.decode(e.fields) for e in await bus.range(bus.names.session_output(SID))]


async def test_the_router_plays_the_workers_cloned_phrases_and_a_barge_in_flushes_the_worker(
    bus: Bus, tts_checkpoint: Path, tmp_path: Path, redis_url: str, key_prefix: str, tts_engine: Engine
) -> None:
    # Long phrases (2 s a word): the worker writes frames far faster than the router plays them (one per
    # dialogue tick), so cloned audio is still queued when the user starts speaking.
    settings = tts_settings(
        tts_checkpoint, tmp_path / "data", redis_url, key_prefix, tts_max_seconds_per_word=2.0
    )
    profile = await add_profile(VoiceProfileStore(LocalStorage(settings.data_dir)), SPEECH)
    dialogue_seq = user_seq = 0

    async def tick(text: str = "") -> None:
        nonlocal dialogue_seq
        frame = DialogueFrame(session_id=SID, seq=dialogue_seq, text=text, pcm=silence_frame())
        await bus.append(bus.names.session_dialogue(SID), frame)
        dialogue_seq += 1

    async with running_worker(bus, settings, tts_engine), running_router(bus) as router:
        await open_session(bus, SID, voice=profile.voice, voice_mode="cloned")
        for piece in (" Hello", " there", "."):
            await tick(piece)

        async def cloned_speech() -> list[OutputAudio] | None:
            await tick()  # the dialogue clock: the router plays one frame per tick
            played = [m for m in await output(bus) if isinstance(m, OutputAudio) and m.source == "cloned"]
            return played if any(np.frombuffer(m.pcm, "<i2").any() for m in played) else None

        await wait_until(cloned_speech, "cloned speech on :out")

        async def queued_at_the_router() -> bool:
            """The precondition of a barge-in: cloned frames the router holds, not played yet (the dialogue
            clock has stopped, so it plays none meanwhile). On a loaded machine the TTS may lag behind."""
            return router.sessions[SID].mixer.queued_frames > 0

        await wait_until(queued_at_the_router, "cloned audio queued at the router")

        async def flushed() -> list[object] | None:
            nonlocal user_seq
            user_seq += 1
            frame = UserAudio(session_id=SID, seq=user_seq, pcm=USER_SPEAKING)
            await bus.append(bus.names.session_input(SID), frame)
            return events(await tts_entries(bus, SID), EventName.FLUSH) or None  # type: ignore[return-value]

        (flush,) = await wait_until(flushed, "the worker's flush after the barge-in")
    assert flush.detail == "barge_in"
    out = await output(bus)
    assert any(isinstance(m, SessionEvent) and m.name == EventName.SPEECH_STARTED for m in out)
