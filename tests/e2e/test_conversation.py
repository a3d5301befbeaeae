"""Conversations end to end: real gateway, router, dialogue (Moshi) and TTS (Pocket TTS) processes,
real redis-server, real WebSockets, small generated checkpoints."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import numpy as np
import pytest

from shared.bus import Bus
from shared.messages import OUTPUT, OutputAudio, SessionEvent
from shared.streams import StreamNames
from tests.e2e.conftest import DIALOGUE_SLOTS
from tests.support.audio import SPEECH_WAV, speech_like
from tests.support.clients import MoshiClient, RealtimeClient, upload_voice
from tests.support.stack import ChorusStack
from tests.support.waiting import wait_until


async def out_entries(stack: ChorusStack, session_id: str) -> list[object]:
    bus = await Bus.connect(stack.redis_url, StreamNames(stack.key_prefix))
    try:
        return [OUTPUT.decode(e.fields) for e in await bus.range(bus.names.session_output(session_id))]
    finally:
        await bus.close()


async def free_slots(stack: ChorusStack) -> int:
    bus = await Bus.connect(stack.redis_url, StreamNames(stack.key_prefix))
    try:
        from shared.presence import list_workers

        return sum(w.free_slots for w in await list_workers(bus, "dialogue"))
    finally:
        await bus.close()


@pytest.fixture(scope="module")
async def voice_id(stack: ChorusStack) -> str:
    return await upload_voice(stack.url, str(SPEECH_WAV))


async def test_moshi_protocol_native_voice_streams_opus_audio_and_text(stack: ChorusStack) -> None:
    client = await MoshiClient.open(stack.ws_url, voice="moshiko")
    assert client.session_id.startswith("sess_")
    await client.send_audio(speech_like(2.0))
    await client.drain(1.0)
    await client.ws.close()
    assert client.audio_seconds > 1.0, "Moshi's native audio reaches the client as Ogg/Opus"
    assert client.text, "text pieces reach the client"
    assert not client.errors
    sources = {e.source for e in await out_entries(stack, client.session_id) if isinstance(e, OutputAudio)}
    assert sources == {"native"}


async def test_cloned_voice_mode_speaks_through_pocket_tts(stack: ChorusStack, voice_id: str) -> None:
    client = await MoshiClient.open(stack.ws_url, voice=f"profile:{voice_id}", voice_mode="cloned")
    await client.send_audio(speech_like(4.0))
    await client.drain(1.0)
    await client.ws.close()
    entries = await out_entries(stack, client.session_id)
    audio = [e for e in entries if isinstance(e, OutputAudio)]
    assert audio and all(e.source == "cloned" for e in audio), "Moshi's own audio is muted in cloned mode"
    assert any(np.frombuffer(e.pcm, "<i2").any() for e in audio), "cloned speech (not only silence) was sent"


async def test_a_catalog_voice_speaks_through_pocket_tts_without_any_clip(stack: ChorusStack) -> None:
    client = await MoshiClient.open(stack.ws_url, voice="catalog:alba", voice_mode="cloned")
    await client.send_audio(speech_like(4.0))
    await client.drain(1.0)
    await client.ws.close()
    audio = [e for e in await out_entries(stack, client.session_id) if isinstance(e, OutputAudio)]
    assert audio and all(e.source == "cloned" for e in audio)
    assert any(np.frombuffer(e.pcm, "<i2").any() for e in audio), "speech in the catalog voice was sent"


async def test_realtime_voice_switch_mid_session_is_announced(stack: ChorusStack, voice_id: str) -> None:
    client = await RealtimeClient.open(stack.ws_url)
    await client.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "You are terse.",
                "audio": {"output": {"voice": "moshiko"}},
            },
        }
    )
    await client.wait_for("session.updated")
    await client.append(speech_like(1.5))
    await client.send({"type": "session.update", "session": {"voice": f"profile:{voice_id}"}})
    await client.append(speech_like(3.0))
    event = await client.wait_for("chorus.event", name="voice_changed", timeout_s=20)
    assert event["data"]["source"] == "cloned"
    await client.ws.close()


async def test_two_concurrent_sessions_with_different_voices(stack: ChorusStack, voice_id: str) -> None:
    native = await MoshiClient.open(stack.ws_url, voice="moshiko")
    cloned = await MoshiClient.open(stack.ws_url, voice=f"profile:{voice_id}", voice_mode="cloned")
    await asyncio.gather(
        native.send_audio(speech_like(3.0, seed=1)), cloned.send_audio(speech_like(3.0, seed=2))
    )
    await asyncio.gather(native.drain(1.0), cloned.drain(1.0))
    await asyncio.gather(native.ws.close(), cloned.ws.close())
    native_sources = {
        e.source for e in await out_entries(stack, native.session_id) if isinstance(e, OutputAudio)
    }
    cloned_sources = {
        e.source for e in await out_entries(stack, cloned.session_id) if isinstance(e, OutputAudio)
    }
    assert native_sources == {"native"} and cloned_sources == {"cloned"}
    assert native.audio_seconds > 1.0 and cloned.audio_seconds > 1.0


async def test_malformed_messages_get_errors_and_the_session_goes_on(stack: ChorusStack) -> None:
    client = await MoshiClient.open(stack.ws_url)
    await client.ws.send("not binary")
    await client.ws.send(bytes([0x07, 1, 2, 3]))
    await client.ws.send(bytes([0x01]) + b"this is not ogg")
    await client.send_audio(speech_like(1.5))
    await client.drain(1.0)
    assert len(client.errors) >= 2, client.errors
    assert client.audio_seconds > 0.5, "the socket stays usable after bad messages"
    await client.ws.close()

    realtime = await RealtimeClient.open(stack.ws_url)
    await realtime.send("{not json")
    await realtime.send({"type": "no.such.event"})
    await realtime.send({"type": "input_audio_buffer.append", "audio": "@@@not base64"})
    await realtime.send(
        {
            "type": "session.update",
            "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}}},
        }
    )
    await realtime.drain(1.0)
    codes = [e["error"]["code"] for e in realtime.of_type("error")]
    assert codes == ["invalid_json", "unsupported_event", "invalid_request", "invalid_request"], codes
    await realtime.append(speech_like(1.0))
    await realtime.wait_for("response.output_audio.delta")
    await realtime.ws.close()


async def test_an_abrupt_disconnect_frees_the_dialogue_slot_within_three_seconds(stack: ChorusStack) -> None:
    # The tests before this one may still be ending their sessions: start from every slot free, so the
    # count coming back is this session's slot.
    async def settled() -> int:
        free = await free_slots(stack)
        return free if free >= DIALOGUE_SLOTS else 0

    before = await wait_until(settled, "earlier sessions to free their slots", 10)

    async def slot_back() -> bool:
        return await free_slots(stack) >= before

    client = await MoshiClient.open(stack.ws_url)
    await client.send_audio(speech_like(0.5))
    # Drop the TCP connection without a WebSocket close frame.
    raw: socket.socket = client.ws.transport.get_extra_info("socket")  # type: ignore[union-attr]
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.ws.transport.abort()  # type: ignore[union-attr]
    closed_at = time.monotonic()
    await wait_until(slot_back, "the slot freed after the disconnect", 3.0)

    # The dialogue worker frees the slot as it writes `ended`; the router relays that to :out a hop later.
    async def ended_relayed() -> bool:
        entries = await out_entries(stack, client.session_id)
        return any(isinstance(e, SessionEvent) and e.name == "ended" for e in entries)

    await wait_until(
        ended_relayed, "`ended` on the session's output stream", 3.0 - (time.monotonic() - closed_at)
    )


async def test_a_realtime_switch_to_the_other_models_voice_mid_session_is_refused(stack: ChorusStack) -> None:
    """The stack runs moshiko: moshika mid-session was accepted and announced (`session.updated` said
    moshika) while moshiko's audio kept playing. It is refused, and the session keeps its voice."""
    client = await RealtimeClient.open(stack.ws_url)
    await client.append(speech_like(1.0))
    await client.wait_for("response.output_audio.delta", timeout_s=30)  # the conversation runs
    await client.send({"type": "session.update", "session": {"audio": {"output": {"voice": "moshika"}}}})
    error = await client.wait_for("error")
    assert error["error"]["code"] == "invalid_request" and "runs on moshiko" in error["error"]["message"]
    await client.send({"type": "session.update", "session": {"chorus_events": True}})
    updated = await client.wait_for("session.updated")
    assert updated["session"]["audio"]["output"]["voice"] == "moshiko"
    await client.ws.close()
