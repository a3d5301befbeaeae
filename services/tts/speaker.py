"""One session's cloned speech: Moshi's text on `:dlg` -> phrases -> Pocket TTS -> 80 ms frames on `:tts`.

Two loops per session: `_read_dialogue` turns dialogue frames into phrases (the `Phraser`) and queues
them (bounded: the oldest is dropped when synthesis falls behind); `_speak_loop` synthesises the queue in
order and appends `ClonedAudio` frames, the phrase's text on its first frame. A flush (barge-in, voice
change) bumps a generation number: queued phrases of an older generation are dropped, the phrase being
synthesised is cancelled and none of its remaining frames is written.

Events on `:tts`: `ready` (placed) or `resumed` (taken over from a dead worker), `phrase_done` (phrase
id, frames, dialogue seq range), `flush`, `error` (the voice cannot be used; the router falls back to
native audio), `ended`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.tts.engine import Engine
from services.tts.phraser import Phrase, Phraser, PhraseRules
from services.tts.voice_states import VoiceStates
from shared import metrics
from shared.audio import FRAME_SAMPLES, FRAME_SEC, FloatAudio, FrameSplitter, float_to_pcm16
from shared.bus import Bus, Fence, tail
from shared.errors import CloningUnavailable, NotFound
from shared.messages import (
    DIALOGUE,
    ClonedAudio,
    EventData,
    EventName,
    Failure,
    Flushed,
    PhraseDone,
    SessionEvent,
    VoiceMode,
    catalog_name_of,
    cloned_profile,
    profile_id_of,
    spoken_by_tts,
)
from shared.retry import is_retryable, keep_running
from shared.runtime import cancel_and_wait
from shared.voice_profiles import VoiceProfileStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechLimits:
    backlog_phrases: int = 8
    seconds_per_word: float = 0.8
    extra_s: float = 1.0

    def max_samples(self, words: int) -> int:
        """Random-weight models (and sometimes real ones) do not end speech by themselves: bound it."""
        frames = math.ceil((words * self.seconds_per_word + self.extra_s) / FRAME_SEC)
        return frames * FRAME_SAMPLES


@dataclass(frozen=True)
class QueuedPhrase:
    phrase: Phrase
    voice: str  # profile:<id> or catalog:<name>
    generation: int
    text_at: float  # when the dialogue service produced the phrase's last piece (unix time)


@dataclass(frozen=True)
class SessionServices:
    """What every session of a worker shares."""

    bus: Bus
    engine: Engine
    voices: VoiceStates
    profiles: VoiceProfileStore
    rules: PhraseRules
    limits: SpeechLimits


class ClonedSession:
    def __init__(
        self,
        services: SessionServices,
        session_id: str,
        owner: str,
        *,
        fence: Fence | None = None,
        next_seq: int = 0,
        synthesis_room: Callable[[], int] = lambda: 1,
    ) -> None:
        self.s = services
        self.synthesis_room = synthesis_room  # the worker's slots left for sessions speaking through the TTS
        self.session_id = session_id
        self.owner = owner
        self.fence = fence  # writes only while this worker owns the session
        self.lost = False  # a write was fenced off: the session moved to another worker
        self.spoken: str | None = None  # the voice the TTS speaks now: profile:<id>, catalog:<name>, None
        self.voice = "moshiko"
        self.voice_mode: VoiceMode = "auto"
        self._phraser = Phraser(services.rules)
        self._backlog: asyncio.Queue[QueuedPhrase] = asyncio.Queue()
        self._generation = 0
        self._cancel: threading.Event | None = None
        self._seq = next_seq
        self._last_dialogue_seq = -1
        self._text_times: dict[int, float] = {}
        self._reader: asyncio.Task[None] | None = None
        self._dialogue_cursor = "0-0"  # the last `:dlg` entry the reader took, or where it starts
        self._speaker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.log_extra = {"session_id": session_id}

    @property
    def cloning(self) -> bool:
        return self.spoken is not None

    @property
    def profile_id(self) -> str | None:
        """The profile it clones (None: a catalog voice, or none)."""
        return cloned_profile(self.spoken, self.voice_mode) if self.spoken is not None else None

    async def start(self, voice: str, voice_mode: VoiceMode, *, resumed: bool, from_beginning: bool) -> None:
        """Serve the session, reading `:dlg` from its first entry or only what comes next (one `resumed`,
        taken over from a dead worker, so nothing is said twice; one taken late); `resumed` says so on
        `:tts`."""
        self._speaker = asyncio.create_task(self._speak_loop(), name=f"tts-speak-{self.session_id}")
        # The router takes either as "this session's TTS is up" (clearing an earlier failure).
        await self._event(EventName.RESUMED if resumed else EventName.READY)
        await self.set_voice(voice, voice_mode, from_beginning=from_beginning)

    async def set_voice(self, voice: str, voice_mode: VoiceMode, *, from_beginning: bool = False) -> None:
        self.voice, self.voice_mode = voice, voice_mode
        spoken = spoken_by_tts(voice, voice_mode)
        if spoken == self.spoken:
            return
        if self.cloning:
            await self.flush("voice_changed")
        if spoken is not None and not self.cloning and self.synthesis_room() <= 0:
            # A native session switching to a TTS voice on a worker whose synthesis slots are all taken:
            # the router plays native and the client is told (`tts_down`); a later switch may find room.
            detail = "no TTS capacity for this voice on the worker serving the session"
            log.warning(detail, extra={**self.log_extra, "tts_voice": spoken})
            await self._event(EventName.ERROR, detail, Failure(code="no_capacity"))
            spoken = None
        elif spoken is not None and (refusal := await self._refusal(spoken)) is not None:
            await self._event(EventName.ERROR, refusal.detail, Failure(code=refusal.code))
            spoken = None
        if spoken is None:
            self.spoken = None
            log.info("session voice", extra={**self.log_extra, "tts_voice": None, "voice_mode": voice_mode})
            await self._stop_reader()
            return
        reading = self._reader is not None and not self._reader.done()  # done: a bug ended it (logged)
        if not reading:  # where to read from, known before the session counts as cloning
            stream = self.s.bus.names.session_dialogue(self.session_id)
            self._dialogue_cursor = "0-0" if from_beginning else await self.s.bus.last_id(stream)
        self.spoken = spoken
        log.info("session voice", extra={**self.log_extra, "tts_voice": spoken, "voice_mode": voice_mode})
        self._spawn(self._warm(spoken))
        if not reading:
            self._reader = asyncio.create_task(self._read_dialogue(), name=f"tts-read-{self.session_id}")

    async def drop_voice(self, detail: str, code: str = "not_found") -> None:
        """The voice became unusable (its profile deleted): stop speaking and tell the router."""
        if self.cloning:
            await self.flush("voice_gone")
            self.spoken = None
            await self._stop_reader()
            await self._event(EventName.ERROR, detail, Failure(code=code))

    async def flush(self, reason: str) -> None:
        """Drop everything not yet spoken: queued phrases, pending words, the phrase being synthesised."""
        self._generation += 1
        dropped = 0
        while not self._backlog.empty():
            self._backlog.get_nowait()
            dropped += 1
        words = self._phraser.clear()
        self._text_times.clear()
        if self._cancel is not None:
            self._cancel.set()
        metrics.TTS_PHRASES_DROPPED.labels(reason="flush").inc(dropped)
        await self._event(
            EventName.FLUSH,
            reason,
            Flushed(
                dropped_phrases=dropped, dropped_words=words, next_phrase_id=self._phraser.next_phrase_id
            ),
        )

    async def close(self, reason: str, *, announce: bool = True) -> None:
        """Stop both loops; `announce`: say so on `:tts` (not when handing the session to another worker)."""
        if self._cancel is not None:
            self._cancel.set()
        await cancel_and_wait(*(t for t in (self._reader, self._speaker, *self._background) if t is not None))
        self._reader = self._speaker = None
        if announce:
            with contextlib.suppress(Exception):
                await self._event(EventName.ENDED, reason)

    # --- reading Moshi's text ------------------------------------------------------------------------

    async def _read_dialogue(self) -> None:
        """Read Moshi's text from `_dialogue_cursor` on. Redis away (a stall past the socket timeout, a
        restart) is waited out and the read goes on from the last entry taken: a reader that died with
        the first timeout left its session silent, or native, for the rest of the conversation."""
        try:
            await keep_running(
                "tts dialogue reader", self._read_dialogue_once, asyncio.Event(), extra=self.log_extra
            )
        except Exception:
            log.exception(
                "the dialogue reader failed: the session's cloned speech stops", extra=self.log_extra
            )
            raise

    async def _read_dialogue_once(self) -> None:
        stream = self.s.bus.names.session_dialogue(self.session_id)
        async for message, entry in tail(
            self.s.bus, stream, DIALOGUE, start=self._dialogue_cursor, block_ms=500
        ):
            self._dialogue_cursor = entry.entry_id
            if isinstance(message, SessionEvent):
                if message.name == EventName.ENDED:
                    self._queue(self._phraser.flush(), message.created_at)
                    return
                if message.name == EventName.RESUMED:
                    # Another dialogue worker took over and may number its frames afresh.
                    self._last_dialogue_seq = -1
                continue
            if message.seq <= self._last_dialogue_seq:
                continue  # a duplicate
            self._last_dialogue_seq = message.seq
            self.on_text(message.seq, message.text, message.created_at)

    def on_text(self, seq: int, text: str, created_at: float) -> None:
        """One dialogue frame's text piece ('' for none), as the dialogue service produced it."""
        if text.strip():
            self._text_times[seq] = created_at
        self._queue(self._phraser.push(seq, text), created_at)

    def _queue(self, phrases: list[Phrase], now: float) -> None:
        for phrase in phrases:
            text_at = self._text_times.get(phrase.last_seq, now)
            self._text_times = {s: t for s, t in self._text_times.items() if s > phrase.last_seq}
            if self.spoken is None:
                continue
            if self._backlog.qsize() >= self.s.limits.backlog_phrases:
                stale = self._backlog.get_nowait()
                metrics.TTS_PHRASES_DROPPED.labels(reason="backlog").inc()
                log.warning(
                    "tts backlog full, dropped the oldest phrase",
                    extra={**self.log_extra, "phrase_id": stale.phrase.phrase_id},
                )
            self._backlog.put_nowait(QueuedPhrase(phrase, self.spoken, self._generation, text_at))

    async def _stop_reader(self) -> None:
        if self._reader is not None:
            await cancel_and_wait(self._reader)
            self._reader = None
        self._phraser.clear()
        self._text_times.clear()

    # --- speaking --------------------------------------------------------------------------------------

    async def _speak_loop(self) -> None:
        while True:
            item = await self._backlog.get()
            if item.generation != self._generation or item.voice != self.spoken:
                continue
            try:
                await self._speak_or_report(item)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                # Redis away mid-phrase: the phrase is lost (its audio could not go out), the loop is not.
                log.warning(
                    "a phrase was lost: Redis unavailable (%s: %s)",
                    type(exc).__name__,
                    exc,
                    extra={**self.log_extra, "phrase_id": item.phrase.phrase_id},
                )

    async def _speak_or_report(self, item: QueuedPhrase) -> None:
        try:
            await self._speak(item)
        except NotFound:
            await self.drop_voice(f"voice {item.voice} not found")
        except CloningUnavailable as exc:
            await self.drop_voice(exc.detail, code=exc.code)
        except Exception as exc:
            if is_retryable(exc):
                raise
            log.exception("synthesis failed", extra={**self.log_extra, "phrase_id": item.phrase.phrase_id})
            await self._event(EventName.ERROR, f"synthesis failed: {exc}", Failure(code="tts_failed"))

    async def _speak(self, item: QueuedPhrase) -> None:
        state = await self.s.voices.for_voice(item.voice)
        cancel = self._cancel = threading.Event()
        splitter = FrameSplitter()
        frames = 0

        async def sink(audio: FloatAudio) -> None:
            nonlocal frames
            for frame in splitter.push(audio):
                if not await self._write(item, frame, first=frames == 0):
                    cancel.set()
                    return
                frames += 1

        await self.s.engine.synthesize(
            state,
            item.phrase.text,
            max_samples=self.s.limits.max_samples(item.phrase.words),
            cancel=cancel,
            sink=sink,
        )
        rest = splitter.flush()
        if rest is not None and await self._write(item, rest, first=frames == 0):
            frames += 1
        if item.generation == self._generation:
            done = PhraseDone(
                phrase_id=item.phrase.phrase_id,
                frames=frames,
                dialogue_seq=(item.phrase.first_seq, item.phrase.last_seq),
            )
            await self._event(EventName.PHRASE_DONE, data=done)

    async def _write(self, item: QueuedPhrase, frame: FloatAudio, *, first: bool) -> bool:
        """Append one frame unless a flush made the phrase stale; False = stop this phrase."""
        if item.generation != self._generation:
            return False
        if first:
            metrics.TTS_FIRST_AUDIO.observe(max(0.0, time.time() - item.text_at))
        return await self._append(
            ClonedAudio(
                session_id=self.session_id,
                seq=self._next_seq(),
                pcm=float_to_pcm16(frame),
                text=item.phrase.text if first else "",
                phrase_id=item.phrase.phrase_id,
            )
        )

    # --- helpers ---------------------------------------------------------------------------------------

    async def _refusal(self, voice: str) -> NotFound | CloningUnavailable | None:
        """Why the session cannot speak in `voice` (None: it can). A catalog voice must be in this
        model's catalog; a profile must exist, belong to the session's owner and have a voice state
        this worker can have (cached, or computed with the cloning weights)."""
        if (name := catalog_name_of(voice)) is not None:
            if name in self.s.engine.catalog:
                return None
            return NotFound(f"no catalog voice {name!r} in this model's catalog")
        profile_id = profile_id_of(voice) or ""
        try:
            owner: str | None = (await self.s.profiles.get(profile_id)).owner
        except NotFound:
            owner = None
        if owner != self.owner:  # another owner's profile is as good as missing
            return NotFound(f"voice profile {profile_id} not found")
        if self.s.engine.can_clone or profile_id in self.s.voices:
            return None
        if await self.s.profiles.load_state(profile_id, self.s.engine.version) is not None:
            return None
        return CloningUnavailable()

    async def _warm(self, voice: str) -> None:
        """Have the voice state ready before the first phrase needs it."""
        try:
            await self.s.voices.for_voice(voice)
        except Exception:
            log.warning("could not prepare the voice state", extra={**self.log_extra, "tts_voice": voice})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, self._seq + 1
        return seq

    async def _event(self, name: EventName, detail: str = "", data: EventData | None = None) -> None:
        await self._append(SessionEvent.of(self.session_id, self._next_seq(), name, detail, data))

    async def _append(self, message: ClonedAudio | SessionEvent) -> bool:
        """One entry on `:tts`, fenced: False once the session has moved to another worker (the worker's
        liveness check then lets it go; nothing more is written for it from here)."""
        if self.lost:
            return False
        stream = self.s.bus.names.session_tts(self.session_id)
        if not await self.s.bus.append_session(self.session_id, [(stream, message)], self.fence):
            self.lost = True
            log.warning("session moved to another worker: not writing for it", extra=self.log_extra)
        return not self.lost
