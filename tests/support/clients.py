"""Small clients for the e2e tests: real WebSockets, real Opus, real HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared.audio import FRAME_SAMPLES, FRAME_SEC, OpusDecoder, OpusEncoder, float_to_pcm16, pcm16_to_float

HANDSHAKE, AUDIO, TEXT, ERROR = 0x00, 0x01, 0x02, 0x05


def frames(samples: np.ndarray) -> list[np.ndarray]:
    padded = np.pad(samples, (0, (-len(samples)) % FRAME_SAMPLES)).astype(np.float32)
    return list(padded.reshape(-1, FRAME_SAMPLES))


async def send_paced(
    samples: np.ndarray,
    send_frame: Callable[[np.ndarray], Awaitable[None]],
    drain: Callable[[], Awaitable[None]],
    *,
    realtime: bool,
) -> None:
    """Send `samples` frame by frame, at the pace a microphone would (unless not `realtime`), reading
    whatever arrives between two frames."""
    start = time.monotonic()
    for i, frame in enumerate(frames(samples)):
        await send_frame(frame)
        if realtime:
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_SEC - time.monotonic()))
        await drain()


@dataclass
class MoshiClient:
    ws: ClientConnection
    session_id: str
    audio: list[np.ndarray] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    encoder: OpusEncoder = field(default_factory=OpusEncoder)
    decoder: OpusDecoder = field(default_factory=OpusDecoder)

    @classmethod
    async def open(cls, ws_url: str, **query: str) -> MoshiClient:
        from urllib.parse import urlencode

        ws = await connect(f"{ws_url}/api/chat?{urlencode(query)}", open_timeout=30, max_size=1 << 22)
        first = await asyncio.wait_for(ws.recv(), 60)
        assert isinstance(first, bytes)
        if first[0] != HANDSHAKE:
            await ws.close()
            raise ConnectionRefusedError(first[1:].decode(errors="replace"))
        session_id = ws.response.headers.get("x-chorus-session-id", "") if ws.response else ""
        return cls(ws, session_id)

    async def send_audio(self, samples: np.ndarray, *, realtime: bool = True) -> None:
        await send_paced(samples, self.send_frame, self.drain, realtime=realtime)

    async def send_frame(self, frame: np.ndarray) -> None:
        opus = self.encoder.encode(frame)
        if opus:  # the encoder may hold a frame back
            await self.ws.send(bytes([AUDIO]) + opus)

    async def drain(self, wait_s: float = 0.0) -> None:
        """Read whatever has arrived (or for `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(self.ws.recv(), timeout or 0.001)
            except TimeoutError:
                return
            assert isinstance(message, bytes)
            kind, payload = message[0], message[1:]
            if kind == AUDIO:
                self.audio.append(self.decoder.decode(payload))
            elif kind == TEXT:
                self.text.append(payload.decode())
            elif kind == ERROR:
                self.errors.append(payload.decode())

    @property
    def audio_seconds(self) -> float:
        return sum(len(a) for a in self.audio) / 24_000

    async def close(self) -> None:
        """Close, reading what still arrives meanwhile: the server's close frame queues behind the audio
        it sent, and a client that stops reading waits out its own close timeout."""
        closing = asyncio.create_task(self.ws.close())
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.ws:
                pass
        await closing


@dataclass
class RealtimeClient:
    """A raw-JSON Realtime client (the official SDK is exercised in its own test)."""

    ws: ClientConnection
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def open(cls, ws_url: str, **query: str) -> RealtimeClient:
        from urllib.parse import urlencode

        ws = await connect(
            f"{ws_url}/v1/realtime?{urlencode({'model': 'moshiko', **query})}",
            open_timeout=30,
            max_size=1 << 22,
        )
        client = cls(ws)
        await client.wait_for("session.created")
        return client

    async def send(self, event: dict[str, Any] | str) -> None:
        await self.ws.send(event if isinstance(event, str) else json.dumps(event))

    async def append(self, samples: np.ndarray, *, realtime: bool = True) -> None:
        await send_paced(samples, self.append_frame, self.drain, realtime=realtime)

    async def append_frame(self, frame: np.ndarray) -> None:
        audio = base64.b64encode(float_to_pcm16(frame)).decode()
        await self.send({"type": "input_audio_buffer.append", "audio": audio})

    async def drain(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                return
            self.events.append(json.loads(raw))

    async def wait_for(self, event_type: str, timeout_s: float = 30, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event["type"] == event_type and all(event.get(k) == v for k, v in match.items()):
                    return event
            seen = len(self.events)
            await self.drain(0.1)
        raise AssertionError(
            f"no {event_type} {match} within {timeout_s}s; got {[e['type'] for e in self.events][-30:]}"
        )

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]

    def audio_seconds(self) -> float:
        return (
            sum(len(base64.b64decode(e["delta"])) // 2 for e in self.of_type("response.output_audio.delta"))
            / 24_000
        )


def decode_delta(event: dict[str, Any]) -> np.ndarray:
    return pcm16_to_float(base64.b64decode(event["delta"]))


async def upload_voice(
    base_url: str, wav_path: str, name: str = "test voice", api_key: str | None = None
) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        with open(wav_path, "rb") as f:
            response = await http.post(
                "/v1/voices",
                files={"file": ("clip.wav", f, "audio/wav")},
                data={"name": name, "consent": "true"},
                headers=headers,
            )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])
