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

import builtins
import enum
import functools
import json
import math
import re
import time
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from shared.audio import FRAME_BYTES
from shared.errors import MalformedMessage

PROTOCOL_VERSION = 1

# Every id and voice rule is here, once. Pydantic checks the patterns with Rust's regex, where `$` is the
# end of the text. Python's `re` also lets `$` match before a final newline ("moshiko\n"), so Python code
# checks a value with `valid_id` / `parse_voice` (`fullmatch`), never with `re.match(PATTERN, ...)`.
PROFILE_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"  # every id: sessions, voice profiles, personas
SESSION_ID_PATTERN = rf"^{PROFILE_ID_PATTERN}$"
NATIVE_VOICES = ("moshiko", "moshika")
CATALOG_NAME_PATTERN = r"[a-z][a-z0-9_]{0,31}"  # Pocket TTS's catalog voices: alba, bill_boerst...
VOICE_PATTERN = rf"^(moshiko|moshika|profile:{PROFILE_ID_PATTERN}|catalog:{CATALOG_NAME_PATTERN})$"
_ID = re.compile(PROFILE_ID_PATTERN)
_VOICE = re.compile(VOICE_PATTERN)

SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]
ProfileId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]
VoiceName = Annotated[
    str, Field(pattern=VOICE_PATTERN, description="moshiko, moshika, profile:<id> or catalog:<name>")
]
VoiceMode = Literal["native", "cloned", "auto"]
VOICE_MODES: tuple[VoiceMode, ...] = ("native", "cloned", "auto")
AudioSource = Literal["native", "cloned"]


def valid_id(value: str) -> bool:
    """A session, voice profile or persona id: what may become part of a Redis key or a storage path."""
    return _ID.fullmatch(value) is not None


def valid_voice(value: str) -> bool:
    return _VOICE.fullmatch(value) is not None


def parse_voice(value: str) -> str:
    """A voice name from outside (a query parameter, a realtime event); ValueError saying what is
    accepted otherwise. Models declare `VoiceName` instead, which pydantic checks the same way."""
    if not valid_voice(value):
        raise ValueError(
            f"unknown voice {value!r}: use {' or '.join(NATIVE_VOICES)} or profile:<id> or catalog:<name>"
        )
    return value


def parse_voice_mode(value: str | None) -> VoiceMode:
    """A voice mode from outside; missing or empty means `auto`, anything unknown is a ValueError."""
    if not value:
        return "auto"
    for mode in VOICE_MODES:
        if value == mode:
            return mode
    raise ValueError(f"voice_mode must be native, cloned or auto, not {value!r}")


_CLONED = "profile:"


def cloned_voice(profile_id: str) -> str:
    """How a session names a voice profile's voice."""
    return f"{_CLONED}{profile_id}"


def is_cloned_voice(voice: str) -> bool:
    return voice.startswith(_CLONED)


def profile_id_of(voice: str) -> str | None:
    """The voice profile a voice name speaks with; None for Moshi's own voices."""
    return voice.removeprefix(_CLONED) if is_cloned_voice(voice) else None


def cloned_profile(voice: str, mode: VoiceMode) -> str | None:
    """The voice profile a session speaks with through the TTS: its voice's, unless the mode is native."""
    return profile_id_of(voice) if mode != "native" else None


_CATALOG = "catalog:"


def catalog_voice(name: str) -> str:
    """How a session names a voice of Pocket TTS's catalog."""
    return f"{_CATALOG}{name}"


def catalog_name_of(voice: str) -> str | None:
    """The catalog voice a voice name speaks with; None for profiles and Moshi's own voices."""
    return voice.removeprefix(_CATALOG) if voice.startswith(_CATALOG) else None


def spoken_by_tts(voice: str, mode: VoiceMode) -> str | None:
    """The voice the TTS speaks a session in (a profile's or a catalog voice), unless the mode is native;
    None when Moshi's own audio is all there is."""
    if mode == "native" or (profile_id_of(voice) is None and catalog_name_of(voice) is None):
        return None
    return voice


def model_of_voice(voice: str) -> str | None:
    """The model a voice speaks only on: a native voice is its own model's; None: any (cloned, catalog)."""
    return voice if voice in NATIVE_VOICES else None


def native_voice_for(model: str | None) -> str:
    """The Moshi voice a session on `model` speaks with when it names none."""
    return model if model is not None and model in NATIVE_VOICES else "moshiko"


SEED_MAX = 2**63 - 1
REPETITION_CONTEXT_MAX = 512  # the dialogue keeps this many recent text tokens per row


class Sampling(BaseModel):
    """Per-session sampling, applied per batch row (docs/personas.md). The audio fields left unset take the
    dialogue worker's defaults; a seed left unset is drawn at random when the session joins."""

    model_config = ConfigDict(extra="forbid")

    text_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    text_top_k: int = Field(default=25, ge=1, le=1000)
    audio_temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    audio_top_k: int | None = Field(default=None, ge=1, le=2048)
    pad_mult: float = Field(
        default=0.0, ge=-10.0, le=10.0, description="Added to the text padding token's logit: > 0 talks less."
    )
    repetition_penalty: float = Field(
        default=1.0, ge=1.0, le=3.0, description="Divides the logits of recent text tokens (1: off)."
    )
    repetition_penalty_context: int = Field(
        default=64, ge=0, le=REPETITION_CONTEXT_MAX, description="How many recent text tokens it covers."
    )
    text_seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    audio_seed: int | None = Field(default=None, ge=0, le=SEED_MAX)


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
    adapter: ProfileId | None = Field(
        default=None, description="A LoRA adapter id (fine-tuned persona): its rows run with it."
    )


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
    handoffs: int = Field(
        default=0, ge=0, le=64, description="Times a dialogue worker passed it on to a better placed one."
    )


class SessionUpdate(Envelope):
    type: Literal["update"] = "update"
    voice: VoiceName | None = None
    voice_mode: VoiceMode | None = None
    sampling: Sampling | None = None
    adapter: ProfileId | None = Field(
        default=None, description="Another LoRA adapter for the session's rows, from the next step on."
    )


class SessionStop(Envelope):
    type: Literal["stop"] = "stop"
    reason: str = "client_closed"


class SessionFlush(Envelope):
    """Router -> tts owner (barge-in): drop the session's queued text and audio not yet sent."""

    type: Literal["flush"] = "flush"


# --- per-session streams --------------------------------------------------------------------------


class EventName(enum.StrEnum):
    """Known event names (services and tests spell them once; a str on the wire)."""

    READY = "ready"  # dialogue (or tts) placed the session and it is generating; data: `Placement`
    RESUMED = "resumed"  # re-placed on another worker after a failure; data: `Placement`
    NO_CAPACITY = "no_capacity"
    ERROR = "error"  # data: `Failure`
    ENDED = "ended"  # the session is over; the last entry of a stream
    VOICE_CHANGED = "voice_changed"  # data: `VoiceChanged`
    SPEECH_STARTED = "speech_started"
    SPEECH_STOPPED = "speech_stopped"
    FLUSH = "flush"  # drop queued cloned audio (barge-in); data: `Flushed`
    PHRASE_DONE = "phrase_done"  # tts finished a phrase; data: `PhraseDone`
    CONTEXT_ROLLOVER = "context_rollover"  # dialogue moved to a fresh model state; data: `ContextRollover`


class SwitchReason(enum.StrEnum):
    """Why the router switched a session's audio source (a `voice_changed` event says it)."""

    VOICE_UPDATE = "voice_update"  # the session's voice or voice mode asked for it
    TTS_DOWN = "tts_down"  # no live TTS worker, or the TTS reported an error / end
    TTS_BEHIND = "tts_behind"  # auto mode: cloned audio is later than the budget
    TTS_RECOVERED = "tts_recovered"


class EventData(BaseModel):
    """An event's payload: one model per event name (`EVENT_DATA`); no payload for the other names.

    On the wire it is the `data` field, a JSON object without the fields left unset (None)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Placement(EventData):
    """`ready` / `resumed`: who serves the session now. A dialogue worker says all of it (and, resumed,
    whom it took over from); a TTS worker says none."""

    worker: str | None = None
    slot: int | None = None
    model: str | None = None
    primer_tokens: int | None = None
    previous_worker: str | None = None


class Failure(EventData):
    """`error`: a ChorusError code when one applies (the detail says what happened)."""

    code: str | None = None


class Flushed(EventData):
    """`flush`: the TTS dropped what it had not said yet; its phrase ids go on from `next_phrase_id`."""

    dropped_phrases: int
    dropped_words: int
    next_phrase_id: int


class PhraseDone(EventData):
    """`phrase_done`: the TTS finished a phrase: its frames and the dialogue frames its words came from."""

    phrase_id: int
    frames: int
    dialogue_seq: tuple[int, int] = Field(description="First and last dialogue seq of its words.")


class ContextRollover(EventData):
    """`context_rollover`: the session's dialogue went on in a fresh model state, primed with its persona
    and the tail of its transcript, before the model's context filled."""

    kind: Literal["free_slot", "in_place"] = Field(
        description="free_slot: primed beside the old state, no gap; in_place: no free slot, a gap."
    )
    frames: int = Field(description="Frames the replaced state had taken.")
    primer_tokens: int
    gap_frames: int = Field(description="Frames of silence while the state was primed again (in place).")


class VoiceChanged(EventData):
    """`voice_changed`: the router switched the audio the client hears."""

    source: AudioSource
    reason: SwitchReason
    voice: VoiceName


EVENT_DATA: dict[str, type[EventData]] = {
    EventName.READY: Placement,
    EventName.RESUMED: Placement,
    EventName.ERROR: Failure,
    EventName.FLUSH: Flushed,
    EventName.PHRASE_DONE: PhraseDone,
    EventName.VOICE_CHANGED: VoiceChanged,
    EventName.CONTEXT_ROLLOVER: ContextRollover,
}

D = TypeVar("D", bound=EventData)


class SessionEvent(Envelope):
    """Something happened to a session; travels on any per-session stream. Names: see `EventName`; the
    payload's model follows from the name (`EVENT_DATA`)."""

    type: Literal["event"] = "event"
    name: str = Field(max_length=64)
    detail: str = ""
    # Not given: {} of the name's model (the `before` validator sees to it; the default is for the type).
    data: SerializeAsAny[EventData] = Field(default_factory=EventData)

    @model_validator(mode="before")
    @classmethod
    def _data_by_name(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(data := values.get("data", {}), dict):
            model = EVENT_DATA.get(str(values.get("name", "")), EventData)
            values = {**values, "data": model.model_validate(data)}
        return values

    @model_validator(mode="after")
    def _data_fits_the_name(self) -> SessionEvent:
        expected = EVENT_DATA.get(self.name, EventData)
        if type(self.data) is not expected:
            raise ValueError(
                f"a {self.name!r} event carries {expected.__name__}, not {type(self.data).__name__}"
            )
        return self

    @classmethod
    def of(
        cls, session_id: str, seq: int, name: str, detail: str = "", data: EventData | None = None
    ) -> SessionEvent:
        """An event; without `data`, its name's payload saying nothing (a `ready` without details)."""
        fields = {"session_id": session_id, "seq": seq, "name": name, "detail": detail}
        return cls.model_validate({**fields, "data": data if data is not None else {}})

    def data_as(self, model: builtins.type[D]) -> D:
        """The payload as the model its name promises (a `ready`'s `Placement`...)."""
        if not isinstance(self.data, model):
            raise TypeError(f"a {self.name!r} event carries {type(self.data).__name__}, not {model.__name__}")
        return self.data


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
    profile_id: ProfileId


class VoicePreview(Envelope):
    """Speak `text` in a profile's voice (or `voice`, a catalog voice); the worker answers on
    `StreamNames.tts_reply(session_id)`."""

    type: Literal["preview"] = "preview"
    profile_id: ProfileId | None = None
    voice: VoiceName | None = None
    text: str = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _names_a_voice(self) -> VoicePreview:
        if self.voice is None and self.profile_id is None:
            raise ValueError("a preview names a profile_id or a voice")
        return self

    @property
    def spoken_voice(self) -> str:
        """The voice to speak in: `voice` when given, else the profile's."""
        return self.voice if self.voice is not None else cloned_voice(self.profile_id or "")


class VoicePreviewReply(Envelope):
    """The whole preview as PCM16 24 kHz mono (any length), or an error code (a ChorusError code)."""

    type: Literal["reply"] = "reply"
    pcm: bytes = Field(default=b"", repr=False)
    error_code: str = ""
    error: str = ""


class VoiceDeleted(Envelope):
    """A profile is gone: every TTS worker drops its cached voice state."""

    type: Literal["voice_deleted"] = "voice_deleted"
    profile_id: ProfileId


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


@functools.cache
def _field_kinds(model: type[Envelope]) -> dict[str, str]:
    """How each field of a message type travels: raw `bytes`, UTF-8 `text`, or `json`. Once per type."""
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


# The JSON fields of the frames that flow every 80 ms are numbers or null (`seq`, `created_at`, `v`,
# `deadline`): written and read here without the json module, whose per-call overhead was most of a
# frame's encoding cost. Anything else goes through json, as before.
_JSON_INT = re.compile(rb"-?(?:0|[1-9][0-9]*)")
_JSON_FLOAT = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _json_bytes(value: Any) -> bytes:
    kind = type(value)
    if kind is int:
        return str(value).encode()
    if kind is float and math.isfinite(value):
        return repr(value).encode()  # what json.dumps writes for a finite float
    if value is None:
        return b"null"
    raw = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return json.dumps(raw, separators=(",", ":")).encode()


def _json_value(data: bytes) -> Any:
    if type(data) is not bytes:
        return json.loads(data)
    if _JSON_INT.fullmatch(data):
        return int(data)
    if _JSON_FLOAT.fullmatch(data):
        return float(data)
    if data == b"null":
        return None
    return json.loads(data)


def encode(message: Envelope) -> dict[str, bytes]:
    """A message as flat Redis stream fields."""
    fields: dict[str, bytes] = {}
    values = message.__dict__
    for name, kind in _field_kinds(type(message)).items():
        value = values[name]
        if kind == "bytes":
            fields[name] = value
        elif kind == "text":
            fields[name] = value.encode()
        else:
            fields[name] = _json_bytes(value)
    return fields


class Codec(Generic[M]):
    """Decodes the entries of one stream into one of its message types, by their `type` field."""

    def __init__(self, *models: type[Envelope]) -> None:
        self._models: dict[str, type[Envelope]] = {}
        for model in models:
            type_name = model.model_fields["type"].default
            self._models[type_name] = model

    def decode(self, fields: dict[bytes, bytes] | dict[str, bytes]) -> M:
        """Validate raw stream fields; raises MalformedMessage with the reason on anything wrong."""
        raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        type_name = raw.get("type", b"").decode(errors="replace")
        model = self._models.get(type_name)
        if model is None:
            raise MalformedMessage(
                f"unknown entry type {type_name!r}; expected one of {sorted(self._models)}"
            )
        kinds = _field_kinds(model)
        values: dict[str, Any] = {}
        try:
            for name, data in raw.items():
                kind = kinds.get(name)
                if kind is None:
                    raise MalformedMessage(f"unexpected field {name!r} in a {type_name!r} entry")
                values[name] = (
                    data if kind == "bytes" else data.decode() if kind == "text" else _json_value(data)
                )
        except ValueError as exc:  # not UTF-8, not JSON, or an integer too long to read
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


class LeanFrame(typing.NamedTuple):
    """What a hot loop uses of a `UserAudio` or `DialogueFrame` entry, read without building its model."""

    seq: int
    created_at: float
    pcm: bytes
    text: str


_LEAN_SEQ = re.compile(rb"0|[1-9][0-9]{0,17}")  # below 2**63: a longer one goes the general way
_LEAN_ID = re.compile(PROFILE_ID_PATTERN.encode())
_LEAN_VERSION = str(PROTOCOL_VERSION).encode()


@functools.cache
def _lean_layout(model: type[UserAudio | DialogueFrame]) -> tuple[frozenset[bytes], bytes]:
    """A frame type's field names and `type`, as bytes: what a lean read compares an entry with."""
    type_name: str = model.model_fields["type"].default
    return frozenset(name.encode() for name in model.model_fields), type_name.encode()


def _lean_time(data: bytes) -> float | None:
    if not _JSON_FLOAT.fullmatch(data):
        return None
    value = float(data)
    return value if math.isfinite(value) else None


def lean_frame(model: type[UserAudio | DialogueFrame], fields: Mapping[bytes, bytes]) -> LeanFrame | None:
    """The entry as a `LeanFrame` when it is a `model` frame as `encode` writes one (every field there,
    each valid); None for anything else (events, odd but valid spellings, and every malformed entry), which
    `Codec.decode` then accepts or refuses with its reason as always. Checks what the model checks, for a
    fraction of the cost: the frames of the conversation path are read this way once per tick."""
    names, type_name = _lean_layout(model)
    if fields.keys() != names or fields[b"type"] != type_name or fields[b"v"] != _LEAN_VERSION:
        return None
    pcm, seq, deadline = fields[b"pcm"], fields[b"seq"], fields[b"deadline"]
    if type(pcm) is not bytes or len(pcm) != FRAME_BYTES or not _LEAN_SEQ.fullmatch(seq):
        return None
    if not _LEAN_ID.fullmatch(fields[b"session_id"]):
        return None
    created_at = _lean_time(fields[b"created_at"])
    if created_at is None or (deadline != b"null" and _lean_time(deadline) is None):
        return None
    try:
        text = fields[b"text"].decode() if b"text" in names else ""
    except UnicodeDecodeError:
        return None
    return LeanFrame(int(seq), created_at, pcm, text)


CONTROL: Codec[ControlMessage] = Codec(SessionStart, SessionUpdate, SessionStop, SessionFlush)
INPUT: Codec[InputMessage] = Codec(UserAudio, SessionEvent)
DIALOGUE: Codec[DialogueMessage] = Codec(DialogueFrame, SessionEvent)
TTS: Codec[TtsMessage] = Codec(ClonedAudio, SessionEvent)
OUTPUT: Codec[OutputMessage] = Codec(OutputAudio, OutputText, SessionEvent)
TTS_REQUESTS: Codec[TtsRequest] = Codec(VoicePrepare, VoicePreview)
TTS_REPLIES: Codec[VoicePreviewReply] = Codec(VoicePreviewReply)
VOICE_EVENTS: Codec[VoiceDeleted] = Codec(VoiceDeleted)
