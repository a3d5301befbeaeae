"""Ids and voices are whole-string matches: `moshiko\\n` is no voice and `x:transcript` no session id.

Python's `re.match(r"^...$")` accepts a trailing newline (`$` matches before it); pydantic's patterns run
on Rust's regex, where `$` is the end of the text. The first tests pin both facts; the rest drive a real
gateway process with such values on REST paths, in bodies and on both WebSockets.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
import redis
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from shared.messages import (
    VOICE_PATTERN,
    SessionStart,
    UserAudio,
    VoicePrepare,
    valid_id,
    valid_voice,
)
from shared.streams import StreamNames
from shared.voice_profiles import VoiceProfile
from tests.security.conftest import GatewayProcess, StartGateway
from tests.support.tts import SPEECH

ERROR = 0x05  # Moshi wire protocol: an error message


def test_python_re_match_accepts_a_trailing_newline_so_ids_and_voices_use_fullmatch() -> None:
    assert re.match(VOICE_PATTERN, "moshiko\n"), "the trap: `$` matches before a final newline"
    for voice in ("moshiko\n", "moshika\n", "profile:voice_1\n", "moshiko\r", " moshiko", "profile:"):
        assert not valid_voice(voice), repr(voice)
    for sid in ("sess_1\n", "x:transcript", "a/b", "..", "", "a" * 65):
        assert not valid_id(sid), repr(sid)
    assert valid_voice("profile:voice_1") and valid_id("sess_1")


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (SessionStart, {"session_id": "s1", "voice": "moshiko\n"}),
        (SessionStart, {"session_id": "s1\n"}),
        (UserAudio, {"session_id": "s1\n", "pcm": bytes(3840)}),
        (VoicePrepare, {"session_id": "s1", "profile_id": "voice_1\n"}),
        (
            VoiceProfile,
            {"id": "voice_1\n", "owner": "", "name": "n", "duration_s": 3, "speech_s": 2, "consent": True},
        ),
    ],
    ids=["start_voice", "start_session_id", "audio_session_id", "prepare_profile_id", "profile_id"],
)
def test_pydantic_patterns_refuse_a_trailing_newline(model: type[Any], fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        model(**fields)


# --- a real gateway ---------------------------------------------------------------------------------


@pytest.fixture
def gateway(start_gateway: StartGateway) -> GatewayProcess:
    return start_gateway()


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, (response.request.url, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize("route", ["/v1/sessions/{}", "/v1/sessions/{}/transcript"])
def test_session_routes_check_the_id_before_it_reaches_redis(
    gateway: GatewayProcess, redis_url: str, route: str
) -> None:
    """A running session `x` has a list at `session:x:transcript` and a string at `session:x:lease`:
    read as a session's hash they answered 500 (WRONGTYPE)."""
    names = StreamNames(gateway.key_prefix)
    with redis.Redis.from_url(redis_url) as client:
        client.rpush(names.session_transcript("x"), json.dumps({"text": "hello"}))
        client.set(names.session_lease("x"), b"1")
    for sid in ("x:transcript", "x:lease", "x%0A", "x%0D", "x%00", "a" * 65):
        assert_not_found(httpx.get(gateway.url + route.format(sid), timeout=10))
    assert "Traceback" not in gateway.log_text()


def test_voice_and_persona_ids_with_a_trailing_newline_are_not_found(gateway: GatewayProcess) -> None:
    voice = httpx.post(
        f"{gateway.url}/v1/voices",
        files={"file": ("speech.wav", SPEECH.read_bytes())},
        data={"name": "me", "consent": "true"},
        timeout=60,
    ).json()["id"]
    persona = httpx.post(f"{gateway.url}/v1/personas", json={"name": "p"}, timeout=10).json()["id"]
    for path in (f"/v1/voices/{voice}", f"/v1/personas/{persona}", "/v1/personas/default"):
        assert httpx.get(f"{gateway.url}{path}", timeout=10).status_code == 200
        assert_not_found(httpx.get(f"{gateway.url}{path}%0A", timeout=10))
    assert_not_found(httpx.delete(f"{gateway.url}/v1/personas/{persona}%0A", timeout=10))
    assert_not_found(httpx.delete(f"{gateway.url}/v1/voices/{voice}%0A", timeout=10))
    assert httpx.get(f"{gateway.url}/v1/personas/{persona}", timeout=10).status_code == 200, "still there"


def test_a_persona_voice_with_a_trailing_newline_is_refused(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.url}/v1/personas", json={"name": "p", "voice": "moshiko\n"}, timeout=10)
    assert response.status_code == 422, response.text
    assert "voice" in response.text


def test_the_moshi_socket_refuses_a_voice_with_a_trailing_newline(gateway: GatewayProcess) -> None:
    with connect(f"{gateway.ws_url}/api/chat?voice=moshiko%0A", open_timeout=10) as ws:
        message = ws.recv(timeout=10)
        assert isinstance(message, bytes) and message[0] == ERROR
        assert b"unknown voice" in message
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert ws.close_code == 1008 and ws.close_reason == "invalid_request"


def test_the_realtime_socket_refuses_a_voice_with_a_trailing_newline(gateway: GatewayProcess) -> None:
    with connect(f"{gateway.ws_url}/v1/realtime?model=moshiko", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "event_id": "e1", "session": {"voice": "moshiko\n"}}))
        event = json.loads(ws.recv(timeout=10))
    assert event["type"] == "error", event
    assert (event["error"]["code"], event["error"]["event_id"]) == ("invalid_request", "e1")
    assert "unknown voice" in event["error"]["message"]
