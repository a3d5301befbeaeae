"""Clients written with the official `openai` Python SDK hold conversations with Chorus, GA and beta
dialects, and every server event they get validates against the SDK's own types (`chorus.*` aside).

The test stack's Moshi has random weights: it never falls quiet, so its responses end when the client
cuts them (truncate, cancel), which is what these conversations do."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI

from shared.audio import (
    G711_RATE,
    SAMPLE_RATE,
    float_to_pcm16,
    g711_decode,
    g711_encode,
    pcm16_to_float,
    resample,
    rms_dbfs,
)
from tests.support.audio import speech_like
from tests.support.openai_conformance import conforming
from tests.support.stack import ChorusStack

CHUNK_S = 0.08


def client(stack: ChorusStack) -> AsyncOpenAI:
    # The beta client would turn http into wss, not ws: its WebSocket address is given.
    websocket_url = stack.url.replace("http://", "ws://", 1) + "/v1"
    return AsyncOpenAI(
        base_url=f"{stack.url}/v1", websocket_base_url=websocket_url, api_key="unused-when-auth-is-off"
    )


async def speak(connection: Any, wire: bytes, bytes_per_chunk: int) -> None:
    """Appends `wire` (already in the session's input format) at a microphone's pace."""
    for offset in range(0, len(wire), bytes_per_chunk):
        chunk = base64.b64encode(wire[offset : offset + bytes_per_chunk]).decode()
        await connection.send({"type": "input_audio_buffer.append", "audio": chunk})
        await asyncio.sleep(CHUNK_S)


async def events(connection: Any, *, beta: bool = False) -> AsyncIterator[dict[str, Any]]:
    """Every server event, each checked against the SDK's pydantic type of its `type`."""
    while True:
        yield conforming(await connection.recv_bytes(), beta=beta)


@contextlib.asynccontextmanager
async def speaking(connection: Any, wire: bytes, bytes_per_chunk: int) -> AsyncIterator[asyncio.Task[None]]:
    speaker = asyncio.create_task(speak(connection, wire, bytes_per_chunk))
    try:
        yield speaker
    finally:
        speaker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await speaker


PCM_SPEECH = float_to_pcm16(speech_like(8.0))
PCM_CHUNK = int(CHUNK_S * SAMPLE_RATE) * 2
CUT_MS = 400  # where the user interrupted Moshi's first response


async def quiet_after(connection: Any, response_id: str, *, beta: bool, seconds: float = 1.0) -> list[str]:
    """The audio deltas of `response_id` that still arrive within `seconds` (there must be none)."""
    late: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for event in events(connection, beta=beta):
                if event["type"].endswith("audio.delta") and event["response_id"] == response_id:
                    late.append(event["event_id"])
    return late


async def test_openai_sdk_client_holds_a_conversation(stack: ChorusStack) -> None:
    """Speak; interrupt Moshi's answer at 400 ms of its audio (`conversation.item.truncate`: the response is
    cancelled, its transcript keeps what was heard); read the item back; a text turn is refused."""
    received: dict[str, int] = {}
    heard: list[str] = []  # the transcript deltas that came before CUT_MS of the response's audio
    audio_ms = 0.0
    cut: dict[str, Any] = {}
    async with client(stack).realtime.connect(model="moshiko") as connection:
        await connection.session.update(
            session={
                "type": "realtime",
                "instructions": "You are a cheerful guide.",
                "chorus_events": False,  # ours: no `chorus.*` events for this session
                "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                    "output": {"voice": "moshiko"},
                },
            }
        )
        async with speaking(connection, PCM_SPEECH, PCM_CHUNK), asyncio.timeout(60):
            async for event in events(connection):
                received[event["type"]] = received.get(event["type"], 0) + 1
                kind = event["type"]
                if kind == "response.output_audio.delta" and not cut:
                    audio_ms += len(base64.b64decode(event["delta"])) / (2 * SAMPLE_RATE) * 1000
                    if audio_ms >= 1200:  # a second of Moshi's answer: the user interrupts it
                        cut = {"item_id": event["item_id"], "response_id": event["response_id"]}
                        await connection.conversation.item.truncate(
                            item_id=event["item_id"], content_index=0, audio_end_ms=CUT_MS
                        )
                elif kind == "response.output_audio_transcript.delta" and audio_ms < CUT_MS:
                    heard.append(event["delta"])
                elif kind == "response.done":
                    assert event["response"]["status"] == "cancelled", "the interrupted response"
                elif kind == "conversation.item.truncated":
                    assert (event["item_id"], event["audio_end_ms"]) == (cut["item_id"], CUT_MS)
                    await connection.conversation.item.retrieve(item_id=cut["item_id"])
                elif kind == "conversation.item.retrieved":
                    cut["transcript"] = event["item"]["content"][0]["transcript"]
                    text_turn = {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hi"}],
                    }
                    await connection.send(
                        {"type": "conversation.item.create", "event_id": "text1", "item": text_turn}
                    )
                elif kind == "error" and event["error"].get("event_id") == "text1":
                    assert event["error"]["code"] == "text_input_not_supported"
                    break
                elif kind == "error":
                    pytest.fail(f"server error: {event['error']['message']}")
            late = await quiet_after(connection, cut["response_id"], beta=False)
    assert received.get("session.created") == 1 and received.get("session.updated", 0) >= 1
    assert received.get("response.created", 0) >= 1
    assert not [kind for kind in received if kind.startswith("chorus.")], "chorus_events false: none sent"
    assert received.get("response.output_audio_transcript.delta"), "the transcript streams as text deltas"
    assert received.get("rate_limits.updated") == received.get("response.done") == 1, (
        "limits after a response"
    )
    lifecycle = ["response.output_item.added", "conversation.item.added", "response.content_part.added"]
    lifecycle += ["response.content_part.done", "response.output_item.done"]
    assert [received.get(kind) for kind in lifecycle] == [1] * 5, "the response's item is announced"
    assert cut["transcript"] == "".join(heard), "the item keeps the transcript heard until audio_end_ms"
    assert late == [], "no audio of the interrupted response after it"


async def test_a_beta_client_speaks_mu_law_at_8_khz_and_cancels(stack: ChorusStack) -> None:
    """A telephony bridge's dialect: beta events, G.711 μ-law at 8 kHz both ways; `response.cancel`."""
    narrow = float_to_pcm16(resample(speech_like(8.0), SAMPLE_RATE, G711_RATE))
    wire = g711_encode(narrow, "pcmu")
    received: dict[str, int] = {}
    reply = bytearray()
    cancelled = ""
    async with client(stack).beta.realtime.connect(model="moshiko") as connection:
        await connection.session.update(
            session={"input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw"}
        )
        async with speaking(connection, wire, int(CHUNK_S * G711_RATE)), asyncio.timeout(60):
            async for event in events(connection, beta=True):
                received[event["type"]] = received.get(event["type"], 0) + 1
                if event["type"] == "session.updated":
                    assert event["session"]["output_audio_format"] == "g711_ulaw"
                elif event["type"] == "response.audio.delta":
                    reply += base64.b64decode(event["delta"])
                    if len(reply) >= G711_RATE and not cancelled:  # a second of reply
                        await connection.response.cancel()
                        cancelled = event["response_id"]
                elif event["type"] == "response.done":
                    assert (event["response"]["id"], event["response"]["status"]) == (cancelled, "cancelled")
                    break
                elif event["type"] == "error":
                    pytest.fail(f"server error: {event['error']['message']}")
            late = await quiet_after(connection, cancelled, beta=True)
    assert received.get("session.created") == 1 and received.get("response.created", 0) >= 1
    assert "response.output_audio.delta" not in received, "beta clients get beta event names"
    assert late == [], "no audio delta of a cancelled response after its response.done"
    decoded = pcm16_to_float(g711_decode(bytes(reply), "pcmu"))
    assert len(decoded) == len(reply), "one byte per 8 kHz sample"
    assert rms_dbfs(decoded) > -50 and np.abs(decoded).max() < 1.0, "Moshi's voice, audible, comes back"
