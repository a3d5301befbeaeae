"""`chorus talk IN.wav --out OUT.wav`: a client that holds one conversation with a running Chorus.

It streams the file in real time (one 80 ms frame every 80 ms, then `--tail` seconds of silence so Chorus
can answer the end), records everything Chorus says, and writes the reply audio (WAV, 24 kHz) and a
transcript JSON. `--protocol moshi` speaks Moshi's binary protocol on /api/chat, `--protocol realtime`
the OpenAI Realtime events on /v1/realtime.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import sphn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared.audio import (
    FRAME_SAMPLES,
    FRAME_SEC,
    SAMPLE_RATE,
    FloatAudio,
    OpusDecoder,
    OpusEncoder,
    float_to_pcm16,
    pcm16_to_float,
    resample,
)

HANDSHAKE, AUDIO, TEXT, ERROR = 0x00, 0x01, 0x02, 0x05


@dataclass
class Reply:
    session_id: str = ""
    audio: list[FloatAudio] = field(default_factory=list)
    pieces: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def text(self, piece: str) -> None:
        self.pieces.append({"t": round(time.monotonic() - self.started, 3), "text": piece})

    @property
    def samples(self) -> FloatAudio:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype=np.float32)


def load_input(path: Path) -> FloatAudio:
    data, rate = sphn.read(str(path))
    mono = np.asarray(data, dtype=np.float32).mean(axis=0)
    return resample(mono, int(rate), SAMPLE_RATE)


def frames_of(samples: FloatAudio, tail_s: float) -> list[FloatAudio]:
    padded = np.concatenate([samples, np.zeros(int(tail_s * SAMPLE_RATE), dtype=np.float32)])
    padded = np.pad(padded, (0, (-len(padded)) % FRAME_SAMPLES))
    return list(padded.reshape(-1, FRAME_SAMPLES))


async def paced(frames: list[FloatAudio]) -> Any:
    """Yield frames at real-time pace (the clock, not the sleeps, decides when)."""
    start = time.monotonic()
    for i, frame in enumerate(frames):
        delay = start + i * FRAME_SEC - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield frame


def ws_url(base: str, path: str, query: dict[str, str]) -> str:
    scheme_base = base.replace("https://", "wss://").replace("http://", "ws://").rstrip("/")
    query = {k: v for k, v in query.items() if v}
    return f"{scheme_base}{path}" + (f"?{urlencode(query)}" if query else "")


async def talk_moshi(args: argparse.Namespace, frames: list[FloatAudio], headers: dict[str, str]) -> Reply:
    reply = Reply()
    url = ws_url(args.url, "/api/chat", {"voice": args.voice or "", "persona": args.persona or ""})
    async with connect(url, additional_headers=headers, open_timeout=30, max_size=1 << 22) as ws:
        reply.session_id = ws.response.headers.get("x-chorus-session-id", "") if ws.response else ""
        first = await asyncio.wait_for(ws.recv(), 60)
        if not isinstance(first, bytes) or first[:1] != bytes([HANDSHAKE]):
            raise SystemExit(
                f"no handshake: {first[1:].decode(errors='replace') if isinstance(first, bytes) else first}"
            )
        decoder, encoder = OpusDecoder(), OpusEncoder()

        async def receive() -> None:
            async for message in ws:
                if not isinstance(message, bytes) or not message:
                    continue
                kind, payload = message[0], message[1:]
                if kind == AUDIO:
                    reply.audio.append(decoder.decode(payload))
                elif kind == TEXT:
                    reply.text(payload.decode())
                elif kind == ERROR:
                    reply.errors.append(payload.decode(errors="replace"))

        receiver = asyncio.create_task(receive())
        async for frame in paced(frames):
            opus = encoder.encode(frame)
            if opus:
                await ws.send(bytes([AUDIO]) + opus)
        await ws.close()
        await asyncio.gather(receiver, return_exceptions=True)
    return reply


async def talk_realtime(args: argparse.Namespace, frames: list[FloatAudio], headers: dict[str, str]) -> Reply:
    reply = Reply()
    url = ws_url(args.url, "/v1/realtime", {"persona": args.persona or ""})  # no model: the persona's voice
    async with connect(url, additional_headers=headers, open_timeout=30, max_size=1 << 22) as ws:
        created = json.loads(await asyncio.wait_for(ws.recv(), 30))
        reply.session_id = created.get("session", {}).get("id", "")
        if args.voice:
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"type": "realtime", "audio": {"output": {"voice": args.voice}}},
                    }
                )
            )

        async def receive(connection: ClientConnection) -> None:
            async for raw in connection:
                event = json.loads(raw)
                kind = event.get("type", "")
                if kind == "response.output_audio.delta":
                    reply.audio.append(pcm16_to_float(base64.b64decode(event["delta"])))
                elif kind == "response.output_audio_transcript.delta":
                    reply.text(event["delta"])
                elif kind == "error":
                    reply.errors.append(event["error"]["message"])
                elif not kind.startswith("response.output_audio"):
                    reply.events.append(
                        {"type": kind, **({"name": event["name"]} if "name" in event else {})}
                    )

        receiver = asyncio.create_task(receive(ws))
        async for frame in paced(frames):
            await ws.send(
                json.dumps(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(float_to_pcm16(frame)).decode(),
                    }
                )
            )
        await ws.close()
        await asyncio.gather(receiver, return_exceptions=True)
    return reply


def write_outputs(reply: Reply, args: argparse.Namespace) -> Path:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(args.out), reply.samples, SAMPLE_RATE)
    transcript_path: Path = args.transcript or args.out.with_suffix(".json")
    transcript = {
        "session_id": reply.session_id,
        "protocol": args.protocol,
        "voice": args.voice,
        "persona": args.persona,
        "text": "".join(p["text"] for p in reply.pieces),
        "pieces": reply.pieces,
        "reply_seconds": round(len(reply.samples) / SAMPLE_RATE, 2),
        "events": reply.events,
        "errors": reply.errors,
    }
    transcript_path.write_text(json.dumps(transcript, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return transcript_path


def talk(args: argparse.Namespace) -> int:
    frames = frames_of(load_input(args.input), args.tail)
    key = args.api_key or os.environ.get("CHORUS_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    run = talk_moshi if args.protocol == "moshi" else talk_realtime
    try:
        reply = asyncio.run(run(args, frames, headers))
    except (OSError, ConnectionClosed, TimeoutError) as exc:
        print(f"chorus talk: cannot hold a conversation at {args.url}: {exc}", file=sys.stderr)
        return 2
    transcript_path = write_outputs(reply, args)
    print(
        f"session {reply.session_id}: {len(reply.samples) / SAMPLE_RATE:.1f}s of reply audio -> {args.out}, "
        f"transcript -> {transcript_path}"
    )
    for error in reply.errors:
        print(f"server error: {error}", file=sys.stderr)
    return 1 if reply.errors and not reply.audio else 0
