"""The idle timeout against the real router's order of output: a natively voiced session's tick is written
to `:out` before the router scores that round's user audio, so the `speech_started` of the tick the user
starts speaking on follows its audio (real Router, real Redis, the gateway's own `Conversation.outputs`
over its `SharedReader`)."""

from __future__ import annotations

import asyncio
import contextlib

from services.gateway.conversation import Conversation
from services.router.routing import Router
from services.router.settings import RouterSettings
from services.router.speech import EnergyGate
from shared.audio import FRAME_SEC
from shared.bus import Bus, SharedReader, SharedWriter
from shared.messages import EventName, OutputAudio, PersonaSpec, SessionEvent
from tests.services.router.test_worker import LOUD_VOICE, Player
from tests.support.sessions import open_session

SID = "idle"


async def test_the_tick_the_user_starts_speaking_on_does_not_end_the_session_for_idleness(bus: Bus) -> None:
    """Idle after 3 quiet frames; two quiet ticks, then the user speaks, detected in the round of the third:
    the gateway, blocked on `:out`, wakes with that tick's audio alone. Counted as quiet on arrival, it
    ended the session while the user spoke (found by attacking the router's order)."""
    router = Router(bus, RouterSettings(worker_id="router-1"), EnergyGate())
    start = await router.ownership.admit(await open_session(bus, SID, voice="moshiko", voice_mode="native"))
    assert start is not None
    await router._open(start, failover=False)
    play = Player(bus, SID)
    reader, stop = SharedReader(bus), asyncio.Event()
    reading = asyncio.create_task(reader.run(stop))
    conversation = Conversation(
        bus,
        owner="o",
        persona=PersonaSpec(),
        voice="moshiko",
        voice_mode="native",
        session_ttl_s=60,
        reader=reader,
        writer=SharedWriter(bus),
        session_id=SID,
        idle_timeout_s=3 * FRAME_SEC - 1e-6,
    )
    seen: list[str] = []

    async def consume() -> None:
        async for message in conversation.outputs():
            seen.append(message.name if isinstance(message, SessionEvent) else type(message).__name__)

    consumer = asyncio.create_task(consume())
    try:
        for _ in range(2):  # two quiet ticks
            await play.dialogue()
            await router.route_once()
        for _ in range(100):
            if seen.count(OutputAudio.__name__) == 2:
                break
            await asyncio.sleep(0.01)
        assert seen.count(OutputAudio.__name__) == 2
        for _ in range(2):
            await play.user(LOUD_VOICE)
        await play.dialogue()  # the third tick: the idle deadline
        await router.route_once()
        for _ in range(100):
            if EventName.SPEECH_STARTED in seen or consumer.done():
                break
            await asyncio.sleep(0.01)
        assert not consumer.done(), f"the session ended ({consumer.exception()!r}); the gateway saw {seen}"
        assert seen[-2:] == [OutputAudio.__name__, EventName.SPEECH_STARTED]
    finally:
        consumer.cancel()
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await reading
