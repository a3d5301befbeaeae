"""OpenAI Realtime API events, as far as Chorus speaks them: one pydantic model per event, `type`
fixed by a Literal, discriminated unions at the bottom. Field names follow the official SDK's types so
its client parses them. Chorus-only additions are prefixed `chorus.` (ours, not part of the OpenAI API).

Both the GA `session.update` shape (`session.type = "realtime"`, `session.audio.output.voice`,
`session.audio.input.format`) and the older beta shape (`session.voice`, `input_audio_format`) are
accepted; `SessionConfig.requested_voice()` / `.codecs()` hide the difference. `parse_client_event` turns
a client's text message into its event, or into the error that tells the client why it is not one.

Server events are modelled in the GA shape; `wire(event, beta=True)` writes one in the beta shape (the
`OpenAI-Beta: realtime=v1` dialect: `response.audio.delta`, `modalities`, content type `audio`).
Every event Chorus sends validates against the `openai` SDK's own types (tests/e2e/test_openai_sdk.py).

The audio path is lean: 12.5 appends in and 12.5 audio deltas out per session and second. An append is
parsed and validated in one step by pydantic-core (`_plain_append`), its audio decoded by a SIMD base64
decoder (`decode_audio`); the audio and transcript deltas are written from a template made once per
response (`_delta_wire`). Each falls back to the general path for anything else, so what is accepted, what
is written and every error are that path's (tests/services/gateway/test_protocol_units.py compares them).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Annotated, Any, Literal

import pybase64
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.audio import G711_RATE, SAMPLE_RATE
from shared.errors import InvalidRequest, excerpt
from shared.messages import PRIMER_MAX_CHARS


def event_id() -> str:
    return "event_" + os.urandom(10).hex()  # 20 random hex digits, as uuid4().hex[:20]: a quarter of its cost


# --- what Moshi cannot do: refused with a code of its own (docs/protocols.md) ------------------------


class NotSupported(InvalidRequest):
    code = "not_supported"


class TextInputNotSupported(NotSupported):
    """Moshi hears audio only: a user turn as text has no way in."""

    code = "text_input_not_supported"


class FunctionCallsNotSupported(NotSupported):
    code = "function_calls_not_supported"


class ItemNotFound(InvalidRequest):
    code = "item_not_found"


class ActiveResponse(InvalidRequest):
    """OpenAI's own code for `response.create` while a response is in progress."""

    code = "conversation_already_has_active_response"


class ResponseNotActive(InvalidRequest):
    """OpenAI's own code for `response.cancel` with no response in progress (or another one's id)."""

    code = "response_cancel_not_active"


class CommitEmpty(InvalidRequest):
    """OpenAI's own code for `input_audio_buffer.commit` with no audio appended since the last one."""

    code = "input_audio_buffer_commit_empty"


# --- audio formats --------------------------------------------------------------------------------

AudioCodec = Literal["pcm16", "pcmu", "pcma"]  # PCM16 24 kHz; G.711 μ-law / A-law 8 kHz
GA_FORMATS: dict[str, AudioCodec] = {"audio/pcm": "pcm16", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}
BETA_FORMATS: dict[str, AudioCodec] = {"pcm16": "pcm16", "g711_ulaw": "pcmu", "g711_alaw": "pcma"}
CODEC_RATES: dict[AudioCodec, int] = {"pcm16": SAMPLE_RATE, "pcmu": G711_RATE, "pcma": G711_RATE}


def ga_format(codec: AudioCodec) -> dict[str, Any]:
    ga_type = next(name for name, value in GA_FORMATS.items() if value == codec)
    return {"type": ga_type, "rate": 24000} if codec == "pcm16" else {"type": ga_type}


def beta_format(codec: AudioCodec) -> str:
    return next(name for name, value in BETA_FORMATS.items() if value == codec)


# --- client -> server -------------------------------------------------------------------------------


class _Lenient(BaseModel):
    # Clients send many fields Chorus has no use for (tools, turn_detection, ...): accept and ignore them.
    model_config = ConfigDict(extra="allow")


class AudioFormat(_Lenient):
    type: str | None = None
    rate: Annotated[int, Field(strict=True)] | None = None  # "24000" is refused, as OpenAI's API does


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
    # Unused (a persona's sampling applies), but a value that could never be valid is refused, not ignored.
    temperature: Annotated[float, Field(strict=True, allow_inf_nan=False)] | None = None
    turn_detection: TurnDetection | None = None
    tools: list[Any] | None = None
    output_modalities: list[str] | None = None
    modalities: list[str] | None = None  # beta
    # Ours, not part of the OpenAI API: false stops the `chorus.*` events for this session.
    chorus_events: Annotated[bool, Field(strict=True)] | None = None
    # Ours, not part of the OpenAI API: a LoRA adapter id (/v1/adapters) for this session.
    chorus_adapter: str | None = Field(default=None, max_length=64)

    def requested_voice(self) -> str | None:
        """The voice this update asks for (None: unchanged); the beta `voice` and the GA
        `audio.output.voice` at once must name the same one."""
        ga = self.audio.output.voice if self.audio and self.audio.output else None
        if ga and self.voice and ga != self.voice:
            raise InvalidRequest("voice and audio.output.voice name different voices: give one")
        return ga or self.voice

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

    def codecs(self) -> tuple[AudioCodec | None, AudioCodec | None]:
        """The input and output codecs this update asks for (None: unchanged); raises `InvalidRequest`
        for one Chorus does not speak."""
        chosen: list[AudioCodec | None] = []
        for side, beta in (("input", self.input_audio_format), ("output", self.output_audio_format)):
            codec, problem = _codec_of(side, beta, self._ga_format(side))
            if problem:
                raise InvalidRequest(problem)
            chosen.append(codec)
        return chosen[0], chosen[1]

    def _ga_format(self, side: str) -> AudioFormat | None:
        holder = getattr(self.audio, side, None) if self.audio else None
        return holder.format if holder is not None else None

    def refuse_what_moshi_cannot_do(self) -> None:
        if self.type not in (None, "realtime"):  # a `transcription` session: Chorus does not transcribe
            raise NotSupported(f"session.type {excerpt(self.type)} is not supported; use 'realtime'")
        refuse_what_moshi_cannot_do(self.tools, self.output_modalities, self.modalities)


def refuse_what_moshi_cannot_do(
    tools: list[Any] | None, output_modalities: list[str] | None, modalities: list[str] | None
) -> None:
    """Function tools and text-only output (of a session or a response) are refused."""
    if tools:
        raise FunctionCallsNotSupported("Moshi cannot call functions: send `tools` empty or not at all")
    for name, chosen in (("output_modalities", output_modalities), ("modalities", modalities)):
        if chosen is not None and "audio" not in chosen:
            raise NotSupported(f"{name} must include 'audio': Moshi always speaks, not {excerpt(chosen)}")


def _codec_of(side: str, beta: str | None, ga: AudioFormat | None) -> tuple[AudioCodec | None, str | None]:
    """The codec a beta name or a GA format object names, or why it is not one Chorus speaks. Both in one
    update must be valid and name the same codec (neither shape silently wins over the other)."""
    codec, problem = _ga_codec_of(side, ga)
    if beta is None or problem:
        return codec, problem
    if beta not in BETA_FORMATS:
        return (
            None,
            f"{side}_audio_format {excerpt(beta)} is not supported; use one of {', '.join(BETA_FORMATS)}",
        )
    if codec not in (None, BETA_FORMATS[beta]):
        return None, f"{side}_audio_format and audio.{side}.format name different formats: give one"
    return BETA_FORMATS[beta], None


def _ga_codec_of(side: str, ga: AudioFormat | None) -> tuple[AudioCodec | None, str | None]:
    if ga is None or ga.type is None:
        return None, None
    if ga.type not in GA_FORMATS:
        return (
            None,
            f"audio.{side}.format.type {excerpt(ga.type)} is not supported; "
            f"use one of {', '.join(GA_FORMATS)}",
        )
    codec = GA_FORMATS[ga.type]
    if ga.rate not in (None, CODEC_RATES[codec]):
        return (
            None,
            f"audio.{side}.format.rate {ga.rate} is not supported for {ga.type}; use {CODEC_RATES[codec]}",
        )
    return codec, None


class ClientEventBase(_Lenient):
    event_id: str | None = None


class SessionUpdateEvent(ClientEventBase):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(ClientEventBase):
    type: Literal["input_audio_buffer.append"]
    audio: str = Field(
        description="base64 audio in the session's input format (PCM16 LE mono 24 kHz by default)"
    )


class InputAudioBufferClear(ClientEventBase):
    type: Literal["input_audio_buffer.clear"]


class InputAudioBufferCommit(ClientEventBase):
    type: Literal["input_audio_buffer.commit"]


class ResponseParams(_Lenient):
    tools: list[Any] | None = None
    output_modalities: list[str] | None = None
    modalities: list[str] | None = None  # beta


class ResponseCreate(ClientEventBase):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(ClientEventBase):
    type: Literal["response.cancel"]
    response_id: str | None = None


class ItemContentIn(_Lenient):
    type: str
    audio: str | None = None


class ItemIn(_Lenient):
    """A client's conversation item: only a user message of `input_audio` is something Moshi can hear."""

    id: str | None = Field(default=None, max_length=64)
    type: str
    role: str | None = None
    content: list[ItemContentIn] = Field(default_factory=list)


class ConversationItemCreate(ClientEventBase):
    type: Literal["conversation.item.create"]
    item: ItemIn


class ConversationItemRetrieve(ClientEventBase):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ConversationItemDelete(ClientEventBase):
    type: Literal["conversation.item.delete"]
    item_id: str


class ConversationItemTruncate(ClientEventBase):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: Annotated[int, Field(strict=True, ge=0)] = 0
    audio_end_ms: Annotated[int, Field(strict=True, ge=0)]


class OutputAudioBufferClear(ClientEventBase):
    type: Literal["output_audio_buffer.clear"]


ClientEvent = Annotated[
    SessionUpdateEvent
    | InputAudioBufferAppend
    | InputAudioBufferClear
    | InputAudioBufferCommit
    | ResponseCreate
    | ResponseCancel
    | ConversationItemCreate
    | ConversationItemRetrieve
    | ConversationItemDelete
    | ConversationItemTruncate
    | OutputAudioBufferClear,
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
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.delete",
    "conversation.item.truncate",
    "output_audio_buffer.clear",
)


# --- parsing a client's message ---------------------------------------------------------------------


MAX_ECHOED_ID = 512  # a longer client `event_id` is not echoed in errors about its event


def echoed_event_id(value: str | None) -> str | None:
    """A valid event's `event_id` as echoed in an error about it: not when it is over MAX_ECHOED_ID, nor when
    it holds a lone surrogate (JSON's escapes can write one, UTF-8 cannot carry it back: pydantic would refuse
    to write the error, and the session would end in an internal error)."""
    if value is None or len(value) > MAX_ECHOED_ID:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


def _client_event_id(raw: object) -> str | None:
    """The client's `event_id`, to echo in an error about its event. The API says it is a string; a
    number is echoed as its text so the client still learns which event failed; anything else is not."""
    value = raw.get("event_id") if isinstance(raw, dict) else None
    if isinstance(value, str):
        return echoed_event_id(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


# The events that carry audio: their base64 audio may be large (the socket's audio pace bounds it).
# Besides its audio, an event is at most MAX_CONTROL_EVENT_CHARS (a session.update with the longest
# instructions is about 3 KB): a larger one is refused, unparsed where it names neither audio type, else
# before pydantic validates it. Without the bound, 800 KB of unknown fields cost ~100 ms each to read.
AUDIO_EVENT_TYPES = ("input_audio_buffer.append", "conversation.item.create")
MAX_CONTROL_EVENT_CHARS = 64 * 1024


def parse_client_event(text: str) -> ClientEvent | ErrorDetail:
    """A client's text message as its event, or the error telling the client why it is not one. The
    commonest event takes a lean path (`_plain_append`); any other, and any it refuses, the general one
    (`parse_event_model`)."""
    if (append := _plain_append(text)) is not None:
        return append
    if len(text) > MAX_CONTROL_EVENT_CHARS and not any(f'"{kind}"' in text for kind in AUDIO_EVENT_TYPES):
        return oversized_event(len(text))
    return parse_event_model(text)


def oversized_event(chars: int, kind: str | None = None, event_id: str | None = None) -> ErrorDetail:
    """The refusal of an event over MAX_CONTROL_EVENT_CHARS besides its audio (`kind` None: not read)."""
    named = f"a {kind} event" if kind else "an event"
    besides = " besides its audio" if kind in AUDIO_EVENT_TYPES else ""
    return ErrorDetail(
        code="payload_too_large",
        message=f"{named} of {chars} characters{besides}; at most {MAX_CONTROL_EVENT_CHARS} characters "
        f"are taken, besides the audio of {' and '.join(AUDIO_EVENT_TYPES)}",
        event_id=event_id,
    )


def _audio_chars(kind: str, raw: dict[str, Any]) -> int:
    """The characters of base64 audio an audio event carries (the pace bounds them, not the cap)."""
    if kind == "input_audio_buffer.append":
        audio = raw.get("audio")
        return len(audio) if isinstance(audio, str) else 0
    item = raw.get("item")
    content = item.get("content") if isinstance(item, dict) else None
    if not isinstance(content, list):
        return 0
    return sum(len(p["audio"]) for p in content if isinstance(p, dict) and isinstance(p.get("audio"), str))


def parse_event_model(text: str) -> ClientEvent | ErrorDetail:
    """`parse_client_event`'s general path: the message read with `json`, its type checked, its event
    validated by pydantic."""
    try:
        raw = json.loads(text)
    # ValueError: also an integer over Python's digit limit; RecursionError: nested too deep.
    except (ValueError, RecursionError) as exc:
        return ErrorDetail(code="invalid_json", message=f"invalid JSON: {exc}")
    client_id = _client_event_id(raw)
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in CLIENT_EVENT_TYPES:
        supported = ", ".join(CLIENT_EVENT_TYPES)
        message = f"unsupported event type {excerpt(kind)}; supported: {supported}"
        return ErrorDetail(code="unsupported_event", message=message, param="type", event_id=client_id)
    if len(text) > MAX_CONTROL_EVENT_CHARS:
        besides_audio = len(text) - (_audio_chars(kind, raw) if kind in AUDIO_EVENT_TYPES else 0)
        if besides_audio > MAX_CONTROL_EVENT_CHARS:
            return oversized_event(besides_audio, kind, client_id)
    try:
        return CLIENT_EVENT.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = f"invalid {kind}: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        return ErrorDetail(code="invalid_event", message=message, event_id=client_id)


_APPEND: TypeAdapter[InputAudioBufferAppend] = TypeAdapter(InputAudioBufferAppend)
_APPEND_TYPE = '"input_audio_buffer.append"'


def _plain_append(text: str) -> InputAudioBufferAppend | None:
    """The lean path of the commonest event: an `input_audio_buffer.append` with no fields but its own,
    parsed and validated in one step by pydantic-core's JSON parser (~3 µs, where `json.loads` and the
    union's validation take ~11 for 80 ms of audio). None for anything else, a message it refuses included:
    `parse_client_event` then reads it with `json`, so what it accepts and every error (code, message,
    echoed event id) are that path's. Both parsers take the last of repeated keys (pydantic-core since 2.33,
    in pydantic 2.11; before, the first of a small object's), and what they read differently (lone
    surrogates and control characters, which pydantic-core refuses; an integer past Python's digit limit,
    which it refuses too, or NaN, which only an extra or a repeated field could hold) never passes here."""
    if _APPEND_TYPE not in text:
        return None
    try:
        event = _APPEND.validate_json(text)
    except ValidationError:
        return None
    return None if event.__pydantic_extra__ else event


def decode_audio(text: str) -> bytes:
    """A client's base64 audio, decoded as `base64.b64decode(text, validate=True)` does, ~10x faster: by a
    SIMD decoder, or, what it refuses (it is stricter about padding after a whole quantum), by the stdlib,
    which accepts it or raises the `InvalidRequest` the client is told."""
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:
        pass
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"audio is not valid base64: {exc}") from None


def encode_audio(pcm: bytes) -> str:
    """Audio for a delta event: the base64 `base64.b64encode(pcm).decode()` gives, ~10x faster."""
    return pybase64.b64encode_as_string(pcm)


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
    # Ours, not part of the OpenAI API: the LoRA adapter the session runs (null: none; before the
    # conversation starts, the one asked for). After a worker refused a mid-session switch (an `error`
    # event), a new session.updated gives the one kept.
    chorus_adapter: str | None = None


class BetaSessionObject(BaseModel):
    """The `session` of session.created / session.updated in the beta dialect. No `model`: the beta types
    allow OpenAI's model names only (`moshiko` is not one)."""

    id: str
    object: Literal["realtime.session"] = "realtime.session"
    instructions: str = ""
    modalities: list[str] = Field(default_factory=lambda: ["audio", "text"])
    voice: str
    input_audio_format: str
    output_audio_format: str
    turn_detection: dict[str, Any]
    chorus_adapter: str | None = None  # ours, as in SessionObject


class SessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionObject | BetaSessionObject


class SessionUpdated(ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionObject | BetaSessionObject


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


class InputAudioBufferCommitted(ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class ConversationItemAdded(ServerEvent):
    """A user item committed, or a response's item opened (beta: `conversation.item.created`)."""

    type: Literal["conversation.item.added"] = "conversation.item.added"
    previous_item_id: str | None = None
    item: dict[str, Any]


class ResponseOutputItemAdded(ServerEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: int = 0
    item: dict[str, Any]


class ResponseOutputItemDone(ServerEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: int = 0
    item: dict[str, Any]


class ResponseContentPartAdded(_ContentEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: dict[str, Any]


class ResponseContentPartDone(_ContentEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: dict[str, Any]


class ConversationItemRetrieved(ServerEvent):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: dict[str, Any]


class ConversationItemDeleted(ServerEvent):
    type: Literal["conversation.item.deleted"] = "conversation.item.deleted"
    item_id: str


class ConversationItemTruncated(ServerEvent):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: int
    audio_end_ms: int


class OutputAudioBufferCleared(ServerEvent):
    type: Literal["output_audio_buffer.cleared"] = "output_audio_buffer.cleared"
    response_id: str


class RateLimit(BaseModel):
    name: Literal["requests", "tokens"]
    limit: int
    remaining: int
    reset_seconds: float


class RateLimitsUpdated(ServerEvent):
    """After each response: the caller's request budget (none when the gateway sets none)."""

    type: Literal["rate_limits.updated"] = "rate_limits.updated"
    rate_limits: list[RateLimit]


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


# --- the beta dialect -------------------------------------------------------------------------------

_BETA_TYPES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}


def wire(event: ServerEvent, *, beta: bool = False) -> str:
    """An event as sent: GA JSON, or the beta shape of it. The beta API has no `timeout_triggered`: a
    beta session gets it as `chorus.event` (name `timeout_triggered`)."""
    if isinstance(event, _DELTAS) and (lean := _delta_wire(event, beta)) is not None:
        return lean
    return wire_model(event, beta=beta)


def wire_model(event: ServerEvent, *, beta: bool = False) -> str:
    """`wire`'s general path: the event's pydantic model serialized (in the beta shape, through a dict)."""
    if not beta:
        return event.model_dump_json()
    if isinstance(event, InputAudioBufferTimeoutTriggered):
        data = event.model_dump(mode="json", exclude={"type", "event_id"})
        return ChorusEvent(name="timeout_triggered", detail="idle timeout", data=data).model_dump_json()
    data = event.model_dump(mode="json")
    data["type"] = _BETA_TYPES.get(data["type"], data["type"])
    if isinstance(data.get("response"), dict):
        data["response"] = _beta_response(data["response"])
    if isinstance(data.get("item"), dict):
        data["item"] = _beta_item(data["item"])
    return json.dumps(data, separators=(",", ":"))


def _beta_response(response: dict[str, Any]) -> dict[str, Any]:
    response["modalities"] = response.pop("output_modalities", ["audio"])
    response["output"] = [_beta_item(item) for item in response.get("output", [])]
    return response


def _beta_item(item: dict[str, Any]) -> dict[str, Any]:
    item.pop("object", None)
    item["content"] = [
        {**part, "type": "audio" if part.get("type") == "output_audio" else part.get("type")}
        for part in item.get("content", [])
    ]
    return item


# --- the audio path's deltas, from a template ---------------------------------------------------------

_DELTAS = (OutputAudioDelta, OutputAudioTranscriptDelta)
_MARK = "\x00"  # stands for the event id and the delta in a template; JSON writes it "\u0000"


def _delta_wire(event: OutputAudioDelta | OutputAudioTranscriptDelta, beta: bool) -> str | None:
    """An audio or transcript delta as `wire` writes it through pydantic, byte for byte: its response's
    template with the event id and the delta put in. Audio is base64, which JSON writes as it is (checked
    by decoding it, ~1 µs: ~10 to escape it); None for a delta that is not (`wire` takes the general path)."""
    # A lone surrogate, which pydantic refuses to write and `encode_basestring` writes as it is, takes the
    # general path, to fail as it does there. `isascii` reads a flag: audio is never scanned.
    if not (beta or (event.event_id.isascii() and event.delta.isascii())):
        try:
            f"{event.event_id}{event.delta}".encode()
        except UnicodeEncodeError:
            return None
    if isinstance(event, OutputAudioDelta):
        try:
            pybase64.b64decode(event.delta, validate=True)
        except ValueError:
            return None
        delta = f'"{event.delta}"'
    else:
        delta = (encode_basestring_ascii if beta else encode_basestring)(event.delta)
    template = _delta_template(
        type(event), event.response_id, event.item_id, event.output_index, event.content_index, beta
    )
    event_json = (encode_basestring_ascii if beta else encode_basestring)(event.event_id)
    return f'{{"event_id":{event_json}{template}{delta}}}'


# Two templates per speaking session (audio, transcript), ~300 bytes each: room for thousands of sessions
# on one gateway. A cache smaller than the sessions speaking at once would miss on every delta (each tick
# visits them all in turn).
@functools.lru_cache(maxsize=8192)
def _delta_template(
    kind: type[OutputAudioDelta | OutputAudioTranscriptDelta],
    response_id: str,
    item_id: str,
    output_index: int,
    content_index: int,
    beta: bool,
) -> str:
    """What `wire` writes between a delta event's id and its delta: that event's JSON, written by the general
    path with stand-ins for both and cut around them (the id is the first field, the delta the last)."""
    sample = kind(
        event_id=_MARK,
        response_id=response_id,
        item_id=item_id,
        output_index=output_index,
        content_index=content_index,
        delta=_MARK,
    )
    written = wire_model(sample, beta=beta)
    mark = json.dumps(_MARK)
    head, _, rest = written.partition(mark)
    middle, _, tail = rest.rpartition(mark)
    if head != '{"event_id":' or tail != "}":
        raise AssertionError(f"a delta event is written in an unexpected order: {written!r}")
    return middle
