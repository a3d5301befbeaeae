"""OpenAI Realtime API events, as far as Chorus speaks them: one pydantic model per event, `type`
fixed by a Literal, discriminated unions at the bottom. Field names follow the official SDK's types so
its client parses them. Chorus-only additions are prefixed `chorus.` (ours, not part of the OpenAI API).

Both the GA `session.update` shape (`session.type = "realtime"`, `session.audio.output.voice`,
`session.audio.input.format`) and the older beta shape (`session.voice`, `input_audio_format`) are
accepted; `SessionConfig.voice()` / `.input_format_ok()` hide the difference.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.messages import PRIMER_MAX_CHARS


def event_id() -> str:
    return "event_" + uuid.uuid4().hex[:20]


# --- client -> server -------------------------------------------------------------------------------


class _Lenient(BaseModel):
    # Clients send many fields Chorus has no use for (tools, turn_detection, ...): accept and ignore them.
    model_config = ConfigDict(extra="allow")


class AudioFormat(_Lenient):
    type: str | None = None
    rate: int | None = None


class AudioInput(_Lenient):
    format: AudioFormat | None = None


class AudioOutput(_Lenient):
    voice: str | None = None
    format: AudioFormat | None = None


class AudioConfig(_Lenient):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class SessionConfig(_Lenient):
    type: str | None = None
    instructions: str | None = Field(default=None, max_length=PRIMER_MAX_CHARS)  # the persona primer
    audio: AudioConfig | None = None
    # beta shape
    voice: str | None = None
    input_audio_format: str | None = None
    output_audio_format: str | None = None
    temperature: float | None = None

    def requested_voice(self) -> str | None:
        if self.audio and self.audio.output and self.audio.output.voice:
            return self.audio.output.voice
        return self.voice

    def input_format_problem(self) -> str | None:
        """Why the requested input format is unusable, or None (only 24 kHz PCM16 is accepted)."""
        if self.input_audio_format not in (None, "pcm16"):
            return f"input_audio_format {self.input_audio_format!r} is not supported; use 'pcm16' (24 kHz)"
        fmt = self.audio.input.format if self.audio and self.audio.input else None
        if fmt is not None:
            if fmt.type not in (None, "audio/pcm"):
                return f"audio.input.format.type {fmt.type!r} is not supported; use 'audio/pcm'"
            if fmt.rate not in (None, 24000):
                return f"audio.input.format.rate {fmt.rate} is not supported; use 24000"
        return None


class ClientEventBase(_Lenient):
    event_id: str | None = None


class SessionUpdateEvent(ClientEventBase):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(ClientEventBase):
    type: Literal["input_audio_buffer.append"]
    audio: str = Field(description="base64 PCM16 LE mono 24 kHz")


class InputAudioBufferClear(ClientEventBase):
    type: Literal["input_audio_buffer.clear"]


class InputAudioBufferCommit(ClientEventBase):
    type: Literal["input_audio_buffer.commit"]


class ResponseCreate(ClientEventBase):
    type: Literal["response.create"]


class ResponseCancel(ClientEventBase):
    type: Literal["response.cancel"]
    response_id: str | None = None


ClientEvent = Annotated[
    SessionUpdateEvent
    | InputAudioBufferAppend
    | InputAudioBufferClear
    | InputAudioBufferCommit
    | ResponseCreate
    | ResponseCancel,
    Field(discriminator="type"),
]
CLIENT_EVENT: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.clear",
    "input_audio_buffer.commit",
    "response.create",
    "response.cancel",
)


# --- server -> client -------------------------------------------------------------------------------


class ServerEvent(BaseModel):
    event_id: str = Field(default_factory=event_id)


class SessionObject(BaseModel):
    """The `session` of session.created / session.updated (GA shape)."""

    type: Literal["realtime"] = "realtime"
    id: str
    object: Literal["realtime.session"] = "realtime.session"
    model: str
    instructions: str = ""
    output_modalities: list[str] = Field(default_factory=lambda: ["audio"])
    audio: dict[str, Any]


class SessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionObject


class SessionUpdated(ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionObject


class ResponseObject(BaseModel):
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "incomplete", "failed"] = "in_progress"
    output: list[dict[str, Any]] = Field(default_factory=list)
    output_modalities: list[str] = Field(default_factory=lambda: ["audio"])
    conversation_id: str | None = None


class ResponseCreated(ServerEvent):
    type: Literal["response.created"] = "response.created"
    response: ResponseObject


class ResponseDone(ServerEvent):
    type: Literal["response.done"] = "response.done"
    response: ResponseObject


class _ContentEvent(ServerEvent):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class OutputAudioDelta(_ContentEvent):
    type: Literal["response.output_audio.delta"] = "response.output_audio.delta"
    delta: str


class OutputAudioDone(_ContentEvent):
    type: Literal["response.output_audio.done"] = "response.output_audio.done"


class OutputAudioTranscriptDelta(_ContentEvent):
    type: Literal["response.output_audio_transcript.delta"] = "response.output_audio_transcript.delta"
    delta: str


class OutputAudioTranscriptDone(_ContentEvent):
    type: Literal["response.output_audio_transcript.done"] = "response.output_audio_transcript.done"
    transcript: str


class SpeechStarted(ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class InputAudioBufferCleared(ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class ErrorDetail(BaseModel):
    type: str = "invalid_request_error"
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail


class ChorusEvent(ServerEvent):
    """Ours, not part of the OpenAI API: session lifecycle news (voice switched, resumed, audio dropped)."""

    type: Literal["chorus.event"] = "chorus.event"
    name: str
    detail: str = ""
    data: dict[str, Any] = Field(default_factory=dict)
