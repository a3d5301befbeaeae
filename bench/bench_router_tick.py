"""The router's own CPU per session and tick: `Router.route_once` over 10 native-voice sessions (Moshi's
audio passed through, a text piece every other tick, a quiet user frame per tick), against an embedded
redis-server on this machine.

Each session's `:dlg` and `:in` are filled with `TICKS` real entries first (written as the dialogue and
the gateway write them), then the router reads one of each per session and round (`router_read_count`
= 1), so a round is one tick for every session: its read, the speech detector (the energy gate: silero is
measured elsewhere), the mixer and its fenced `:out` write. Timed with `time.thread_time` (this thread's
CPU only: Redis's own work is in its process), `ROUNDS` times; the median is reported, in µs per session
and tick, with the load average.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from chorus.devtools.redis_server import EmbeddedRedis
from services.router.mixer import Mixer
from services.router.routing import RoutedSession, Router
from services.router.settings import RouterSettings
from services.router.speech import EnergyGate, SpeechEdges
from shared.audio import FRAME_SAMPLES
from shared.bus import Bus
from shared.messages import DialogueFrame, Envelope, UserAudio
from shared.streams import StreamNames

SESSIONS = 10
TICKS = 500
ROUNDS = 5
# Moshi's audio and a user's quiet room: non-zero samples, so no path can tell them from speech by shape.
NATIVE = bytes(range(256)) * (FRAME_SAMPLES * 2 // 256)
QUIET = b"\x03\x00" * FRAME_SAMPLES


async def fill(bus: Bus, sids: list[str]) -> None:
    names = bus.names
    for tick in range(1, TICKS + 1):
        writes: dict[str, list[tuple[str, Envelope]]] = {}
        for sid in sids:
            text = " hello" if tick % 2 else ""
            writes[sid] = [
                (names.session_dialogue(sid), DialogueFrame(session_id=sid, seq=tick, pcm=NATIVE, text=text)),
                (names.session_input(sid), UserAudio(session_id=sid, seq=tick, pcm=QUIET)),
            ]
        await bus.append_sessions(writes)


async def one_round(bus: Bus, round_no: int) -> float:
    """CPU µs per session and tick over `TICKS` rounds of fresh sessions."""
    settings = RouterSettings(worker_id="bench-router", router_read_count=1)
    router = Router(bus, settings, EnergyGate())
    sids = [f"r{round_no}s{i}" for i in range(SESSIONS)]
    names = bus.names
    fence = router.ownership.fence
    for sid in sids:
        await bus.redis.hset(names.session(sid), mapping={"state": "live", fence.field: fence.token})
        streams = [names.session_dialogue(sid), names.session_tts(sid), names.session_input(sid)]
        router.sessions[sid] = RoutedSession(
            sid, Mixer(sid), router.detector.stream(), SpeechEdges(), dict.fromkeys(streams, "0-0")
        )
    await fill(bus, sids)
    try:
        started = time.thread_time()
        for _ in range(TICKS):
            await router.route_once()
        return (time.thread_time() - started) / TICKS / SESSIONS * 1e6
    finally:
        await router._lane.close()
        for sid in sids:
            await bus.expire_session(sid)


async def measure() -> list[float]:
    with EmbeddedRedis() as server:
        bus = await Bus.connect(server.url, StreamNames(prefix="bench:"))
        try:
            return [round(await one_round(bus, n), 1) for n in range(ROUNDS)]
        finally:
            await bus.close()


def run() -> dict[str, Any]:
    rounds = asyncio.run(measure())
    load = Path("/proc/loadavg").read_text(encoding="ascii").split()[:3]
    print(
        f"   route_once: {statistics.median(rounds)} µs per session and tick (rounds {rounds}, load {load})"
    )
    return {
        "sessions": SESSIONS,
        "ticks": TICKS,
        "rounds_us": rounds,
        "us_per_session_tick": statistics.median(rounds),
        "load_average": load,
    }
