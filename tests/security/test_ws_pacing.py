"""Input audio is paced in seconds of audio, against a real gateway with real dialogue and router workers.

Before: a 1 MiB realtime append was 16 s of audio pushed to Redis at once, and at the allowed message
rate one socket could push ~1,600 s of audio per second (the router runs VAD on all of it). Now each
socket may send `CHORUS_WS_AUDIO_PACE` (1.5x real time) after a burst of `CHORUS_WS_AUDIO_BURST_S` (2 s):
a client sending faster waits (its socket is not read meanwhile), and one message carrying more than the
burst is refused with a reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from shared.audio import SAMPLE_RATE
from tests.support.stack import ChorusStack

PACE = 1.5  # the defaults
BURST_S = 2.0


def append(seconds: float) -> str:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = (3000 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


async def next_event(ws: ClientConnection, *types: str, timeout_s: float = 30) -> dict[str, Any]:
    """The next event of one of these types (Moshi's answer, audio deltas and the like are skipped)."""
    async with asyncio.timeout(timeout_s):
        while True:
            event: dict[str, Any] = json.loads(await ws.recv())
            if event["type"] in types:
                return event


async def test_audio_sent_faster_than_the_pace_waits(socket_stack: ChorusStack) -> None:
    audio_s, piece_s = 8.0, 0.2
    async with connect(f"{socket_stack.ws_url}/v1/realtime?model=moshiko", max_size=1 << 24) as ws:
        await next_event(ws, "session.created")
        started = time.monotonic()
        for _ in range(round(audio_s / piece_s)):
            await ws.send(append(piece_s))
        # Answered in order: once every append before it was taken in.
        await ws.send(json.dumps({"type": "session.update", "event_id": "after_audio", "session": {}}))
        await next_event(ws, "session.updated")
        elapsed_s = time.monotonic() - started
    floor_s = (audio_s - BURST_S) / PACE
    print(
        f"\n{audio_s:g} s of audio sent at once was taken in over {elapsed_s:.1f} s "
        f"({audio_s / elapsed_s:.2f}x real time; the pace allows {PACE}x after a {BURST_S:g} s burst)"
    )
    assert elapsed_s >= 0.9 * floor_s


async def test_one_message_with_more_audio_than_the_burst_is_refused_with_a_reason(
    socket_stack: ChorusStack,
) -> None:
    async with connect(f"{socket_stack.ws_url}/v1/realtime?model=moshiko", max_size=1 << 24) as ws:
        await next_event(ws, "session.created")
        await ws.send(append(3.0))
        error = (await next_event(ws, "error"))["error"]
        # The socket stays usable.
        await ws.send(json.dumps({"type": "session.update", "session": {}}))
        await next_event(ws, "session.updated")
    print(f"\nrefused: {error}")
    assert error["code"] == "payload_too_large"
    assert "3.00 s of audio" in error["message"]
