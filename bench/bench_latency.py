"""The latency Chorus adds per 80 ms frame, at 1, 10 and 100 concurrent sessions on this machine.

Path: client send -> gateway -> Redis `:in` -> dialogue tick -> `:dlg` -> router -> `:out` -> gateway ->
client receive, through real processes (a `chorus` stack with the small checkpoints) and real WebSockets
(Moshi's protocol). All clocks are this machine's, so hops are measured from the entries' timestamps:

- forward: client send of frame k -> the gateway's `:in` entry k;
- total: client send of frame k -> the client receiving the text piece of dialogue frame k;
- model: the dialogue worker's own compute per tick (its `dialogue_step` histogram, same run);
- added = total - model: what Chorus's plumbing (and waiting for the next 80 ms tick) costs.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from shared.audio import FRAME_SEC
from shared.bus import Bus
from shared.messages import DIALOGUE, INPUT, DialogueFrame, UserAudio
from shared.redis_server import EmbeddedRedis
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
    from tests.e2e.helpers import MoshiClient, frames

    client = await MoshiClient.open(stack.ws_url, voice="moshiko")
    sent: list[float] = []
    received: list[tuple[float, str]] = []
    start = time.monotonic()
    wall_offset = time.time() - time.monotonic()
    for i, frame in enumerate(frames(samples)):
        opus = client.encoder.encode(frame)
        sent.append(time.monotonic() + wall_offset)
        if opus:
            await client.ws.send(bytes([0x01]) + opus)
        before = len(client.text)
        await client.drain(max(0.0, start + (i + 1) * FRAME_SEC - time.monotonic()))
        now = time.monotonic() + wall_offset
        received.extend((now, piece) for piece in client.text[before:])
    await client.ws.close()
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
    total: list[float] = []
    failed = 0
    try:
        for result in results:
            if isinstance(result, BaseException):
                failed += 1
                continue
            sid = result["session_id"]
            inputs = [INPUT.decode(e.fields) for e in await bus.range(bus.names.session_input(sid))]
            for message in inputs:
                if isinstance(message, UserAudio) and message.seq < len(result["sent"]):
                    forward.append(message.created_at - result["sent"][message.seq])
            spoken = [
                m
                for m in (DIALOGUE.decode(e.fields) for e in await bus.range(bus.names.session_dialogue(sid)))
                if isinstance(m, DialogueFrame) and m.text
            ]
            for frame, (received_at, _) in zip(spoken, result["received"], strict=False):
                if frame.seq < len(result["sent"]):
                    total.append(received_at - result["sent"][frame.seq])
    finally:
        await bus.close()
    added = [t - model_s for t in total]
    return {
        "sessions": sessions,
        "failed_sessions": failed,
        "model_step_ms": round(model_s * 1000, 1),
        "forward_hop": _percentiles(forward),
        "total": _percentiles(total),
        "added": _percentiles(added),
    }


def run() -> dict[str, Any]:
    from chorus.devtools.checkpoints import make_checkpoints
    from tests.e2e.stack import ChorusStack

    root = Path(__file__).resolve().parents[1]
    checkpoints = root / ".cache" / "checkpoints"
    make_checkpoints(checkpoints)
    rows = []
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        for count in SESSION_COUNTS:
            # One stack per count with exactly that many slots: a worker's batch is fixed, so empty
            # slots would still cost compute on every tick.
            stack = ChorusStack(
                redis.url,
                checkpoints,
                Path(tmp) / str(count),
                key_prefix=f"bench{uuid.uuid4().hex[:6]}:",
                extra_env={"CHORUS_DIALOGUE_SLOTS": str(count), "CHORUS_LOG_LEVEL": "WARNING"},
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
