"""OpenAI Realtime API events, as far as Chorus speaks them: one pydantic model per event, `type`
fixed by a Literal, discriminated unions at the bottom. Field names follow the official SDK's types so
its client parses them. Chorus-only additions are prefixed `chorus.` (ours, not part of the OpenAI API).

Both the GA `session.update` shape (`session.type = "realtime"`, `session.audio.output.voice`,
`session.audio.input.format`) and the older beta shape (`session.voice`, `input_audio_format`) are
accepted; `SessionConfig.voice()` / `.input_format_ok()` hide the difference. `parse_client_event` turns
a client's text message into its event, or into the error that tells the client why it is not one.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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


class TurnDetection(_Lenient):
    """Chorus always detects speech (the router's server VAD); of this only `idle_timeout_ms` is used."""

    type: str | None = None
    idle_timeout_ms: Annotated[int, Field(strict=True)] | None = None


class AudioInput(_Lenient):
    format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None


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
    turn_detection: TurnDetection | None = None
    # Ours, not part of the OpenAI API: a LoRA adapter id (/v1/adapters) for this session.
    chorus_adapter: str | None = Field(default=None, max_length=64)

    def requested_voice(self) -> str | None:
        if self.audio and self.audio.output and self.audio.output.voice:
            return self.audio.output.voice
        return self.voice

    def idle_timeout_update(self) -> tuple[bool, int | None]:
        """Whether this update sets the idle timeout, and to what (None: the gateway's own). A
        `turn_detection` object replaces the last one, as in OpenAI's API: one without `idle_timeout_ms`,
        or null, clears it."""
        audio_input = self.audio.input if self.audio else None
        for holder in (audio_input, self):
            if holder is not None and "turn_detection" in holder.model_fields_set:
                detection = holder.turn_detection
                return True, detection.idle_timeout_ms if detection else None
        return False, None

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


# --- parsing a client's message ---------------------------------------------------------------------


MAX_ECHOED_ID = 512  # a longer client `event_id` is not echoed in errors about its event


def _excerpt(value: object, limit: int = 64) -> str:
    """A client's value quoted in an error, cut short: an error never echoes a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def echoed_event_id(value: str | None) -> str | None:
    """A valid event's `event_id` as echoed in an error about it: not when it is over MAX_ECHOED_ID."""
    return value if value is not None and len(value) <= MAX_ECHOED_ID else None


def _client_event_id(raw: object) -> str | None:
    """The client's `event_id`, to echo in an error about its event. The API says it is a string; a
    number is echoed as its text so the client still learns which event failed; anything else is not."""
    value = raw.get("event_id") if isinstance(raw, dict) else None
    if isinstance(value, str):
        return echoed_event_id(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def parse_client_event(text: str) -> ClientEvent | ErrorDetail:
    """A client's text message as its event, or the error telling the client why it is not one."""
    try:
        raw = json.loads(text)
    # ValueError: also an integer over Python's digit limit; RecursionError: nested too deep.
    except (ValueError, RecursionError) as exc:
        return ErrorDetail(code="invalid_json", message=f"invalid JSON: {exc}")
    client_id = _client_event_id(raw)
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in CLIENT_EVENT_TYPES:
        supported = ", ".join(CLIENT_EVENT_TYPES)
        message = f"unsupported event type {_excerpt(kind)}; supported: {supported}"
        return ErrorDetail(code="unsupported_event", message=message, param="type", event_id=client_id)
    try:
        return CLIENT_EVENT.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = f"invalid {kind}: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        return ErrorDetail(code="invalid_event", message=message, event_id=client_id)


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


class InputAudioBufferTimeoutTriggered(ServerEvent):
    """The idle timeout ended the session: no user speech from `audio_start_ms` to `audio_end_ms` (offsets
    in the audio the client appended). OpenAI's server answers with a response; Chorus ends the session
    (an `error` with code `idle_timeout` follows, then the close)."""

    type: Literal["input_audio_buffer.timeout_triggered"] = "input_audio_buffer.timeout_triggered"
    audio_start_ms: int
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
    """Ours, not part of the OpenAI API: session lifecycle news, one `name` each (`voice_changed`,
    `resumed`, `audio_dropped`, `context_rollover`: the dialogue moved to a fresh model state; its `data`
    is `shared.messages.ContextRollover`), documented in docs/protocols.md."""

    type: Literal["chorus.event"] = "chorus.event"
    name: str
    detail: str = ""
    data: dict[str, Any] = Field(default_factory=dict)
