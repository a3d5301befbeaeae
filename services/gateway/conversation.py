"""A conversation as the gateway sees it: placement, user audio in, the router's output out, stop.

Both WebSocket protocols drive a `Conversation`; neither touches Redis directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from services.gateway.sessions import export_transcript, register_session, unregister_session
from shared import metrics
from shared.audio import FloatAudio, FrameSplitter, float_to_pcm16
from shared.bus import Bus, tail
from shared.errors import NoCapacity, RateLimited, ServiceUnavailable
from shared.messages import (
    OUTPUT,
    EventName,
    OutputMessage,
    PersonaSpec,
    Sampling,
    SessionEvent,
    SessionStart,
    SessionStop,
    SessionUpdate,
    UserAudio,
    VoiceMode,
)
from shared.presence import list_workers
from shared.sessions import SessionState, SessionStore
from shared.storage import Storage

log = logging.getLogger(__name__)


def new_session_id() -> str:
    return "sess_" + uuid.uuid4().hex[:20]


class Conversation:
    def __init__(
        self,
        bus: Bus,
        *,
        owner: str,
        persona: PersonaSpec,
        voice: str,
        voice_mode: VoiceMode,
        session_ttl_s: int,
        session_id: str | None = None,
        max_sessions: int = 0,
        transcripts: Storage | None = None,
    ) -> None:
        self.bus = bus
        self.owner = owner
        self.persona = persona
        self.voice = voice
        self.voice_mode = voice_mode
        self.session_id = session_id or new_session_id()
        self.store = SessionStore(bus, session_ttl_s)
        self.session_ttl_s = session_ttl_s
        self.max_sessions = max_sessions
        self.transcripts = transcripts
        self._splitter = FrameSplitter()
        self._seq = 0
        self.started = False
        self.closed = False

    @property
    def log_extra(self) -> dict[str, str]:
        return {"session_id": self.session_id}

    async def start(self) -> None:
        """Place the session: fail fast with NoCapacity when no dialogue worker has a free slot."""
        workers = await list_workers(self.bus, "dialogue")
        if not any(w.free_slots > 0 for w in workers):
            raise NoCapacity(
                "no dialogue worker has a free slot; try again shortly", dialogue_workers=len(workers)
            )
        if not await list_workers(self.bus, "router"):
            raise ServiceUnavailable("no router worker is running")
        await self.store.update(
            self.session_id,
            state=SessionState.PLACING,
            owner=self.owner,
            voice=self.voice,
            voice_mode=self.voice_mode,
            persona_id=self.persona.id,
            started_at=time.time(),
        )
        try:
            await register_session(self.bus, self.owner, self.session_id, self.max_sessions)
        except RateLimited:
            await self.store.update(self.session_id, state=SessionState.ENDED, end_reason="limit")
            metrics.SESSIONS_REJECTED.labels(reason="per_key_limit").inc()
            raise
        await self.bus.append_control(
            SessionStart(
                session_id=self.session_id,
                owner=self.owner,
                persona=self.persona,
                voice=self.voice,
                voice_mode=self.voice_mode,
            )
        )
        self.started = True
        metrics.SESSIONS_ACTIVE.labels(service="gateway").inc()
        log.info("session started", extra={**self.log_extra, "voice": self.voice, "persona": self.persona.id})

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait for the dialogue worker's `ready` (forwarded by the router) or a refusal."""
        try:
            async with asyncio.timeout(timeout_s):
                async for message in self.outputs():
                    if isinstance(message, SessionEvent):
                        if message.name in (EventName.READY, EventName.RESUMED):
                            return
                        if message.name in (EventName.NO_CAPACITY, EventName.ERROR, EventName.ENDED):
                            raise NoCapacity(message.detail or f"session refused: {message.name}")
        except TimeoutError:
            raise NoCapacity(f"no dialogue worker took the session within {timeout_s:.0f}s") from None

    async def send_audio(self, samples: FloatAudio) -> int:
        """Cut arbitrary-length 24 kHz audio into 80 ms frames and append them to `:in`."""
        sent = 0
        stream = self.bus.names.session_input(self.session_id)
        for frame in self._splitter.push(samples):
            await self.bus.append(
                stream, UserAudio(session_id=self.session_id, seq=self._seq, pcm=float_to_pcm16(frame))
            )
            self._seq += 1
            sent += 1
        return sent

    @property
    def frames_sent(self) -> int:
        """80 ms frames of user audio sent so far: the session's audio clock."""
        return self._seq

    def clear_input(self) -> None:
        """Drop a partial frame not yet sent (realtime `input_audio_buffer.clear`)."""
        self._splitter.clear()

    async def outputs(self, start: str = "0-0") -> AsyncIterator[OutputMessage]:
        async for message, _ in tail(
            self.bus, self.bus.names.session_output(self.session_id), OUTPUT, start=start, block_ms=200
        ):
            metrics.STREAM_LAG.labels(stream_kind="out").observe(max(0.0, time.time() - message.created_at))
            yield message

    async def update(
        self,
        *,
        voice: str | None = None,
        voice_mode: VoiceMode | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        if voice is not None:
            self.voice = voice
        if voice_mode is not None:
            self.voice_mode = voice_mode
        if self.started:
            await self.bus.append_control(
                SessionUpdate(
                    session_id=self.session_id, voice=voice, voice_mode=voice_mode, sampling=sampling
                )
            )
            await self.store.update(self.session_id, voice=self.voice, voice_mode=self.voice_mode)

    async def stop(self, reason: str) -> None:
        """Idempotent: tell every owner the session is over (frees the dialogue slot) and expire keys."""
        if self.closed:
            return
        self.closed = True
        if not self.started:
            return
        metrics.SESSIONS_ACTIVE.labels(service="gateway").dec()
        try:
            await self.bus.append_control(SessionStop(session_id=self.session_id, reason=reason))
            await self.store.update(
                self.session_id, state=SessionState.ENDED, ended_at=time.time(), end_reason=reason
            )
            await unregister_session(self.bus, self.owner, self.session_id)
            if self.transcripts is not None:
                await export_transcript(self.bus, self.transcripts, self.store, self.session_id)
        except Exception:
            log.exception("could not signal the end of a session", extra=self.log_extra)
        log.info("session stopped", extra={**self.log_extra, "reason": reason})
