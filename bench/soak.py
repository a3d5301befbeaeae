"""`make soak`: a whole Chorus stack under steady churn for a long time (30 minutes by default).

Real processes (gateway, router, dialogue, tts) on the small generated checkpoints and their own
redis-server, CONCURRENT Moshi-protocol clients streaming audio in real time; each session lasts a random
20-90 s and is replaced by a new one at once, a quarter of them in a cloned voice. Measured:

- RSS of every service process and Redis `used_memory`, sampled every 15 s under load: the mean of the
  last quarter of the run against the first quarter after a warm-up (flat = within 10 %): nothing grows
  with the number of sessions served;
- frames lost: the audio frames each client received against one per 80 ms of its session after the
  handshake; the services' own drop counters;
- slots leaked: after the last client closed, every dialogue slot is free again, no session is live and
  no worker owns one.

`python -m bench.soak --minutes 30 --sessions 4` writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus

from chorus.devtools.redis_server import EmbeddedRedis
from shared.bus import Bus
from shared.streams import StreamNames

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"
AUDIO = 0x01
WARMUP_S = 60.0  # memory is compared from here: imports, caches and pools have settled


@dataclass
class Tally:
    sessions: int = 0
    refused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    expected_frames: int = 0
    received_frames: int = 0


SAMPLE_S = 15.0


async def sample_memory(
    stack: Any, redis: EmbeddedRedis, bus: Bus, until: float, *, period_s: float
) -> list[dict[str, Any]]:
    """A memory snapshot every `period_s` until `until` (the clients talking all along)."""
    samples = []
    while time.monotonic() < until - period_s / 2:
        await asyncio.sleep(period_s)
        samples.append(await snapshot(stack, redis, bus))
    return samples


def _mean(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Per process RSS and Redis used memory, averaged: sessions come and go, a single sample is noisy."""
    keys = [*samples[0]["rss_mb"], "redis_used_memory_mb"]
    return {k: round(sum(x["rss_mb"].get(k, x.get(k, 0.0)) for x in samples) / len(samples), 2) for k in keys}


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a service is one process)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return round(int(match.group(1)) / 1024, 1) if match else 0.0


async def snapshot(stack: Any, redis: EmbeddedRedis, bus: Bus) -> dict[str, Any]:
    info = await bus.redis.info("memory")
    assert redis.process is not None
    return {
        "at_s": round(time.monotonic(), 1),
        "rss_mb": {name: rss_mb(p.pid) for name, p in stack.processes.items()},
        "redis_used_memory_mb": round(int(info["used_memory"]) / 2**20, 2),
        "redis_rss_mb": rss_mb(redis.process.pid),
        "redis_keys": int(await bus.redis.dbsize()),
    }


async def one_session(stack: Any, voice: str, seconds: float, tally: Tally) -> None:
    from tests.support.audio import speech_like
    from tests.support.clients import MoshiClient, frames

    try:
        client = await MoshiClient.open(stack.ws_url, voice=voice)
    except (ConnectionRefusedError, InvalidStatus, OSError, TimeoutError) as exc:
        tally.refused.append(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(1.0)
        return
    tally.sessions += 1
    received = 0

    async def receive() -> None:
        nonlocal received
        with contextlib.suppress(ConnectionClosed):
            async for message in client.ws:
                if isinstance(message, bytes) and message[:1] == bytes([AUDIO]):
                    received += 1

    receiver = asyncio.create_task(receive())
    opened = time.monotonic()
    try:
        for i, frame in enumerate(frames(speech_like(seconds, seed=random.randrange(1000)))):
            opus = client.encoder.encode(frame)
            if opus:
                await client.ws.send(bytes([AUDIO]) + opus)
            await asyncio.sleep(max(0.0, opened + (i + 1) * 0.08 - time.monotonic()))
    except ConnectionClosed as exc:
        tally.failed.append(f"closed by the server: {exc}")
    finally:
        lasted = time.monotonic() - opened
        await client.ws.close()
        receiver.cancel()
    tally.expected_frames += int(lasted / 0.08)
    tally.received_frames += received


async def client_loop(stack: Any, voices: list[str], deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        seconds = min(random.uniform(20, 90), max(5.0, deadline - time.monotonic()))
        await one_session(stack, random.choice(voices), seconds, tally)


def metric_total(url: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for labels, value in re.findall(rf"^{name}{{([^}}]*)}} ([0-9.e+-]+)$", text, re.M):
        totals[labels] = totals.get(labels, 0.0) + float(value)
    return totals


async def leaks(bus: Bus, capacity: int) -> dict[str, Any]:
    """What is still held once every client has gone (after the lease time)."""
    from shared.presence import list_workers

    names = bus.names
    free = sum(w.free_slots for w in await list_workers(bus, "dialogue"))
    live: list[str] = []
    owned: list[str] = []
    async for key in bus.redis.scan_iter(match=f"{names.prefix}session:*", count=500):
        if key.count(b":") == names.prefix.count(":") + 1:  # the hashes, not :transcript / :lease
            state = await bus.redis.hget(key, "state")
            if state and state != b"ended":
                live.append(key.decode())
    async for key in bus.redis.scan_iter(match=f"{names.prefix}owned:*", count=100):
        owned.extend(m.decode() for m in await bus.redis.smembers(key))
    return {"free_slots": free, "capacity": capacity, "live_sessions": live, "owned_sessions": owned}


async def soak(minutes: float, sessions: int, workdir: Path) -> dict[str, Any]:
    from chorus.devtools.checkpoints import make_checkpoints
    from tests.support.audio import SPEECH_WAV
    from tests.support.clients import upload_voice
    from tests.support.stack import ChorusStack

    make_checkpoints(CHECKPOINTS)
    with EmbeddedRedis() as redis:
        prefix = f"soak{uuid.uuid4().hex[:6]}:"
        env = {
            "CHORUS_DIALOGUE_SLOTS": str(sessions),
            "CHORUS_MAX_SESSIONS_PER_KEY": str(2 * sessions),
            "CHORUS_SESSION_LEASE_S": "10",
        }
        stack = ChorusStack(
            workdir=workdir, redis_url=redis.url, checkpoints=CHECKPOINTS, key_prefix=prefix, extra_env=env
        )
        bus = await Bus.connect(redis.url, StreamNames(prefix))
        try:
            stack.start_all()
            voice_id = await upload_voice(stack.url, str(SPEECH_WAV))
            voices = ["moshiko", "moshiko", "moshiko", f"profile:{voice_id}"]
            tally = Tally()
            started = time.monotonic()
            deadline = started + minutes * 60
            clients = [
                asyncio.create_task(client_loop(stack, voices, deadline, tally)) for _ in range(sessions)
            ]
            samples = await sample_memory(stack, redis, bus, deadline, period_s=SAMPLE_S)
            await asyncio.gather(*clients)
            await asyncio.sleep(15)  # every stop applied, every lease lapsed (10 s), streams lingered out
            idle = await snapshot(stack, redis, bus)
            held = await leaks(bus, sessions)
            dropped = metric_total(
                f"http://127.0.0.1:{stack.ports['dialogue']}/metrics", "chorus_frames_dropped_total"
            )
        finally:
            await bus.close()
            stack.stop_all()
    warm = [x for x in samples if x["at_s"] - started >= min(WARMUP_S, minutes * 60 / 4)]
    window = max(1, len(warm) // 4)
    first, last = _mean(warm[:window]), _mean(warm[-window:])
    growth = {name: round(last[name] / first[name] - 1, 3) for name in first}
    return {
        "minutes": minutes,
        "concurrent_sessions": sessions,
        "sessions_served": tally.sessions,
        "sessions_refused": len(tally.refused),
        "refusals": tally.refused[:10],
        "sessions_failed": len(tally.failed),
        "failures": tally.failed[:10],
        "frames_expected": tally.expected_frames,
        "frames_received": tally.received_frames,
        "frames_lost_ratio": round(1 - tally.received_frames / max(1, tally.expected_frames), 4),
        "dialogue_frames_dropped": dropped,
        "memory_first_quarter_mean": first,
        "memory_last_quarter_mean": last,
        "memory_after_the_last_client": idle,
        "memory_samples": samples,
        "growth": growth,
        "flat_within_10_percent": all(abs(g) <= 0.10 for g in growth.values()),
        "after_the_last_client": held,
        "slots_leaked": held["capacity"] - held["free_slots"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument(
        "--sessions",
        type=int,
        default=4,
        help="concurrent sessions (= dialogue slots); 4 is what this 2-core machine holds in real time with "
        "the whole stack and the clients on it",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chorus-soak-") as workdir:
        result = asyncio.run(soak(args.minutes, args.sessions, Path(workdir)))
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps({k: result[k] for k in ("sessions_served", "frames_lost_ratio", "growth", "slots_leaked")})
    )
    print(f"wrote {out}")
    return 0 if result["slots_leaked"] == 0 and not result["after_the_last_client"]["live_sessions"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
