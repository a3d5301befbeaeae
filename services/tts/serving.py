"""A Pocket TTS worker's core (the process wiring is `worker.py`): which stream feeds which part.

- `chorus:control`, group "tts": a `start` is taken by one TTS worker, which owns the session for its
  life (`shared.ownership`; taken over by another worker if this one dies). A session is owned whatever
  its voice, so a switch to a cloned voice mid-session has an owner; a native session costs nothing.
- each owned session's control stream: `update` (voice, mode), `stop`, `flush` (`shared.ownership`).
- `chorus:tts:requests`, group "tts": voice state preparation and previews (`previews.py`).
- `chorus:voices:events`, tailed: a deleted profile's cached state is dropped.
- per cloned session, `:dlg` -> `:tts` (`speaker.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.tts.engine import Engine
from services.tts.phraser import PhraseRules
from services.tts.previews import VoiceRequests
from services.tts.settings import TtsSettings
from services.tts.speaker import ClonedSession, SessionServices, SpeechLimits
from services.tts.voice_states import VoiceStates
from shared import metrics
from shared.bus import Bus, Entry, GroupConsumer, tail
from shared.messages import (
    CONTROL,
    TTS,
    TTS_REQUESTS,
    VOICE_EVENTS,
    ControlMessage,
    SessionFlush,
    SessionStart,
    SessionStop,
    SessionUpdate,
)
from shared.ownership import Liveness, SessionOwnership, Takeover, next_seq
from shared.presence import WorkerFields
from shared.retry import keep_running
from shared.sessions import SessionStore
from shared.voice_offer import presence_fields
from shared.voice_profiles import VoiceProfileStore

log = logging.getLogger(__name__)

SERVICE = "tts"
OWNED_PER_SLOT = 8  # sessions a worker owns per synthesis slot, native ones included (a few idle tasks each)
LATE_START_S = 2.0  # a start older than this when taken: its text so far is older than the router's budget


def phrase_rules(settings: TtsSettings) -> PhraseRules:
    return PhraseRules(
        max_words=settings.tts_phrase_max_words,
        first_max_words=settings.tts_phrase_first_max_words,
        min_words_at_comma=settings.tts_phrase_min_words_at_comma,
        pause_frames=settings.tts_pause_frames,
    )


def session_services(
    bus: Bus, settings: TtsSettings, engine: Engine, store: VoiceProfileStore
) -> SessionServices:
    voices = VoiceStates(
        engine, store, capacity=settings.tts_voice_cache_size, prompt_max_s=settings.tts_voice_prompt_max_s
    )
    return SessionServices(
        bus=bus,
        engine=engine,
        voices=voices,
        profiles=store,
        rules=phrase_rules(settings),
        limits=SpeechLimits(
            backlog_phrases=settings.tts_backlog_phrases,
            seconds_per_word=settings.tts_max_seconds_per_word,
            extra_s=settings.tts_phrase_extra_s,
        ),
    )


class TtsWorker:
    def __init__(self, services: SessionServices, settings: TtsSettings) -> None:
        self.s = services
        self.settings = settings
        self.bus = services.bus
        self.sessions: dict[str, ClonedSession] = {}
        self.following = asyncio.Event()  # set once the tails read from fixed cursors (tests wait for it)
        self.session_store = SessionStore(self.bus, settings.session_ttl_s)
        self.ownership = SessionOwnership(
            self.bus,
            self.session_store,
            service=SERVICE,
            group=SERVICE,
            worker_id=settings.worker_id,
            field="tts_worker",
        )
        consumer_options: dict[str, Any] = {
            "claim_idle_ms": settings.claim_idle_ms,
            "max_deliveries": settings.max_deliveries,
        }
        self.control = GroupConsumer(
            self.bus,
            self.bus.names.control,
            SERVICE,
            settings.worker_id,
            CONTROL,
            self.on_start,
            can_take=self.can_take,
            **consumer_options,
        )
        self.requests = VoiceRequests(self.bus, services.engine, services.voices, services.limits)
        self.request_consumer = GroupConsumer(
            self.bus,
            self.bus.names.tts_requests,
            SERVICE,
            settings.worker_id,
            TTS_REQUESTS,
            self.requests.handle,
            **consumer_options,
        )

    def room(self) -> int:
        """Synthesis slots left: sessions speaking through the TTS (a profile's or a catalog voice) take
        one; native ones, owned only so that a switch to such a voice has an owner, take none (they filled
        the slots: a fleet of native sessions left no TTS for the cloned ones)."""
        return max(0, self.settings.tts_max_sessions - self.cloning())

    def cloning(self) -> int:
        """Sessions speaking through the TTS now."""
        return sum(s.cloning for s in self.sessions.values())

    def can_take(self) -> bool:
        """A `start` may be read: a synthesis slot is free, and the sessions owned stay bounded."""
        return self.room() > 0 and len(self.sessions) < OWNED_PER_SLOT * self.settings.tts_max_sessions

    def describe(self) -> WorkerFields:
        return {
            "capacity": self.settings.tts_max_sessions,
            "free_slots": self.room(),
            "cloning": self.cloning(),
            "instances": self.s.engine.instances,
            "model": self.s.engine.version,
            **presence_fields(self.s.engine.can_clone, self.s.engine.catalog.listing()),
        }

    async def warmup(self) -> None:
        """Nothing to build before the first session: the engine is ready once loaded."""

    async def run(self, stop: asyncio.Event) -> None:
        names = self.bus.names
        await self.ownership.set_leftovers_aside()
        voice_events_cursor = await self.bus.last_id(names.voice_events)
        self.following.set()
        own = self.ownership
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.control.run(stop), name="tts-control-group")
                tasks.create_task(self.request_consumer.run(stop), name="tts-requests")
                tasks.create_task(
                    self._follow_voice_events(voice_events_cursor, stop), name="tts-voice-events"
                )
                own.start_loops(
                    tasks,
                    stop,
                    apply=self.apply,
                    sessions=lambda: list(self.sessions),
                    on_over=self._on_over,
                    capacity=self.room,
                    on_takeover=self._on_takeover,
                    check_s=self.settings.session_check_s,
                    poll_s=self.settings.failover_poll_s,
                )
        finally:
            await self._hand_over()

    # --- placement and failover ------------------------------------------------------------------------

    async def on_start(self, message: ControlMessage, entry: Entry) -> None:
        """Take a `start` (the only entries of the shared control stream)."""
        if not isinstance(message, SessionStart) or message.session_id in self.sessions:
            return
        if (start := await self.ownership.admit(message)) is not None:
            await self._serve(start, resumed=False)

    async def _on_takeover(self, takeover: Takeover) -> None:
        await self._serve(takeover.start, resumed=True)

    async def _serve(self, start: SessionStart, *, resumed: bool) -> None:
        sid = start.session_id
        stream = self.bus.names.session_tts(sid)
        session = ClonedSession(
            self.s,
            sid,
            start.owner,
            fence=self.ownership.fence,
            next_seq=await next_seq(self.bus, stream, TTS),
            synthesis_room=self.room,
        )
        self.sessions[sid] = session
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        log.info(
            "session placed",
            extra={
                "session_id": sid,
                "resumed": resumed,
                "voice": start.voice,
                "voice_mode": start.voice_mode,
            },
        )
        # A start taken late (every worker was full meanwhile) reads Moshi's text from now on: from the
        # session's first words it voiced text seconds old before what is said now.
        late = time.time() - start.created_at > LATE_START_S
        if late and not resumed:
            log.warning("session placed late: its earlier text is not voiced", extra={"session_id": sid})
        await session.start(
            start.voice, start.voice_mode, resumed=resumed, from_beginning=not (resumed or late)
        )

    async def end(self, sid: str, reason: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        await session.close(reason)
        await self.ownership.release(sid)
        await self.bus.expire_session(sid)
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        log.info("session ended", extra={"session_id": sid, "reason": reason})

    async def _forget(self, sid: str, why: Liveness) -> None:
        """Let go without a word: another worker owns the session now, or Redis lost it."""
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        await session.close(why.value, announce=False)
        await self.ownership.release(sid)
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        log.warning("session let go: %s", why, extra={"session_id": sid})

    async def _on_over(self, sid: str, liveness: Liveness) -> None:
        if liveness in (Liveness.MOVED, Liveness.GONE):
            await self._forget(sid, liveness)
        else:
            await self.end(sid, liveness.value)

    async def _hand_over(self) -> None:
        """Stopping: the sessions stay owned by this worker, for another one to take over."""
        await self.requests.close()
        for sid in list(self.sessions):
            await self.sessions.pop(sid).close("worker_stopped", announce=False)

    # --- session control ---------------------------------------------------------------------------------

    async def apply(self, message: ControlMessage) -> None:
        session = self.sessions.get(message.session_id)
        if session is None:
            return
        if isinstance(message, SessionStop):
            await self.end(message.session_id, message.reason)
        elif isinstance(message, SessionFlush):
            await session.flush("barge_in")
        elif isinstance(message, SessionUpdate) and (message.voice or message.voice_mode):
            await session.set_voice(message.voice or session.voice, message.voice_mode or session.voice_mode)

    async def _follow_voice_events(self, cursor: str, stop: asyncio.Event) -> None:
        async def loop() -> None:
            nonlocal cursor
            events = tail(self.bus, self.bus.names.voice_events, VOICE_EVENTS, start=cursor, stop=stop)
            async for message, entry in events:
                self.s.voices.forget(message.profile_id)
                for session in list(self.sessions.values()):
                    if session.profile_id == message.profile_id:
                        await session.drop_voice(f"voice profile {message.profile_id} was deleted")
                cursor = entry.entry_id

        await keep_running("voice events", loop, stop)
