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

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from shared.audio import SAMPLE_RATE, OggPages
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


def decode_cpu_s(stack: ChorusStack) -> float:
    """The gateway's CPU seconds in the Opus decoder so far (its /metrics)."""
    sample = 'chorus_codec_cpu_seconds{direction="decode"} '
    lines = httpx.get(f"{stack.url}/metrics", timeout=10).text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith(sample))


async def test_moshi_audio_that_fails_to_decode_is_charged_to_the_pace_without_being_decoded(
    socket_stack: ChorusStack,
) -> None:
    """Found by an attack on /api/chat: 5 s of 20 ms packets and one more in one message. sphn decoded the
    5 s, then raised, and a message that did not decode was charged nothing, so one socket had the gateway
    decode ~440 s of audio a second. Now the audio a message carries is counted from its packets before
    the decoder runs: this one is more than the burst, so it is refused, charged a full burst, and never
    decoded. A message refused as not Ogg/Opus at all (here a page whose CRC is wrong) is charged a frame,
    so that even counting what is refused is paced."""
    rng = np.random.default_rng(0)
    packets = [b"\xf8" + rng.bytes(199) for _ in range(251)]  # CELT fullband, 20 ms each: 5.02 s
    writer = OggPages(serial=7)
    pages = [packets[at : at + 40] for at in range(0, len(packets), 40)]
    too_long = b"\x01" + b"".join(writer.page([len(p) for p in page], b"".join(page), 0) for page in pages)
    corrupt = bytearray(b"\x01" + writer.page([200], packets[0], 0))
    corrupt[-1] ^= 0xFF
    messages = [too_long, bytes(corrupt)] * 3
    decoded_before = decode_cpu_s(socket_stack)
    async with connect(f"{socket_stack.ws_url}/api/chat?voice=moshiko", max_size=1 << 24) as ws:
        assert await ws.recv() == b"\x00"  # the handshake: placed
        started = time.monotonic()
        for message in messages:
            await ws.send(message)
        errors: list[bytes] = []
        async with asyncio.timeout(60):
            while len(errors) < len(messages):
                if (reply := await ws.recv())[:1] == b"\x05":
                    assert isinstance(reply, bytes)
                    errors.append(reply[1:])
        elapsed_s = time.monotonic() - started
    decoded_s = decode_cpu_s(socket_stack) - decoded_before
    print(
        f"\n{len(messages)} refused over {elapsed_s:.1f} s, {decoded_s * 1000:.1f} ms decoding: {errors[:2]}"
    )
    assert [b"carries 5.02 s of audio" in e for e in errors] == [True, False] * 3, errors
    assert all(b"CRC does not match" in e for e in errors[1::2]), errors
    assert decoded_s < 0.002, "never decoded"
    charged_s = 3 * BURST_S + 3 * 0.08  # a burst for each message over it, a frame for each corrupt one
    assert elapsed_s >= 0.9 * (charged_s - BURST_S) / PACE, "each refusal charged"
