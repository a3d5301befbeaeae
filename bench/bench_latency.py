"""The latency Chorus adds per 80 ms frame, at 1, 10 and 100 concurrent sessions on this machine.

Path: client send -> gateway -> Redis `:in` -> dialogue tick -> `:dlg` -> router -> `:out` -> gateway ->
client receive, through real processes (a `chorus` stack with the small checkpoints, one dialogue slot per
session) and real WebSockets (Moshi's protocol). All clocks are this machine's, so each hop is measured
from the entries' own timestamps:

- forward: client send of frame k -> the gateway's `:in` entry k in Redis;
- return: the dialogue writing a frame's text to `:dlg` -> router -> gateway -> the client receiving it;
- added = forward + return per frame: Chorus's plumbing. Not in it: the model's compute (`model_step`,
  the dialogue's own per-tick histogram in the same run) and the wait for the next 80 ms tick (0-80 ms,
  inherent to a fixed-rate model).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed

from chorus.devtools.redis_server import EmbeddedRedis
from shared.audio import FRAME_SEC
from shared.bus import Bus
from shared.messages import DIALOGUE, INPUT, DialogueFrame, UserAudio
from shared.streams import StreamNames

SESSION_COUNTS = (1, 10, 100)
SECONDS_PER_SESSION = 4.0


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    arr = np.asarray(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 1),
        "p99_ms": round(float(np.percentile(arr, 99)), 1),
        "n": len(values),
    }


def _model_step_seconds(metrics_url: str) -> tuple[float, float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        match = re.search(rf'^{name}{{stage="dialogue_step"}} ([0-9.e+-]+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("chorus_stage_latency_seconds_sum"), value("chorus_stage_latency_seconds_count")


async def _one_session(stack: Any, samples: np.ndarray) -> dict[str, Any]:
    from tests.support.clients import MoshiClient, frames

    client = await MoshiClient.open(stack.ws_url, voice="moshiko")
    sent: list[float] = []
    received: list[float] = []

    async def receive() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in client.ws:
                if isinstance(message, bytes) and message[:1] == b"\x02":
                    received.append(time.time())  # stamped on arrival, not when a loop gets to it

    receiver = asyncio.create_task(receive())
    start = time.monotonic()
    for i, frame in enumerate(frames(samples)):
        opus = client.encoder.encode(frame)
        sent.append(time.time())
        if opus:
            await client.ws.send(bytes([0x01]) + opus)
        await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_SEC - time.monotonic()))
    await asyncio.sleep(0.5)
    await client.ws.close()
    await asyncio.gather(receiver, return_exceptions=True)
    return {"session_id": client.session_id, "sent": sent, "received": received}


async def _measure(stack: Any, sessions: int) -> dict[str, Any]:
    samples = (0.1 * np.random.default_rng(0).standard_normal(int(SECONDS_PER_SESSION * 24_000))).astype(
        np.float32
    )
    metrics_url = f"http://127.0.0.1:{stack.ports['dialogue']}/metrics"
    sum0, count0 = _model_step_seconds(metrics_url)
    results = await asyncio.gather(
        *(_one_session(stack, samples) for _ in range(sessions)), return_exceptions=True
    )
    sum1, count1 = _model_step_seconds(metrics_url)
    model_s = (sum1 - sum0) / max(1.0, count1 - count0)
    bus = await Bus.connect(stack.redis_url, StreamNames(stack.key_prefix))
    forward: list[float] = []
    back: list[float] = []
    failed = 0
    try:
        for result in results:
            if isinstance(result, BaseException):
                failed += 1
                continue
            sid = result["session_id"]
            for entry in await bus.range(bus.names.session_input(sid)):
                message = INPUT.decode(entry.fields)
                if isinstance(message, UserAudio) and message.seq < len(result["sent"]):
                    forward.append(message.created_at - result["sent"][message.seq])
            spoken = [
                m
                for m in (DIALOGUE.decode(e.fields) for e in await bus.range(bus.names.session_dialogue(sid)))
                if isinstance(m, DialogueFrame) and m.text
            ]
            # Text pieces reach the client in order, one per :dlg frame with text.
            back.extend(r - f.created_at for f, r in zip(spoken, result["received"], strict=False))
    finally:
        await bus.close()
    n = min(len(forward), len(back))
    rng = np.random.default_rng(1)
    added = list(rng.choice(forward, n) + rng.choice(back, n)) if n else []
    return {
        "sessions": sessions,
        "failed_sessions": failed,
        "model_step_ms": round(model_s * 1000, 1),
        "forward_hop": _percentiles(forward),
        "return_hop": _percentiles(back),
        "added": _percentiles(added),
    }


def run() -> dict[str, Any]:
    from chorus.devtools.checkpoints import make_checkpoints
    from tests.support.stack import ChorusStack

    root = Path(__file__).resolve().parents[1]
    checkpoints = root / ".cache" / "checkpoints"
    make_checkpoints(checkpoints)
    rows = []
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        for count in SESSION_COUNTS:
            # One stack per count with exactly that many slots: a worker's batch is fixed, so empty
            # slots would still cost compute on every tick.
            stack = ChorusStack(
                workdir=Path(tmp) / str(count),
                redis_url=redis.url,
                checkpoints=checkpoints,
                key_prefix=f"bench{uuid.uuid4().hex[:6]}:",
                extra_env={
                    "CHORUS_DIALOGUE_SLOTS": str(count),
                    "CHORUS_MAX_SESSIONS_PER_KEY": "0",  # one anonymous owner opens them all
                    "CHORUS_LOG_LEVEL": "WARNING",
                },
            )
            try:
                stack.start_all()
                row = asyncio.run(_measure(stack, count))
            finally:
                stack.stop_all()
            print(f"   {count:>3} sessions: {row}", flush=True)
            rows.append(row)
    return {
        "description": __doc__.split("\n\n")[0],
        "seconds_per_session": SECONDS_PER_SESSION,
        "model": "small generated checkpoints (CHORUS_MOSHI_DIR), CPU",
        "rows": rows,
    }
