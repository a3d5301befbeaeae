"""A client written with the official `openai` Python SDK holds a conversation with Chorus."""

from __future__ import annotations

import asyncio
import base64

import pytest
from openai import AsyncOpenAI

from shared.audio import float_to_pcm16
from tests.support.audio import speech_like
from tests.support.stack import ChorusStack


async def test_openai_sdk_client_holds_a_conversation(stack: ChorusStack) -> None:
    client = AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused-when-auth-is-off")
    received: dict[str, int] = {}
    transcript: list[str] = []
    audio_bytes = 0
    async with client.realtime.connect(model="moshiko") as connection:
        await connection.session.update(
            session={
                "type": "realtime",
                "instructions": "You are a cheerful guide.",
                "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                    "output": {"voice": "moshiko"},
                },
            }
        )
        pcm = float_to_pcm16(speech_like(3.0))

        async def speak() -> None:
            for offset in range(0, len(pcm), 3840):
                await connection.input_audio_buffer.append(
                    audio=base64.b64encode(pcm[offset : offset + 3840]).decode()
                )
                await asyncio.sleep(0.08)

        speaker = asyncio.create_task(speak())
        async with asyncio.timeout(60):
            async for event in connection:
                received[event.type] = received.get(event.type, 0) + 1
                if event.type == "response.output_audio.delta":
                    audio_bytes += len(base64.b64decode(event.delta))
                elif event.type == "response.output_audio_transcript.delta":
                    transcript.append(event.delta)
                elif event.type == "error":
                    pytest.fail(f"server error: {event.error.message}")
                if speaker.done() and audio_bytes > 24_000 * 2:
                    break
        await speaker
    assert received.get("session.created") == 1 and received.get("session.updated", 0) >= 1
    assert received.get("response.created", 0) >= 1
    assert audio_bytes > 24_000 * 2, "at least a second of audio came back"
    assert transcript, "the transcript streams as text deltas"
