"""Schemas of every entry on every Chorus stream, versioned, in one module.

Each stream has its own small union, discriminated by the `type` field:

    chorus:control      SessionStart                    (placement; the CONTROL codec reads both)
    chorus:s:{sid}:ctl  SessionUpdate | SessionStop | SessionFlush  (to the session's owners)
    chorus:s:{sid}:in   UserAudio | SessionEvent
    chorus:s:{sid}:dlg  DialogueFrame | SessionEvent
    chorus:s:{sid}:tts  ClonedAudio | SessionEvent
    chorus:s:{sid}:out  OutputAudio | OutputText | SessionEvent
    chorus:tts:requests VoicePrepare | VoicePreview     (gateway -> any TTS worker)
    chorus:tts:reply:{request id}  VoicePreviewReply    (that worker -> the gateway)
    chorus:voices:events  VoiceDeleted                 (gateway -> every TTS worker)

On Redis an entry is flat: one field per model field. Binary fields (`pcm`) are raw bytes, string
fields raw UTF-8, everything else JSON. So `redis-cli XRANGE` shows `seq`, `text`, `pcm` as the
design names them, and PCM needs no base64.
"""

from __future__ import annotations

import json
import re
import time
import typing
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.audio import FRAME_BYTES
from shared.errors import MalformedMessage

PROTOCOL_VERSION = 1

# Pydantic checks these patterns with Rust's regex, where `$` is the end of the text. Python's `re` also
# lets `$` match before a final newline ("moshiko\n"), so Python code checks a value with `valid_id` /
# `valid_voice` (`fullmatch`), never with `re.match(PATTERN, ...)`.
PROFILE_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"  # every id: sessions, voice profiles, personas
SESSION_ID_PATTERN = rf"^{PROFILE_ID_PATTERN}$"
NATIVE_VOICES = ("moshiko", "moshika")
VOICE_PATTERN = rf"^(moshiko|moshika|profile:{PROFILE_ID_PATTERN})$"
_ID = re.compile(PROFILE_ID_PATTERN)
_VOICE = re.compile(VOICE_PATTERN)


def valid_id(value: str) -> bool:
    """A session, voice profile or persona id: what may become part of a Redis key or a storage path."""
    return _ID.fullmatch(value) is not None


def valid_voice(value: str) -> bool:
    return _VOICE.fullmatch(value) is not None


SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]
VoiceName = Annotated[str, Field(pattern=VOICE_PATTERN, description="moshiko, moshika or profile:<id>")]
VoiceMode = Literal["native", "cloned", "auto"]
AudioSource = Literal["native", "cloned"]


def is_cloned_voice(voice: str) -> bool:
    return voice.startswith("profile:")


def profile_id_of(voice: str) -> str | None:
    return voice.removeprefix("profile:") if is_cloned_voice(voice) else None


class Sampling(BaseModel):
    """Per-session sampling. docs/personas.md says which of these apply per row and which per worker."""

    model_config = ConfigDict(extra="forbid")

    text_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    text_top_k: int = Field(default=25, ge=1, le=1000)
    audio_temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    audio_top_k: int = Field(default=250, ge=1, le=2048)


PRIMER_MAX_CHARS = 2000


class PersonaSpec(BaseModel):
    """What a session needs of a persona; the gateway resolves a persona id into this."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default="default", max_length=64)
    name: str = Field(default="Default", max_length=100)
    primer: str = Field(
        default="", max_length=PRIMER_MAX_CHARS, description="Text forced into Moshi's text stream."
    )
    greeting: str = Field(default="", max_length=500)
    sampling: Sampling = Field(default_factory=Sampling)


class Envelope(BaseModel):
    """Fields every stream entry carries. `deadline`: unix time after which real-time data is stale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = PROTOCOL_VERSION
    session_id: SessionId
    seq: int = Field(default=0, ge=0)
    created_at: float = Field(default_factory=time.time)
    deadline: float | None = None

    def is_stale(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) > self.deadline


class _AudioFrame(Envelope):
    pcm: bytes = Field(repr=False)

    @field_validator("pcm")
    @classmethod
    def _one_frame(cls, pcm: bytes) -> bytes:
        if len(pcm) != FRAME_BYTES:
            raise ValueError(f"pcm must be one 80 ms frame ({FRAME_BYTES} bytes), got {len(pcm)}")
        return pcm


# --- chorus:control -------------------------------------------------------------------------------


class SessionStart(Envelope):
    type: Literal["start"] = "start"
    owner: str = Field(default="", description="Hash of the API key that owns the session ('' = no auth).")
    persona: PersonaSpec = Field(default_factory=PersonaSpec)
    voice: VoiceName = "moshiko"
    voice_mode: VoiceMode = "auto"
    model: Literal["moshiko", "moshika"] | None = Field(
        default=None, description="Which Moshi checkpoint must serve it; None = any."
    )


class SessionUpdate(Envelope):
    type: Literal["update"] = "update"
    voice: VoiceName | None = None
    voice_mode: VoiceMode | None = None
    sampling: Sampling | None = None


class SessionStop(Envelope):
    type: Literal["stop"] = "stop"
    reason: str = "client_closed"


class SessionFlush(Envelope):
    """Router -> tts owner (barge-in): drop the session's queued text and audio not yet sent."""

    type: Literal["flush"] = "flush"


# --- per-session streams --------------------------------------------------------------------------


class SessionEvent(Envelope):
    """Something happened to a session; travels on any per-session stream. Names: see `EventName`."""

    type: Literal["event"] = "event"
    name: str = Field(max_length=64)
    detail: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class EventName:
    """Known event names (a class of constants, so services and tests spell them once)."""

    READY = "ready"  # dialogue placed the session and it is generating
    RESUMED = "resumed"  # re-placed on another dialogue worker after a failure
    NO_CAPACITY = "no_capacity"
    ERROR = "error"
    ENDED = "ended"  # the session is over; the last entry of a stream
    VOICE_CHANGED = "voice_changed"
    SPEECH_STARTED = "speech_started"
    SPEECH_STOPPED = "speech_stopped"
    FLUSH = "flush"  # drop queued cloned audio (barge-in)
    UPDATE = "update"  # a SessionUpdate forwarded in-band; data = the update's fields
    PHRASE_DONE = "phrase_done"  # tts finished a phrase; data = phrase_id, frames, dialogue seq range


class UserAudio(_AudioFrame):
    """One 80 ms frame of the user's microphone, gateway -> dialogue."""

    type: Literal["audio"] = "audio"


class DialogueFrame(_AudioFrame):
    """Moshi's output for one tick: the text piece (or '') and its native audio."""

    type: Literal["frame"] = "frame"
    text: str = ""


class ClonedAudio(_AudioFrame):
    """One 80 ms frame of Pocket TTS audio and the words it covers (on the phrase's first frame)."""

    type: Literal["audio"] = "audio"
    text: str = ""
    phrase_id: int = 0


class OutputAudio(_AudioFrame):
    type: Literal["audio"] = "audio"
    source: AudioSource = "native"


class OutputText(Envelope):
    type: Literal["text"] = "text"
    text: str


# --- voice profiles: requests to the TTS service ----------------------------------------------------
# These are not tied to a session: `session_id` carries the request id (or the profile id), so every
# entry on every stream still has the same envelope.


class VoicePrepare(Envelope):
    """Compute and cache a profile's voice state now (after an upload), so the first session is quick."""

    type: Literal["prepare"] = "prepare"
    profile_id: Annotated[str, Field(pattern=rf"^{PROFILE_ID_PATTERN}$")]


class VoicePreview(Envelope):
    """Speak `text` in a profile's voice; the worker answers on `StreamNames.tts_reply(session_id)`."""

    type: Literal["preview"] = "preview"
    profile_id: Annotated[str, Field(pattern=rf"^{PROFILE_ID_PATTERN}$")]
    text: str = Field(min_length=1, max_length=1000)


class VoicePreviewReply(Envelope):
    """The whole preview as PCM16 24 kHz mono (any length), or an error code (a ChorusError code)."""

    type: Literal["reply"] = "reply"
    pcm: bytes = Field(default=b"", repr=False)
    error_code: str = ""
    error: str = ""


class VoiceDeleted(Envelope):
    """A profile is gone: every TTS worker drops its cached voice state."""

    type: Literal["voice_deleted"] = "voice_deleted"
    profile_id: Annotated[str, Field(pattern=rf"^{PROFILE_ID_PATTERN}$")]


ControlMessage = SessionStart | SessionUpdate | SessionStop | SessionFlush
InputMessage = UserAudio | SessionEvent
DialogueMessage = DialogueFrame | SessionEvent
TtsMessage = ClonedAudio | SessionEvent
OutputMessage = OutputAudio | OutputText | SessionEvent
TtsRequest = VoicePrepare | VoicePreview

M = TypeVar("M", bound=Envelope)


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    if origin is Annotated:
        return _is_text(get_args(annotation)[0])
    return False


def _field_kinds(model: type[Envelope]) -> dict[str, str]:
    kinds = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if annotation is bytes:
            kinds[name] = "bytes"
        elif _is_text(annotation) or (info.metadata and annotation is str):
            kinds[name] = "text"
        else:
            kinds[name] = "json"
    return kinds


def encode(message: Envelope) -> dict[str, bytes]:
    """A message as flat Redis stream fields."""
    fields: dict[str, bytes] = {}
    for name, kind in _field_kinds(type(message)).items():
        value = getattr(message, name)
        if kind == "bytes":
            fields[name] = value
        elif kind == "text":
            fields[name] = value.encode()
        else:
            raw = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            fields[name] = json.dumps(raw, separators=(",", ":")).encode()
    return fields


class Codec(Generic[M]):
    """Decodes the entries of one stream into one of its message types, by their `type` field."""

    def __init__(self, *models: type[Envelope]) -> None:
        self._models: dict[str, type[Envelope]] = {}
        for model in models:
            type_name = model.model_fields["type"].default
            self._models[type_name] = model
        self._kinds = {t: _field_kinds(m) for t, m in self._models.items()}

    def decode(self, fields: dict[bytes, bytes] | dict[str, bytes]) -> M:
        """Validate raw stream fields; raises MalformedMessage with the reason on anything wrong."""
        raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        type_name = raw.get("type", b"").decode(errors="replace")
        model = self._models.get(type_name)
        if model is None:
            raise MalformedMessage(
                f"unknown entry type {type_name!r}; expected one of {sorted(self._models)}"
            )
        kinds = self._kinds[type_name]
        values: dict[str, Any] = {}
        try:
            for name, data in raw.items():
                kind = kinds.get(name)
                if kind is None:
                    raise MalformedMessage(f"unexpected field {name!r} in a {type_name!r} entry")
                values[name] = (
                    data if kind == "bytes" else data.decode() if kind == "text" else json.loads(data)
                )
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedMessage(f"undecodable field in a {type_name!r} entry: {exc}") from exc
        if values.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise MalformedMessage(
                f"protocol version {values.get('v')!r}, this build speaks {PROTOCOL_VERSION}"
            )
        try:
            return typing.cast(M, model.model_validate(values))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise MalformedMessage(f"invalid {type_name!r} entry: {where}: {first['msg']}") from exc

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self._models)


CONTROL: Codec[ControlMessage] = Codec(SessionStart, SessionUpdate, SessionStop, SessionFlush)
INPUT: Codec[InputMessage] = Codec(UserAudio, SessionEvent)
DIALOGUE: Codec[DialogueMessage] = Codec(DialogueFrame, SessionEvent)
TTS: Codec[TtsMessage] = Codec(ClonedAudio, SessionEvent)
OUTPUT: Codec[OutputMessage] = Codec(OutputAudio, OutputText, SessionEvent)
TTS_REQUESTS: Codec[TtsRequest] = Codec(VoicePrepare, VoicePreview)
TTS_REPLIES: Codec[VoicePreviewReply] = Codec(VoicePreviewReply)
VOICE_EVENTS: Codec[VoiceDeleted] = Codec(VoiceDeleted)
