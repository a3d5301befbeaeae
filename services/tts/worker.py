"""`chorus tts`: a Pocket TTS worker. Wiring: which stream feeds which part.

- `chorus:control`, group "tts": a `start` is taken by one TTS worker, which holds it for the session's
  life (released at `stop`; claimed by another worker if this one dies). A session is held whatever
  its voice, so a switch to a cloned voice mid-session has an owner; a native session costs nothing.
- `chorus:control`, tailed by every worker: `update` (voice, mode), `stop`, `flush` for owned sessions.
- `chorus:tts:requests`, group "tts": voice state preparation and previews (`previews.py`).
- `chorus:voices:events`, tailed: a deleted profile's cached state is dropped.
- per cloned session, `:dlg` -> `:tts` (`speaker.py`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, cast

from services.tts.engine import Engine
from services.tts.phraser import PhraseRules
from services.tts.previews import VoiceRequests
from services.tts.settings import TtsSettings, get_settings
from services.tts.speaker import ClonedSession, SessionServices, SpeechLimits
from services.tts.voice_states import VoiceStates
from shared import metrics
from shared.bus import Bus, Entry, GroupConsumer, Handled, tail
from shared.messages import (
    CONTROL,
    TTS,
    TTS_REQUESTS,
    VOICE_EVENTS,
    VOICE_PATTERN,
    ControlMessage,
    SessionFlush,
    SessionStart,
    SessionStop,
    SessionUpdate,
    VoiceMode,
)
from shared.presence import WorkerFields
from shared.runtime import ServiceRuntime
from shared.sessions import SessionState, SessionStore
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfileStore

log = logging.getLogger(__name__)

SERVICE = "tts"
VOICE_MODES = ("native", "cloned", "auto")


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
        self.held: dict[str, str] = {}
        self.following = asyncio.Event()  # set once the tails read from fixed cursors (tests wait for it)
        self.session_store = SessionStore(self.bus, settings.session_ttl_s)
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
            can_take=lambda: len(self.sessions) < settings.tts_max_sessions,
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

    def describe(self) -> WorkerFields:
        capacity = self.settings.tts_max_sessions
        return {
            "capacity": capacity,
            "free_slots": max(0, capacity - len(self.sessions)),
            "cloning": sum(s.cloning for s in self.sessions.values()),
            "instances": self.s.engine.instances,
            "model": self.s.engine.version,
        }

    async def run(self, stop: asyncio.Event) -> None:
        names = self.bus.names
        control_cursor = await self.bus.last_id(names.control)
        voice_events_cursor = await self.bus.last_id(names.voice_events)
        self.following.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.control.run(stop), name="tts-control-group")
                tasks.create_task(self.request_consumer.run(stop), name="tts-requests")
                tasks.create_task(self._follow_control(control_cursor, stop), name="tts-control-tail")
                tasks.create_task(
                    self._follow_voice_events(voice_events_cursor, stop), name="tts-voice-events"
                )
                tasks.create_task(self._check_sessions(stop), name="tts-session-check")
        finally:
            await self._hand_over()

    # --- placement -------------------------------------------------------------------------------------

    async def on_start(self, message: ControlMessage, entry: Entry) -> str:
        """Take a `start` (hold it while serving); other control entries are the tail's business."""
        if not isinstance(message, SessionStart):
            return Handled.ACK
        sid = message.session_id
        if sid in self.sessions:
            return Handled.HOLD if self.held.get(sid) == entry.entry_id else Handled.ACK
        info = await self.session_store.get(sid)
        if not info or info.get("state") == SessionState.ENDED:
            return Handled.ACK  # over before we got to it (or long gone: an old entry)
        previous = info.get("tts_worker", "")
        resumed = previous not in ("", self.settings.worker_id)
        await self.session_store.update(sid, tts_worker=self.settings.worker_id)
        session = ClonedSession(self.s, sid, message.owner, next_seq=await self._next_tts_seq(sid))
        self.sessions[sid] = session
        self.held[sid] = entry.entry_id
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        voice, mode = _current_voice(info, message)
        log.info(
            "session placed",
            extra={"session_id": sid, "resumed": resumed, "voice": voice, "voice_mode": mode},
        )
        await session.start(voice, mode, resumed=resumed)
        return Handled.HOLD

    async def _next_tts_seq(self, sid: str) -> int:
        """Continue the `:tts` seq where a previous owner stopped (consumers drop repeated seqs)."""
        stream = self.bus.names.session_tts(sid)
        last = await self.bus.last_id(stream)
        if last == "0-0":
            return 0
        entries = await self.bus.range(stream, last, last)
        return TTS.decode(entries[0].fields).seq + 1 if entries else 0

    async def end(self, sid: str, reason: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        await session.close(reason)
        entry_id = self.held.pop(sid, None)
        if entry_id is not None:
            await self.control.release(entry_id)
        await self.bus.expire_session(sid, self.settings.session_ttl_s)
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        log.info("session ended", extra={"session_id": sid, "reason": reason})

    async def _hand_over(self) -> None:
        """Stopping: leave the held starts pending, so another TTS worker claims these sessions."""
        await self.requests.close()
        for sid in list(self.sessions):
            await self.sessions.pop(sid).close("worker_stopped", announce=False)

    # --- control fan-out ---------------------------------------------------------------------------------

    async def _follow_control(self, cursor: str, stop: asyncio.Event) -> None:
        async for message, _ in tail(self.bus, self.bus.names.control, CONTROL, start=cursor, stop=stop):
            if message.session_id not in self.sessions:
                continue
            try:
                await self.apply(message)
            except Exception:
                log.exception("control message failed", extra={"session_id": message.session_id})

    async def apply(self, message: ControlMessage) -> None:
        session = self.sessions[message.session_id]
        if isinstance(message, SessionStop):
            await self.end(message.session_id, message.reason)
        elif isinstance(message, SessionFlush):
            await session.flush("barge_in")
        elif isinstance(message, SessionUpdate) and (message.voice or message.voice_mode):
            await session.set_voice(message.voice or session.voice, message.voice_mode or session.voice_mode)

    async def _follow_voice_events(self, cursor: str, stop: asyncio.Event) -> None:
        events = tail(self.bus, self.bus.names.voice_events, VOICE_EVENTS, start=cursor, stop=stop)
        async for message, _ in events:
            self.s.voices.forget(message.profile_id)
            for session in list(self.sessions.values()):
                if session.profile_id == message.profile_id:
                    await session.drop_voice(f"voice profile {message.profile_id} was deleted")

    async def _check_sessions(self, stop: asyncio.Event) -> None:
        """End sessions whose stop we never saw (the gateway died): their hash says ended, or is gone."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.settings.tts_session_check_s):
                    await stop.wait()
            except TimeoutError:
                pass
            for sid in list(self.sessions):
                info = await self.session_store.get(sid)
                if not info or info.get("state") == SessionState.ENDED:
                    await self.end(sid, "session_gone")


def _current_voice(info: dict[str, str], start: SessionStart) -> tuple[str, VoiceMode]:
    """The session hash holds the latest voice (an update may have raced the start); else the start's."""
    voice = info.get("voice", "")
    mode = info.get("voice_mode", "")
    return (
        voice if re.match(VOICE_PATTERN, voice) else start.voice,
        cast(VoiceMode, mode) if mode in VOICE_MODES else start.voice_mode,
    )


async def serve(runtime: ServiceRuntime, settings: TtsSettings) -> None:
    engine = await Engine.load(settings)
    store = VoiceProfileStore(LocalStorage(settings.data_dir))
    worker = TtsWorker(session_services(runtime.bus, settings, engine, store), settings)
    if runtime.presence is not None:  # the heartbeat already runs: from now on it carries our fields
        runtime.presence.describe = worker.describe
    try:
        await worker.run(runtime.stop)
    finally:
        engine.close()


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime(SERVICE, settings, http_port=settings.tts_http_port or None)
    asyncio.run(runtime.run(lambda rt: serve(rt, settings)))
