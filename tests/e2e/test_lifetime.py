"""Lifetime policies end to end: a session ends at its maximum length, or after its idle timeout without
user speech, with a reason the client can act on (a moshi 0x05 / a realtime `error` with the code, close
1000 with the code as its reason), its session detail's `end_reason` and the gateway's metric.

The e2e stack's workers serve a second gateway process with small limits (`MAX_SESSION_S`, `IDLE_S`);
the realtime `idle_timeout_ms` is tested on the stack's own gateway (no idle timeout of its own). User
speech is the recorded clip, looped: the router's silero detector hears it as one long utterance."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from chorus.devtools.redis_server import free_port
from tests.support.audio import SPEECH_WAV
from tests.support.clients import MoshiClient, RealtimeClient
from tests.support.stack import ChorusStack
from tests.support.tts import read_clip
from tests.support.waiting import wait_until_blocking

LIFETIME_GATEWAY = "gateway-lifetime"
MAX_SESSION_S = 5.0
IDLE_S = 1.0
ENDS_WITHIN_S = 60.0  # a bound for a stuck test, not a timing claim
SILENCE = np.zeros(24_000, dtype=np.float32)


@pytest.fixture(scope="module")
def lifetime_url(stack: ChorusStack) -> Iterator[str]:
    """A gateway with small lifetime limits, on the e2e stack's Redis and workers."""
    port = stack.ports[LIFETIME_GATEWAY] = free_port(stack.ports.values())
    stack.start(
        "gateway",
        LIFETIME_GATEWAY,
        CHORUS_PORT=str(port),
        CHORUS_MAX_SESSION_S=str(MAX_SESSION_S),
        CHORUS_IDLE_TIMEOUT_S=str(IDLE_S),
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        stack.assert_running()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        return False

    try:
        wait_until_blocking(ready, "the lifetime gateway ready", 60)
        yield url
    finally:
        stack.stop(LIFETIME_GATEWAY)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_clip(SPEECH_WAV)


async def keep_sending(send: Any, samples: np.ndarray) -> float:
    """Send `samples` at a microphone's pace, again and again, until the server closes the socket; returns
    when that was (monotonic)."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(ENDS_WITHIN_S):
            while True:
                await send(samples)
    return time.monotonic()


async def end_reason(base_url: str, session_id: str) -> str | None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        detail = (await http.get(f"/v1/sessions/{session_id}")).json()
    assert detail["state"] == "ended", detail
    return detail["end_reason"]  # type: ignore[no-any-return]


def ended_metric(metrics_text: str, reason: str) -> float:
    prefix = f'chorus_sessions_ended_total{{reason="{reason}"}} '
    return sum(float(line[len(prefix) :]) for line in metrics_text.splitlines() if line.startswith(prefix))


async def test_idle_and_maximum_length_end_sessions_with_their_reason_and_spare_the_others(
    lifetime_url: str, speech: np.ndarray
) -> None:
    ws_url = lifetime_url.replace("http", "ws", 1)
    silent, talking = await asyncio.gather(MoshiClient.open(ws_url), MoshiClient.open(ws_url))
    realtime = await RealtimeClient.open(ws_url)  # its first audio starts its session
    silent_end, talking_end, _ = await asyncio.gather(
        keep_sending(silent.send_audio, SILENCE),
        keep_sending(talking.send_audio, speech),
        keep_sending(realtime.append, speech),
    )
    for client in (silent, talking):
        with contextlib.suppress(ConnectionClosed):
            await client.drain(0.1)
    assert (silent.ws.close_code, silent.ws.close_reason) == (1000, "idle_timeout")
    assert any("no speech from the user" in error for error in silent.errors), silent.errors
    assert (talking.ws.close_code, talking.ws.close_reason) == (1000, "session_expired")
    assert any("maximum length" in error for error in talking.errors), talking.errors
    assert silent_end < talking_end, "a session whose user speaks is not cut by the idle timeout"
    assert talking.audio_seconds > IDLE_S, "the concurrent session went on after the idle one ended"

    assert (realtime.ws.close_code, realtime.ws.close_reason) == (1000, "session_expired")
    errors = realtime.of_type("error")
    assert errors and errors[-1]["error"]["code"] == "session_expired", errors
    assert not realtime.of_type("input_audio_buffer.timeout_triggered"), "its user spoke throughout"

    assert await end_reason(lifetime_url, silent.session_id) == "idle_timeout"
    assert await end_reason(lifetime_url, talking.session_id) == "session_expired"
    async with httpx.AsyncClient(base_url=lifetime_url) as http:
        metrics_text = (await http.get("/metrics")).text
    assert ended_metric(metrics_text, "idle_timeout") >= 1
    assert ended_metric(metrics_text, "session_expired") >= 2


async def test_realtime_idle_timeout_ms_ends_a_silent_session_with_timeout_triggered(
    stack: ChorusStack,
) -> None:
    client = await RealtimeClient.open(stack.ws_url)
    turn_detection: dict[str, Any] = {"type": "server_vad", "idle_timeout_ms": 10}
    await client.send(
        {"type": "session.update", "session": {"audio": {"input": {"turn_detection": turn_detection}}}}
    )
    refused = await client.wait_for("error")
    assert "idle_timeout_ms must be from 1000" in refused["error"]["message"]

    turn_detection["idle_timeout_ms"] = round(IDLE_S * 1000)
    await client.send(
        {"type": "session.update", "session": {"audio": {"input": {"turn_detection": turn_detection}}}}
    )
    updated = await client.wait_for("session.updated")
    assert updated["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 1000
    session_id = updated["session"]["id"]

    await keep_sending(client.append, SILENCE)
    triggered = client.of_type("input_audio_buffer.timeout_triggered")
    assert len(triggered) == 1, [e["type"] for e in client.events][-10:]
    assert 0 <= triggered[0]["audio_start_ms"] <= triggered[0]["audio_end_ms"]
    error = client.events[client.events.index(triggered[0]) + 1]
    assert error["type"] == "error" and error["error"]["code"] == "idle_timeout", error
    assert (client.ws.close_code, client.ws.close_reason) == (1000, "idle_timeout")
    assert await end_reason(stack.url, session_id) == "idle_timeout"


async def test_a_realtime_socket_that_never_sends_audio_is_ended_by_the_idle_timeout(
    lifetime_url: str,
) -> None:
    """Its conversation starts with its first audio: before this, no policy ended it, whatever the limits."""
    client = await RealtimeClient.open(lifetime_url.replace("http", "ws", 1))
    with contextlib.suppress(ConnectionClosed):
        await client.drain(MAX_SESSION_S)  # until the server closes the socket
    errors = client.of_type("error")
    assert [e["error"]["code"] for e in errors] == ["idle_timeout"], client.events
    assert (client.ws.close_code, client.ws.close_reason) == (1000, "idle_timeout")
