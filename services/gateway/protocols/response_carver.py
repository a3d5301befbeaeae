"""Realtime responses carved out of Moshi's continuous speech: the conversation's output in, the OpenAI
Realtime server events to send out. No I/O and no clock: time is the output's own frames, so a test plays
it frame by frame.

Moshi is full duplex and never says "my answer is over", so a response is a stretch of its speech: it
opens on a text piece after silence (`response.created`) and closes after `end_frames` frames with
neither text nor audible audio (the audio and transcript `done` events, then `response.done`). Audio
between the two is sent as deltas of the open response; audio outside one is not sent. A cancelled
response closes at once and the rest of that utterance is muted: nothing is sent until Moshi has been
quiet for `end_frames` frames again.

Each response's item goes into the conversation's items (`realtime_items`) when it opens, with the time of
each text piece in its audio, so `truncate` can keep only what the user heard.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.realtime_items import ConversationItems, Item
from shared.audio import SAMPLE_RATE
from shared.messages import EventName, OutputAudio, OutputMessage, OutputText, SessionEvent

AUDIBLE_DBFS = -50.0  # below this a frame counts as silence when deciding that a response is over
# AUDIBLE_DBFS as a mean square of PCM16 samples: (10^(dBFS / 20) * 32768)^2.
_AUDIBLE_MEAN_SQUARE = (10 ** (AUDIBLE_DBFS / 20) * 32768) ** 2


def audible(pcm: bytes) -> bool:
    """Whether a PCM16 frame is louder than AUDIBLE_DBFS: `rms_dbfs(pcm16_to_float(pcm)) > AUDIBLE_DBFS`
    without the float conversion, the root or the logarithm (~2 µs a frame, not ~10). The sum of squares
    is exact in float64 (1920 samples of at most 2^30 each)."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.dot(samples, samples)) > _AUDIBLE_MEAN_SQUARE * len(samples)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class _Response:
    """The response being spoken: its one output item, with the transcript so far."""

    response: ev.ResponseObject = field(default_factory=lambda: ev.ResponseObject(id=new_id("resp")))
    item: Item = field(default_factory=lambda: Item(new_id("item"), "assistant", "in_progress"))
    previous_item_id: str | None = None

    @property
    def item_id(self) -> str:
        return self.item.id


class ResponseCarver:
    def __init__(self, end_frames: int, items: ConversationItems | None = None) -> None:
        self.end_frames = end_frames
        self.items = items if items is not None else ConversationItems()
        self._response: _Response | None = None
        self._quiet_frames = 0
        self._muted_until_quiet = False
        self._speech_item = ""  # the user's current utterance (speech_started ... speech_stopped)

    @property
    def responding(self) -> bool:
        return self._response is not None

    @property
    def response_id(self) -> str | None:
        return self._response.response.id if self._response is not None else None

    def speaking(self) -> tuple[Item, str | None]:
        """The item of the response in progress, and the id of the item before it."""
        assert self._response is not None
        return self._response.item, self._response.previous_item_id

    def on_output(self, message: OutputMessage, heard_ms: int) -> list[ev.ServerEvent]:
        """The events one output message makes; `heard_ms` is how much user audio was sent so far (the
        time speech events carry). The conversation's `ended` is the caller's to act on."""
        if isinstance(message, OutputText):
            return self.on_text(message.text)
        if isinstance(message, OutputAudio):
            return self.on_audio(message.pcm)
        return self.on_event(message, heard_ms)

    def on_text(self, text: str) -> list[ev.ServerEvent]:
        self._quiet_frames = 0
        if self._muted_until_quiet:
            return []
        events: list[ev.ServerEvent] = []
        if self._response is None:
            events.append(self._open())
        assert self._response is not None
        self._response.item.record(text)
        events.append(
            ev.OutputAudioTranscriptDelta(
                response_id=self._response.response.id, item_id=self._response.item_id, delta=text
            )
        )
        return events

    def on_audio(self, pcm: bytes) -> list[ev.ServerEvent]:
        """An audio frame: a delta of the open response, unless it is the quiet frame that closes it."""
        self._quiet_frames = 0 if audible(pcm) else self._quiet_frames + 1
        events: list[ev.ServerEvent] = []
        if self._quiet_frames >= self.end_frames:
            self._muted_until_quiet = False
            events += self._close("completed")
        if self._response is not None and not self._muted_until_quiet:
            self._response.item.audio_ms += len(pcm) * 1000 // (2 * SAMPLE_RATE)
            events.append(
                ev.OutputAudioDelta(
                    response_id=self._response.response.id,
                    item_id=self._response.item_id,
                    delta=ev.encode_audio(pcm),
                )
            )
        return events

    def on_event(self, event: SessionEvent, heard_ms: int) -> list[ev.ServerEvent]:
        if event.name == EventName.SPEECH_STARTED:
            self._speech_item = new_id("item")
            return [ev.SpeechStarted(audio_start_ms=heard_ms, item_id=self._speech_item)]
        if event.name == EventName.SPEECH_STOPPED:
            return [ev.SpeechStopped(audio_end_ms=heard_ms, item_id=self._speech_item or new_id("item"))]
        if event.name == EventName.ENDED:
            return []
        if event.name == EventName.ERROR:
            detail = ev.ErrorDetail(code="session_error", message=event.detail or "session error")
            return [ev.ErrorEvent(error=detail)]
        return [ev.ChorusEvent(name=event.name, detail=event.detail, data=event.data.model_dump(mode="json"))]

    def cancel(self) -> list[ev.ServerEvent]:
        """`response.cancel`: the open response ends now, and the rest of its utterance is not sent."""
        if self._response is None:
            return []
        self._muted_until_quiet = True
        return self._close("cancelled")

    def truncate(self, item_id: str, content_index: int, audio_end_ms: int) -> list[ev.ServerEvent]:
        """`conversation.item.truncate`: the item's transcript keeps what came before `audio_end_ms`. The
        response still speaking that item is cancelled first (the user interrupted it); a truncation refused
        leaves the response as it was."""
        item = self.items.get(item_id)
        item.check_truncate(content_index, audio_end_ms)
        events = self.cancel() if self._response is not None and self._response.item is item else []
        item.truncate(content_index, audio_end_ms)
        return [
            *events,
            ev.ConversationItemTruncated(
                item_id=item_id, content_index=content_index, audio_end_ms=audio_end_ms
            ),
        ]

    def finish(self) -> list[ev.ServerEvent]:
        """The conversation's output ended: an open response is complete."""
        return self._close("completed")

    def _open(self) -> ev.ServerEvent:
        self._response = _Response()
        self._response.previous_item_id = self.items.add(self._response.item)
        return ev.ResponseCreated(response=self._response.response)

    def _close(self, status: str) -> list[ev.ServerEvent]:
        if self._response is None:
            return []
        response, self._response = self._response, None
        response_id, item_id = response.response.id, response.item_id
        response.item.status = "completed" if status == "completed" else "incomplete"
        transcript = response.item.transcript
        done = response.response.model_copy(update={"status": status, "output": [response.item.wire()]})
        return [
            ev.OutputAudioDone(response_id=response_id, item_id=item_id),
            ev.OutputAudioTranscriptDone(response_id=response_id, item_id=item_id, transcript=transcript),
            ev.ResponseDone(response=done),
        ]
