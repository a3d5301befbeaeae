"""Protocol pieces that need no running stack: Realtime event parsing (the send queue and socket limits:
tests/services/gateway/test_socket_limits.py)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.realtime_audio import RealtimeAudio
from services.gateway.protocols.realtime_items import Item
from shared.audio import FRAME_SAMPLES, FRAME_SEC, float_to_pcm16, g711_decode, g711_encode, pcm16_to_float
from shared.errors import InvalidRequest
from tests.support.openai_conformance import conforming


def test_session_update_accepts_the_ga_shape() -> None:
    event = ev.CLIENT_EVENT.validate_python(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "Be brief.",
                "tools": [],
                "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                    "output": {"voice": "profile:abc"},
                },
            },
        }
    )
    assert isinstance(event, ev.SessionUpdateEvent)
    assert event.session.requested_voice() == "profile:abc"
    assert event.session.instructions == "Be brief."
    assert event.session.codecs() == ("pcm16", None)


def test_session_update_accepts_the_beta_shape() -> None:
    event = ev.CLIENT_EVENT.validate_python(
        {
            "type": "session.update",
            "session": {"instructions": "Hi", "voice": "moshika", "input_audio_format": "pcm16"},
        }
    )
    assert isinstance(event, ev.SessionUpdateEvent)
    assert event.session.requested_voice() == "moshika"
    assert event.session.codecs() == ("pcm16", None)


@pytest.mark.parametrize(
    "session",
    [
        {"input_audio_format": "g722"},
        {"audio": {"input": {"format": {"type": "audio/opus"}}}},
        {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
        {"audio": {"input": {"format": {"type": "audio/pcmu", "rate": 16000}}}},
        {"output_audio_format": "mp3"},
    ],
)
def test_unusable_audio_formats_are_explained(session: dict[str, object]) -> None:
    event = ev.CLIENT_EVENT.validate_python({"type": "session.update", "session": session})
    assert isinstance(event, ev.SessionUpdateEvent)
    with pytest.raises(InvalidRequest, match="not supported"):
        event.session.codecs()


@pytest.mark.parametrize(
    ("session", "codecs"),
    [
        ({"input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw"}, ("pcmu", "pcma")),
        (
            {
                "audio": {
                    "input": {"format": {"type": "audio/pcmu"}},
                    "output": {"format": {"type": "audio/pcma"}},
                }
            },
            ("pcmu", "pcma"),
        ),
        ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}}}, (None, "pcm16")),
    ],
)
def test_telephony_formats_are_accepted_in_both_shapes(session: dict[str, object], codecs: object) -> None:
    event = ev.CLIENT_EVENT.validate_python({"type": "session.update", "session": session})
    assert isinstance(event, ev.SessionUpdateEvent)
    assert event.session.codecs() == codecs


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"audio": {"input": {"format": {"type": "audio/pcm", "rate": "24000"}}}}', "rate"),
        ('{"temperature": NaN}', "temperature"),
        ('{"temperature": Infinity}', "temperature"),
        ('{"temperature": "0.8"}', "temperature"),
    ],
)
def test_a_session_update_with_a_value_of_the_wrong_kind_is_refused(text: str, field: str) -> None:
    """Fields Chorus does not use are still checked: a client that sent a rate as a string or an
    impossible temperature learns so, where OpenAI's API would refuse it too."""
    error = ev.parse_client_event(f'{{"type": "session.update", "event_id": "e1", "session": {text}}}')
    assert isinstance(error, ev.ErrorDetail), error
    assert error.code == "invalid_event" and field in error.message and error.event_id == "e1", error


def test_server_events_carry_event_id_and_type() -> None:
    delta = ev.OutputAudioDelta(response_id="resp_1", item_id="item_1", delta="AAAA")
    body = delta.model_dump()
    assert body["type"] == "response.output_audio.delta" and body["event_id"].startswith("event_")
    assert {"response_id", "item_id", "output_index", "content_index", "delta"} <= set(body)


def test_a_client_message_that_is_no_event_becomes_the_error_that_says_why() -> None:
    not_json = ev.parse_client_event("{")
    assert isinstance(not_json, ev.ErrorDetail) and not_json.code == "invalid_json"
    unknown = ev.parse_client_event('{"type": "transcription_session.update", "event_id": "e1"}')
    assert isinstance(unknown, ev.ErrorDetail)
    assert (unknown.code, unknown.param, unknown.event_id) == ("unsupported_event", "type", "e1")
    invalid = ev.parse_client_event('{"type": "input_audio_buffer.append", "event_id": 5}')
    assert isinstance(invalid, ev.ErrorDetail) and invalid.code == "invalid_event"
    assert invalid.event_id == "5", "a number is echoed as its text"
    long_id = ev.parse_client_event(json.dumps({"type": "x", "event_id": "e" * (ev.MAX_ECHOED_ID + 1)}))
    assert isinstance(long_id, ev.ErrorDetail) and long_id.event_id is None, "never echoed at length"


def test_an_event_id_utf8_cannot_carry_is_not_echoed() -> None:
    """A lone surrogate, which JSON's escapes can write: the error still goes out, and can be written."""
    unknown = ev.parse_client_event('{"type": "x", "event_id": "e\\ud800"}')
    assert isinstance(unknown, ev.ErrorDetail) and unknown.event_id is None
    ev.wire(ev.ErrorEvent(error=unknown))
    commit = ev.parse_client_event('{"type": "input_audio_buffer.commit", "event_id": "e\\udc00"}')
    assert isinstance(commit, ev.InputAudioBufferCommit) and commit.event_id == "e\udc00"
    assert ev.echoed_event_id(commit.event_id) is None
    assert ev.echoed_event_id("é 🎉") == "é 🎉"


def test_a_client_message_that_is_an_event_is_parsed() -> None:
    event = ev.parse_client_event('{"type": "response.cancel", "event_id": "e2"}')
    assert isinstance(event, ev.ResponseCancel) and event.event_id == "e2"


AUDIO_B64 = base64.b64encode(bytes(range(256)) * 15).decode()  # 80 ms of PCM16: 3,840 bytes
APPEND = "input_audio_buffer.append"
ACCEPTED_APPENDS = [
    json.dumps({"type": APPEND, "audio": AUDIO_B64}),  # Python's spacing
    json.dumps({"audio": AUDIO_B64, "type": APPEND, "event_id": "e1"}, separators=(",", ":")),
    '{"type":"input_audio_buffer.append","audio":"AAAA","event_id":null}',
    '{"type":"input_audio_buffer.append","audio":"A\\/A=","extra":{"x":[1,2.5,"y"]}}',  # an escape; extras
    '{"type":"x","audio":5,"type":"input_audio_buffer.append","audio":"AAAA"}',  # repeated keys: the last
    # ... of valid values too (pydantic-core before 2.33 took the first of a small object's)
    '{"type":"input_audio_buffer.append","audio":"QUJD","event_id":"a","audio":"AAAA","event_id":"b"}',
    '{"type":"input_audio_buffer.append","audio":"\\uD83C\\uDF89"}',  # a surrogate pair: one character
    '{"type":"input_audio_buffer.append","audio":"AA\\ud800"}',  # a lone surrogate: `json` reads it
    '{"type":"input_audio_buffer.append","audio":"A","big":1e999}',  # `json` reads inf
]
REFUSED_APPENDS = [
    '{"type":"input_audio_buffer.append"}',
    '{"type":"input_audio_buffer.append","audio":5}',
    '{"type":"input_audio_buffer.append","audio":"AAAA","event_id":5}',
    '{"type":"input_audio_buffer.append","audio":"AAAA","audio":null}',
    '{"type":"input_audio_buffer.append","audio":"AAAA","type":"session.update"}',
    '{"type":"input_audio_buffer.append","audio":"AA\x01"}',  # a raw control character
    '{"type":"input_audio_buffer.append","audio":"AAAA"} and more',
    '\ufeff{"type":"input_audio_buffer.append","audio":"AAAA"}',
    '{"type":"input_audio_buffer.append","audio":"AAAA","n":' + "9" * 5000 + "}",  # past the digit limit
    '["input_audio_buffer.append"]',
    '"input_audio_buffer.append"',
]


def test_appends_take_a_lean_path_that_accepts_and_refuses_what_the_general_path_does() -> None:
    for text in ACCEPTED_APPENDS:
        event = ev.parse_client_event(text)
        assert isinstance(event, ev.InputAudioBufferAppend), text
        assert event == ev.parse_event_model(text), text
    for text in REFUSED_APPENDS:
        error = ev.parse_client_event(text)
        assert isinstance(error, ev.ErrorDetail), text[:80]
        assert error == ev.parse_event_model(text), text[:80]


def test_audio_is_decoded_as_the_stdlib_decodes_it_and_refused_with_its_error() -> None:
    padding = ["QQ==", "QUJD=", "QUJD==", "QQ=", "QQ", "Q", "QQ==QQ==", "=QUJD", "QUJDRA==="]
    for text in ["", "AAAA", AUDIO_B64, *padding, "QU JD", "QUJD\n", "QUJ-", "QUJ_", "é", "AA\ud800"]:
        try:
            expected = base64.b64decode(text, validate=True)
        except ValueError as exc:
            with pytest.raises(InvalidRequest) as refused:
                ev.decode_audio(text)
            assert refused.value.detail == f"audio is not valid base64: {exc}"
        else:
            assert ev.decode_audio(text) == expected, text
    pcm = bytes(range(256)) * 15
    assert ev.encode_audio(pcm) == base64.b64encode(pcm).decode()


@pytest.mark.parametrize("beta", [False, True])
def test_deltas_are_written_from_a_template_as_pydantic_writes_them(beta: bool) -> None:
    pcm = float_to_pcm16(np.random.default_rng(0).standard_normal(FRAME_SAMPLES).astype(np.float32) / 10)
    texts = ["Hello", ' "quoted" \\ back/slash', "\x00\x01\x1f\x7f\n\t\r\b\f", "é 中文 🎉", "\u2028", ""]
    events: list[ev.ServerEvent] = [
        ev.OutputAudioDelta(response_id="resp_1", item_id="item_1", delta=ev.encode_audio(pcm)),
        ev.OutputAudioDelta(response_id="resp_1", item_id="item_1", delta=""),
        ev.OutputAudioDelta(response_id="resp_1", item_id="item_1", delta='not base64: "\\\x01'),
        *(
            ev.OutputAudioTranscriptDelta(response_id="resp_1", item_id="item_1", delta=text)
            for text in texts
        ),
        ev.OutputAudioTranscriptDelta(
            event_id='e "é"\x00',
            response_id='r\\"',
            item_id="i\u2028",
            output_index=1,
            content_index=2,
            delta="x",
        ),
    ]
    for event in events:
        assert ev.wire(event, beta=beta) == ev.wire_model(event, beta=beta), event
    sent = conforming(ev.wire(events[0], beta=beta), beta=beta)
    assert base64.b64decode(sent["delta"]) == pcm
    assert conforming(ev.wire(events[3], beta=beta), beta=beta)["delta"] == "Hello"


@pytest.mark.parametrize("beta", [False, True])
def test_a_delta_with_a_lone_surrogate_is_written_or_refused_as_pydantic_does(beta: bool) -> None:
    """GA JSON is written by pydantic, which refuses a lone surrogate; beta JSON by `json`: it escapes one."""
    events = [
        ev.OutputAudioTranscriptDelta(response_id="resp_1", item_id="item_1", delta="a\ud800"),
        ev.OutputAudioTranscriptDelta(response_id="resp_1", item_id="item_1", delta="é\udfff 🎉"),
        ev.OutputAudioDelta(event_id="e\udc00", response_id="resp_1", item_id="item_1", delta="AAAA"),
    ]
    for event in events:
        if beta:
            assert ev.wire(event, beta=True) == ev.wire_model(event, beta=True)
        else:
            with pytest.raises(ValueError, match="surrogates not allowed") as general:
                ev.wire_model(event)
            with pytest.raises(type(general.value)):
                ev.wire(event)


def test_the_beta_dialect_renames_audio_events_and_validates_as_the_sdks_beta_types() -> None:
    delta = ev.OutputAudioDelta(response_id="resp_1", item_id="item_1", delta="AAAA")
    assert conforming(ev.wire(delta, beta=True), beta=True)["type"] == "response.audio.delta"
    assert conforming(ev.wire(delta))["type"] == "response.output_audio.delta"
    item = Item("item_1", "assistant", pieces=[(0, "hi")]).wire()
    done = ev.ResponseDone(response=ev.ResponseObject(id="resp_1", status="cancelled", output=[item]))
    beta_done = conforming(ev.wire(done, beta=True), beta=True)
    assert beta_done["response"]["modalities"] == ["audio"]
    assert beta_done["response"]["output"][0]["content"][0] == {"type": "audio", "transcript": "hi"}
    conforming(ev.wire(done))
    timeout = ev.InputAudioBufferTimeoutTriggered(audio_start_ms=0, audio_end_ms=5000, item_id="item_2")
    assert json.loads(ev.wire(timeout, beta=True))["type"] == "chorus.event", "no such event in beta"


@pytest.mark.parametrize(
    ("session", "code"),
    [
        ({"tools": [{"type": "function", "name": "lookup"}]}, "function_calls_not_supported"),
        ({"output_modalities": ["text"]}, "not_supported"),
        ({"modalities": ["text"]}, "not_supported"),
    ],
)
def test_what_moshi_cannot_do_is_refused_with_its_code(session: dict[str, object], code: str) -> None:
    event = ev.CLIENT_EVENT.validate_python({"type": "session.update", "session": session})
    assert isinstance(event, ev.SessionUpdateEvent)
    with pytest.raises(InvalidRequest) as refused:
        event.session.refuse_what_moshi_cannot_do()
    assert refused.value.code == code


def test_a_telephony_session_decodes_mu_law_at_8_khz_and_encodes_a_law_back() -> None:
    audio = RealtimeAudio()
    audio.set_formats("pcmu", "pcma")
    one_frame = g711_encode(float_to_pcm16(np.full(640, 0.25, dtype=np.float32)), "pcmu")  # 80 ms at 8 kHz
    assert audio.input_seconds(one_frame) == pytest.approx(FRAME_SEC), "paced as 80 ms of audio"
    heard = pcm16_to_float(b"".join(audio.decode_input(one_frame) for _ in range(10)))
    assert len(heard) == pytest.approx(10 * FRAME_SAMPLES, abs=FRAME_SAMPLES), "resampled to 24 kHz"
    assert np.median(heard[FRAME_SAMPLES:]) == pytest.approx(0.25, abs=0.01)
    moshi = float_to_pcm16(np.full(FRAME_SAMPLES, -0.5, dtype=np.float32))
    sent = b"".join(audio.encode_output(moshi) for _ in range(10))
    assert len(sent) == pytest.approx(10 * 640, abs=640), "one A-law byte per 8 kHz sample"
    back = pcm16_to_float(g711_decode(sent, "pcma"))
    assert np.median(back[640:]) == pytest.approx(-0.5, abs=0.02)
