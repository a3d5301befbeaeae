from __future__ import annotations

import pytest

from shared.audio import FRAME_BYTES, silence_frame
from shared.errors import MalformedMessage
from shared.messages import (
    CONTROL,
    DIALOGUE,
    OUTPUT,
    DialogueFrame,
    OutputText,
    SessionStart,
    SessionStop,
    encode,
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


def test_a_type_from_another_stream_is_rejected() -> None:
    with pytest.raises(MalformedMessage, match="unknown entry type"):
        OUTPUT.decode(encode(SessionStart(session_id="s1")))
    assert OUTPUT.decode(encode(OutputText(session_id="s1", text="hi"))).type == "text"


def test_invalid_voice_names_are_refused() -> None:
    with pytest.raises(ValueError, match="voice"):
        SessionStart(session_id="s1", voice="profile:../../etc")
