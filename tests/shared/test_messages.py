from __future__ import annotations

import json

import pytest

from shared.audio import FRAME_BYTES, silence_frame
from shared.errors import MalformedMessage
from shared.messages import (
    CONTROL,
    DIALOGUE,
    OUTPUT,
    TTS,
    DialogueFrame,
    EventData,
    EventName,
    Failure,
    Flushed,
    OutputText,
    PhraseDone,
    Placement,
    SessionEvent,
    SessionStart,
    SessionStop,
    SwitchReason,
    UserAudio,
    VoiceChanged,
    encode,
    lean_frame,
)


def test_every_field_round_trips_through_flat_redis_fields() -> None:
    frame = DialogueFrame(session_id="s1", seq=7, text=" bonjour", pcm=silence_frame())
    fields = encode(frame)
    assert fields["text"] == b" bonjour"
    assert fields["seq"] == b"7"
    assert fields["pcm"] == bytes(FRAME_BYTES)
    assert DIALOGUE.decode({k.encode(): v for k, v in fields.items()}) == frame


def test_control_union_picks_the_model_by_type() -> None:
    start = SessionStart(session_id="s1", voice="profile:abc")
    stop = SessionStop(session_id="s1", reason="done")
    assert CONTROL.decode(encode(start)) == start
    assert CONTROL.decode(encode(stop)) == stop


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"type": b"nope"}, "unknown entry type"),
        ({b"type": b"frame", b"session_id": b"s", b"pcm": b"\x00" * 10}, "one 80 ms frame"),
        ({b"type": b"frame", b"session_id": b"s", b"seq": b"{", b"pcm": bytes(FRAME_BYTES)}, "undecodable"),
        ({b"type": b"frame", b"session_id": b"../x", b"pcm": bytes(FRAME_BYTES)}, "session_id"),
        (
            {b"type": b"frame", b"session_id": b"s", b"v": b"99", b"pcm": bytes(FRAME_BYTES)},
            "protocol version",
        ),
        (
            {b"type": b"frame", b"session_id": b"s", b"evil": b"1", b"pcm": bytes(FRAME_BYTES)},
            "unexpected field",
        ),
    ],
)
def test_malformed_entries_are_rejected_with_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        DIALOGUE.decode(fields)


def _frame_fields(**changes: bytes | None) -> dict[bytes, bytes]:
    """A dialogue frame as the dialogue writes it, with fields changed (None: left out)."""
    frame = DialogueFrame(session_id="s1", seq=7, text=" salut", pcm=bytes(range(256)) * (FRAME_BYTES // 256))
    fields = {name.encode(): value for name, value in encode(frame).items()}
    for name, value in changes.items():
        if value is None:
            del fields[name.encode()]
        else:
            fields[name.encode()] = value
    return fields


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"deadline": b"1764172800.5"},
        {"created_at": b"1764172800"},
        {"seq": b"0"},
        {"pcm": bytes(FRAME_BYTES - 2)},
        {"pcm": bytes(FRAME_BYTES + 2)},
        {"seq": b"-1"},
        {"seq": b"07"},
        {"seq": b"7.0"},
        {"seq": b"9" * 19},
        {"seq": b"9" * 5000},
        {"session_id": b"../x"},
        {"session_id": b"s1\n"},
        {"session_id": b"s" * 65},
        {"created_at": b"NaN"},
        {"created_at": b"1e999"},
        {"created_at": b"soon"},
        {"deadline": b"tomorrow"},
        {"deadline": b"-1e999"},
        {"text": b"\xff\xfe"},
        {"v": b"2"},
        {"v": b"1.0"},
        {"type": b"audio"},
        {"evil": b"1"},
        {"text": None},
        {"deadline": None},
        {"v": None},
    ],
)
def test_a_lean_read_of_a_frame_agrees_with_the_schema_or_leaves_the_entry_to_it(
    changes: dict[str, bytes],
) -> None:
    """The router's lean path reads a frame's fields only where the codec would accept the entry with the
    same values; everything else (malformed, or valid but spelled otherwise) is left to the codec."""
    fields = _frame_fields(**changes)
    lean = lean_frame(DialogueFrame, fields)
    try:
        decoded = DIALOGUE.decode(fields)
    except MalformedMessage:
        assert lean is None
        return
    assert isinstance(decoded, DialogueFrame)
    if lean is not None:
        assert lean == (decoded.seq, decoded.created_at, decoded.pcm, decoded.text)
    if not changes:
        assert lean is not None  # the common entry takes the lean path


def test_a_lean_read_takes_a_user_frame_and_leaves_events_and_other_types_to_the_codec() -> None:
    user = {
        k.encode(): v for k, v in encode(UserAudio(session_id="s1", seq=3, pcm=bytes(FRAME_BYTES))).items()
    }
    assert lean_frame(UserAudio, user) == (
        3,
        pytest.approx(float(user[b"created_at"])),
        bytes(FRAME_BYTES),
        "",
    )
    assert lean_frame(DialogueFrame, user) is None
    event = {k.encode(): v for k, v in encode(SessionEvent(session_id="s1", name=EventName.READY)).items()}
    assert lean_frame(DialogueFrame, event) is None
    assert lean_frame(DialogueFrame, {k.decode(): v for k, v in _frame_fields().items()}) is None  # type: ignore[arg-type]


def test_a_type_from_another_stream_is_rejected() -> None:
    with pytest.raises(MalformedMessage, match="unknown entry type"):
        OUTPUT.decode(encode(SessionStart(session_id="s1")))
    assert OUTPUT.decode(encode(OutputText(session_id="s1", text="hi"))).type == "text"


def test_invalid_voice_names_are_refused() -> None:
    with pytest.raises(ValueError, match="voice"):
        SessionStart(session_id="s1", voice="profile:../../etc")


@pytest.mark.parametrize(
    ("name", "data", "wire"),
    [
        (
            EventName.READY,
            Placement(worker="d1", slot=2, model="moshiko", primer_tokens=7),
            {"worker": "d1", "slot": 2, "model": "moshiko", "primer_tokens": 7},
        ),
        (
            EventName.RESUMED,
            Placement(worker="d2", previous_worker="d1"),
            {"worker": "d2", "previous_worker": "d1"},
        ),
        (EventName.READY, Placement(), {}),
        (EventName.ERROR, Failure(code="not_found"), {"code": "not_found"}),
        (
            EventName.FLUSH,
            Flushed(dropped_phrases=2, dropped_words=5, next_phrase_id=9),
            {"dropped_phrases": 2, "dropped_words": 5, "next_phrase_id": 9},
        ),
        (
            EventName.PHRASE_DONE,
            PhraseDone(phrase_id=3, frames=20, dialogue_seq=(10, 14)),
            {"phrase_id": 3, "frames": 20, "dialogue_seq": [10, 14]},
        ),
        (
            EventName.VOICE_CHANGED,
            VoiceChanged(source="native", reason=SwitchReason.TTS_DOWN, voice="profile:v1"),
            {"source": "native", "reason": "tts_down", "voice": "profile:v1"},
        ),
        (EventName.ENDED, EventData(), {}),
    ],
    ids=["ready", "resumed", "ready_from_tts", "error", "flush", "phrase_done", "voice_changed", "ended"],
)
def test_event_payloads_are_models_in_code_and_the_same_json_object_on_the_wire(
    name: EventName, data: EventData, wire: dict[str, object]
) -> None:
    event = SessionEvent(session_id="s1", seq=4, name=name, detail="why", data=data)
    fields = encode(event)
    assert json.loads(fields["data"]) == wire, "unset fields are left out, as before"
    assert fields["name"] == name.value.encode()
    decoded = TTS.decode({k.encode(): v for k, v in fields.items()})
    assert isinstance(decoded, SessionEvent)
    assert decoded == event and type(decoded.data) is type(data)
    assert event.data_as(type(data)) == data


def test_an_event_without_data_carries_its_names_payload_saying_nothing() -> None:
    assert SessionEvent(session_id="s1", name=EventName.READY).data == Placement()
    assert SessionEvent.of("s1", 0, EventName.SPEECH_STARTED).data == EventData()
    with pytest.raises(ValueError, match="next_phrase_id"):
        SessionEvent(session_id="s1", name=EventName.FLUSH)


def test_an_event_whose_payload_does_not_fit_its_name_is_refused() -> None:
    with pytest.raises(ValueError, match="carries Flushed, not VoiceChanged"):
        SessionEvent(
            session_id="s1",
            name=EventName.FLUSH,
            data=VoiceChanged(source="native", reason=SwitchReason.TTS_DOWN, voice="moshiko"),
        )
    wrong = encode(SessionEvent(session_id="s1", name=EventName.ERROR, data=Failure(code="x")))
    with pytest.raises(MalformedMessage, match="invalid 'event' entry"):
        TTS.decode({**wrong, "name": b"phrase_done"})
    with pytest.raises(TypeError, match="carries Failure, not Placement"):
        SessionEvent.of("s1", 0, EventName.ERROR, data=Failure()).data_as(Placement)


def test_an_event_name_is_a_plain_string_on_the_wire_and_compares_equal_to_its_enum() -> None:
    assert EventName.PHRASE_DONE == "phrase_done" and f"{EventName.PHRASE_DONE}" == "phrase_done"
    event = OUTPUT.decode(encode(SessionEvent(session_id="s1", name=EventName.SPEECH_STOPPED)))
    assert isinstance(event, SessionEvent) and event.name == EventName.SPEECH_STOPPED
