"""Requests from the gateway on `chorus:tts:requests` (consumer group "tts": one worker takes each).

- `prepare`: compute and cache a new profile's voice state now, so its first session starts quickly.
- `preview`: speak a text in a profile's voice or a catalog voice; the whole audio goes back on
  `chorus:tts:reply:{id}`, which expires by itself if the gateway has given up.

Requests are acked when taken and served as tasks (a preview takes seconds; the loop keeps reading).
A request past its deadline is dropped: nobody waits for its answer any more. A preview checks again once
a model instance is free for it (a busy worker can keep it waiting for seconds), so stale previews never
take synthesis time from fresh ones (`chorus_tts_requests_dropped_total`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np

from services.tts.engine import DeadlinePassed, Engine
from services.tts.speaker import SpeechLimits
from services.tts.voice_states import VoiceStates
from shared import metrics
from shared.audio import FloatAudio, float_to_pcm16
from shared.bus import Bus, Entry
from shared.errors import ChorusError, NotFound
from shared.messages import TtsRequest, VoicePrepare, VoicePreview, VoicePreviewReply
from shared.preview_replies import PreviewReplies
from shared.runtime import cancel_and_wait

log = logging.getLogger(__name__)


class VoiceRequests:
    def __init__(self, bus: Bus, engine: Engine, voices: VoiceStates, limits: SpeechLimits) -> None:
        self.bus = bus
        self.engine = engine
        self.voices = voices
        self.limits = limits
        self.replies = PreviewReplies(bus)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def handle(self, message: TtsRequest, entry: Entry) -> None:
        if message.is_stale():
            log.info("dropped a stale request", extra={"request_id": message.session_id})
            metrics.TTS_REQUESTS_DROPPED.labels(kind=message.type, waited="queue").inc()
            return
        task = asyncio.create_task(self._serve(message), name=f"tts-request-{message.session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)

    async def _serve(self, message: TtsRequest) -> None:
        if isinstance(message, VoicePrepare):
            try:
                await self.voices.get(message.profile_id)
            except NotFound:
                log.info("prepare for a profile that is gone", extra={"profile_id": message.profile_id})
            except ChorusError as exc:  # no cloning weights: the gateway refuses uploads it knows of
                log.warning(
                    "could not prepare a voice state: %s", exc, extra={"profile_id": message.profile_id}
                )
            except Exception:
                log.exception("could not prepare a voice state", extra={"profile_id": message.profile_id})
            return
        await self._preview(message)

    async def _preview(self, request: VoicePreview) -> None:
        try:
            reply = VoicePreviewReply(session_id=request.session_id, pcm=await self.speak(request))
        except DeadlinePassed as exc:
            # The gateway gave up waiting (504): an answer now would only expire unread.
            log.info(
                "dropped a stale preview after waiting for a model instance: %s",
                exc,
                extra={"request_id": request.session_id, "voice": request.spoken_voice},
            )
            metrics.TTS_REQUESTS_DROPPED.labels(kind=request.type, waited="model").inc()
            return
        except ChorusError as exc:
            reply = VoicePreviewReply(session_id=request.session_id, error_code=exc.code, error=exc.detail)
        except Exception as exc:
            log.exception("preview failed", extra={"request_id": request.session_id})
            reply = VoicePreviewReply(
                session_id=request.session_id, error_code="internal_error", error=str(exc)
            )
        await self.replies.send(reply)

    async def speak(self, request: VoicePreview) -> bytes:
        """The whole text in the profile's (or catalog) voice, as PCM16."""
        state = await self.voices.for_voice(request.spoken_voice)
        chunks: list[FloatAudio] = []

        async def collect(audio: FloatAudio) -> None:
            chunks.append(audio)

        words = max(1, len(request.text.split()))
        await self.engine.synthesize(
            state,
            request.text,
            max_samples=self.limits.max_samples(words),
            cancel=threading.Event(),
            sink=collect,
            deadline=request.deadline,
        )
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return float_to_pcm16(audio)
