"""A conversation as the gateway sees it: placement, user audio in, the router's output out, stop.

Both WebSocket protocols drive a `Conversation`; neither touches Redis directly.

Lifecycle: `start` opens the session (hash, lease, `start` on chorus:control); `wait_ready` waits for a
dialogue slot (up to CHORUS_PLACEMENT_WAIT_S: a full fleet queues new sessions briefly instead of refusing
them at once) and then for the session to be primed; the `LeaseKeeper` renews its lease while the socket
lives; `stop` ends it for every worker, on every exit path, shielded from cancellation and time-bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from services.gateway.leases import LeaseKeeper
from services.gateway.lifetime import Lifetime
from shared import metrics
from shared.audio import FloatAudio, Pcm16Frames, float_to_pcm16
from shared.bus import Bus, SharedReader, SharedWriter
from shared.errors import (
    ChorusError,
    NoCapacity,
    RateLimited,
    ServiceUnavailable,
    SessionLost,
    error_for_code,
)
from shared.messages import (
    OUTPUT,
    EventName,
    Failure,
    OutputMessage,
    PersonaSpec,
    Placement,
    Sampling,
    SessionEvent,
    SessionStart,
    SessionUpdate,
    UserAudio,
    VoiceMode,
)
from shared.ownership import Liveness
from shared.retry import Backoff, is_retryable
from shared.sessions import SessionStore
from shared.transcripts import TranscriptLog

log = logging.getLogger(__name__)
# Observed per output frame: the labelled child looked up once, not on every frame.
_OUT_LAG = metrics.STREAM_LAG.labels(stream_kind="out")

OUTPUT_READ_COUNT = 100
OUTPUT_BLOCK_MS = 200  # how long a read of `:out` waits for entries (then the loop checks the session)
STOP_TIMEOUT_S = 5.0  # ending a session never holds a closing socket (or a shutdown) longer than this
_stopping: set[asyncio.Task[Any]] = set()  # stops that outlive a cancelled caller (shielded)


async def finish_stops(timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Shutting down: let the stops of sockets that were cancelled finish first (the lease ends the rest)."""
    if _stopping:
        await asyncio.wait(set(_stopping), timeout=timeout_s)


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
        reader: SharedReader,
        writer: SharedWriter,
        session_id: str | None = None,
        max_sessions: int = 0,
        lease_s: float = 30.0,
        leases: LeaseKeeper | None = None,
        transcripts: TranscriptLog | None = None,
        max_session_s: float = 0.0,
        idle_timeout_s: float = 0.0,
    ) -> None:
        self.bus = bus
        self.reader = reader  # the gateway's one reader of every session's `:out`
        self.writer = writer  # ... and its one writer of every session's `:in`
        self.owner = owner
        self.persona = persona
        self.voice = voice
        self.voice_mode = voice_mode
        self.session_id = session_id or new_session_id()
        self.store = SessionStore(bus, session_ttl_s)
        self.max_sessions = max_sessions
        self.lease_s = lease_s
        self.leases = leases
        self.transcripts = transcripts
        self.lifetime = Lifetime(max_session_s, idle_timeout_s)  # `outputs` ends the session by it
        self._splitter = Pcm16Frames()
        self._seq = 0
        self._lost: str | None = None  # why the session ended without this gateway (see LeaseKeeper)
        self.served_model: str | None = None  # the Moshi model of the dialogue worker serving it, once ready
        self._input_dropped = 0
        self.started = False
        self.closed = False

    @property
    def log_extra(self) -> dict[str, str]:
        return {"session_id": self.session_id}

    async def start(self) -> None:
        """Open the session: count it against its owner's limit, write its hash and lease, and hand its
        `start` to the workers. A dialogue slot is waited for in `wait_ready`."""
        try:
            described = {"voice": self.voice, "voice_mode": self.voice_mode, "persona_id": self.persona.id}
            live = await self.store.register(self.owner, self.session_id, self.max_sessions, described)
        except RateLimited:
            metrics.SESSIONS_REJECTED.labels(reason="per_key_limit").inc()
            raise
        start = SessionStart(
            session_id=self.session_id,
            owner=self.owner,
            persona=self.persona,
            voice=self.voice,
            voice_mode=self.voice_mode,
        )
        self.started = True  # from here on, `stop` must run: the owner's set holds the session
        metrics.SESSIONS_ACTIVE.labels(service="gateway").inc()
        unrecorded = await self._begin_transcript(live)
        await self.store.open(start, lease_s=self.lease_s, **unrecorded)
        if self.leases is not None:
            self.leases.add(self.session_id, self._on_lost)
        log.info("session started", extra={**self.log_extra, "voice": self.voice, "persona": self.persona.id})

    async def _begin_transcript(self, live: list[str]) -> dict[str, str]:
        """`live`: the owner's live sessions, whose transcripts the quota does not prune. Returns the
        hash field that tells the transcript's readers it could not begin, if it could not."""
        if self.transcripts is None:
            return {}
        try:
            await self.transcripts.begin(
                self.session_id, owner=self.owner, persona_id=self.persona.id, voice=self.voice, live=live
            )
        except OSError:
            # The conversation matters more than its record: go on, loudly (the export says why it has none).
            log.exception("could not store the transcript's header", extra=self.log_extra)
            return {"transcript_error": "storage_failed"}
        return {}

    def _on_lost(self, why: str) -> None:
        self._lost = why

    async def wait_ready(self, placement_wait_s: float, ready_timeout_s: float) -> None:
        """Wait for a dialogue slot (`placement_wait_s`), then for `ready` (`ready_timeout_s` more, the
        priming); NoCapacity with the reason otherwise. A worker's refusal is raised as the error it names
        (`unprocessable`: an adapter it cannot take), NoCapacity when it names none."""
        began = time.monotonic()
        placed_at: float | None = None
        cursor = "0-0"
        while True:
            messages, cursor = await self._read_outputs(cursor)
            for message in messages:
                if _ended_for_want_of_a_lease(message):
                    raise self._lease_lapsed()
                if isinstance(message, SessionEvent):
                    if message.name in (EventName.READY, EventName.RESUMED):
                        self.lifetime.started_at = time.monotonic()  # the maximum length counts from here
                        self._note_placement(message)
                        return
                    if message.name == EventName.ERROR and (refusal := _worker_refusal(message)):
                        raise refusal
                    if message.name in (EventName.NO_CAPACITY, EventName.ERROR, EventName.ENDED):
                        raise NoCapacity(message.detail or f"session refused: {message.name}")
            now = time.monotonic()
            if placed_at is None:
                if await self._placed():
                    placed_at = now
                elif now - began > placement_wait_s:
                    metrics.SESSIONS_REJECTED.labels(reason="no_capacity").inc()
                    raise NoCapacity(f"no dialogue worker had a free slot within {placement_wait_s:g} s")
            elif now - placed_at > ready_timeout_s:
                raise NoCapacity(f"the session was placed but not ready within {ready_timeout_s:g} s")

    def _note_placement(self, message: OutputMessage) -> None:
        """A dialogue worker's `ready` or `resumed` names its model (a TTS worker's names none)."""
        if isinstance(message, SessionEvent) and isinstance(message.data, Placement) and message.data.model:
            self.served_model = message.data.model

    async def _placed(self) -> bool:
        return bool(await self.store.dialogue_worker(self.session_id))

    async def send_audio(self, samples: FloatAudio) -> int:
        """`send_pcm16` of float audio."""
        return await self.send_pcm16(float_to_pcm16(samples))

    async def send_pcm16(self, pcm: bytes) -> int:
        """Cut arbitrary-length 24 kHz PCM16 into 80 ms frames and append them to `:in` (through the
        gateway's `SharedWriter`: with other sessions' frames that arrive meanwhile, in one round trip).
        While Redis is away the frames are dropped (it is live audio: late is as good as lost), counted
        and logged: the writer answers within its `max_wait_s` once a write stalls, so a session's receive
        loop keeps reading its socket (and the client's keepalive pongs) instead of waiting out Redis's
        socket timeout while the client's audio piles up."""
        stream = self.bus.names.session_input(self.session_id)
        frames = [
            (stream, UserAudio(session_id=self.session_id, seq=self._seq + i, pcm=frame))
            for i, frame in enumerate(self._splitter.push(pcm))
        ]
        self._seq += len(frames)
        if not frames:
            return 0
        try:
            await self.writer.append(self.session_id, frames)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            self._input_dropped += len(frames)
            metrics.FRAMES_DROPPED.labels(service="gateway", reason="redis_unavailable").inc(len(frames))
            if self._input_dropped == len(frames):
                log.warning("user audio dropped while Redis is unavailable: %s", exc, extra=self.log_extra)
            return 0
        self._input_dropped = 0
        return len(frames)

    @property
    def frames_sent(self) -> int:
        """80 ms frames of user audio sent so far: the session's audio clock."""
        return self._seq

    def clear_input(self) -> None:
        """Drop a partial frame not yet sent (realtime `input_audio_buffer.clear`)."""
        self._splitter.clear()

    async def outputs(self, start: str = "0-0") -> AsyncIterator[OutputMessage]:
        """The router's output for this session, in order, without repeats. Waits out a short Redis
        outage; raises
        SessionLost when the session ended without this gateway, ServiceUnavailable when Redis stays
        away longer than the session's lease (workers will have ended it by then), and the
        LifetimeReached error of a lifetime policy that ends it (`lifetime.py`)."""
        cursor = start
        backoff = Backoff()
        outage_since: float | None = None
        last_seq = -1  # a router that retried a write it could not confirm may repeat entries
        while True:
            if self._lost is not None:
                raise SessionLost(_LOST_REASONS.get(self._lost, self._lost), reason=self._lost)
            if (reached := self.lifetime.reached(time.monotonic())) is not None:
                raise reached
            try:
                messages, cursor = await self._read_outputs(cursor)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > self.lease_s:
                    raise ServiceUnavailable(f"lost Redis for over {self.lease_s:g} s: {exc}") from exc
                await asyncio.sleep(backoff.next_delay())
                continue
            outage_since = None
            backoff.reset()
            for message in messages:
                if message.seq <= last_seq:
                    continue
                last_seq = message.seq
                if _ended_for_want_of_a_lease(message):
                    raise self._lease_lapsed()
                self.lifetime.observe(message)
                self._note_placement(message)
                _OUT_LAG.observe(max(0.0, time.time() - message.created_at))
                yield message

    def _lease_lapsed(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            "the session ended: this gateway could not renew its lease (Redis was unreachable for longer "
            f"than {self.lease_s:g} s); start a new session"
        )

    async def _read_outputs(self, cursor: str) -> tuple[list[OutputMessage], str]:
        """One blocking read of `:out` after `cursor` (malformed entries are logged and skipped)."""
        messages: list[OutputMessage] = []
        stream = self.bus.names.session_output(self.session_id)
        entries = await self.reader.read(stream, cursor)
        for entry in entries:
            cursor = entry.entry_id
            try:
                messages.append(OUTPUT.decode(entry.fields))
            except ChorusError as exc:
                log.warning("malformed output entry skipped: %s", exc.detail, extra=self.log_extra)
        return messages, cursor

    async def update(
        self,
        *,
        voice: str | None = None,
        voice_mode: VoiceMode | None = None,
        sampling: Sampling | None = None,
        adapter: str | None = None,
    ) -> None:
        if adapter is not None:
            self.persona = self.persona.model_copy(update={"adapter": adapter})
        if voice is not None:
            self.voice = voice
        if voice_mode is not None:
            self.voice_mode = voice_mode
        if self.started:
            # The hash keeps the latest: a worker that takes the session over serves these. Written
            # before the update is sent, so a worker taking the session finds each update in one or the
            # other (it reads the session's control stream from a cursor read before the hash).
            fields: dict[str, str] = {"voice": self.voice, "voice_mode": self.voice_mode}
            if sampling is not None:
                fields["sampling"] = sampling.model_dump_json()
            if adapter is not None:
                fields["adapter"] = adapter
            await self.store.update(self.session_id, **fields)
            await self.bus.append_control(
                SessionUpdate(
                    session_id=self.session_id,
                    voice=voice,
                    voice_mode=voice_mode,
                    sampling=sampling,
                    adapter=adapter,
                )
            )

    async def stop(self, reason: str) -> None:
        """Idempotent: end the session for every worker (frees its dialogue slot). Runs to completion
        even if the caller is cancelled (a shutdown); gives up after STOP_TIMEOUT_S (the lease ends it)."""
        if self.closed:
            return
        self.closed = True
        if self.leases is not None:
            self.leases.discard(self.session_id)
        if not self.started:
            return
        metrics.SESSIONS_ACTIVE.labels(service="gateway").dec()
        metrics.SESSIONS_ENDED.labels(reason=reason).inc()
        task = asyncio.create_task(self._end(reason), name=f"stop-{self.session_id}")
        _stopping.add(task)
        task.add_done_callback(_stopping.discard)
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("could not end the session in time; its lease will", extra=self.log_extra)

    async def _end(self, reason: str) -> None:
        try:
            ended = await self.store.finalize(self.session_id, reason, owner=self.owner)
        except Exception:
            log.exception("could not signal the end of a session; its lease will", extra=self.log_extra)
            ended = None
        if self.transcripts is not None and ended is not None:
            try:
                # Ended by another (a worker: it records the end) or gone (Redis lost it): recorded here
                # unless someone did.
                await self.transcripts.end(self.session_id, reason, unless_ended=not ended)
            except OSError:
                log.exception("could not record the end of the session's transcript", extra=self.log_extra)
        if ended is not None:
            log.info("session stopped", extra={**self.log_extra, "reason": reason})


def _worker_refusal(event: SessionEvent) -> ChorusError | None:
    """A worker's `error` refusing a start as what it says (an adapter it cannot take: `unprocessable`,
    not retryable), where it names a code: the client is told why, not that there was no capacity."""
    code = event.data.code if isinstance(event.data, Failure) else None
    if code is None or code == NoCapacity.code:
        return None
    return error_for_code(code, event.detail or "the dialogue worker refused the session")


def _ended_for_want_of_a_lease(message: OutputMessage) -> bool:
    """`ended` because the workers found the session's lease lapsed: a gateway still reading it failed to
    renew it (Redis away past the lease), not a normal end (protocols.md, "How a session ends")."""
    return (
        isinstance(message, SessionEvent)
        and message.name == EventName.ENDED
        and message.detail == Liveness.LEASE_LAPSED
    )


_LOST_REASONS = {
    "session_lost": "the session's state was lost (Redis restarted); start a new session",
    "ended": "the session was ended by the service",
}
