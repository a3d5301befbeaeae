"""Control work of one worker as the fleet grows: per-session control streams against the shared tail.

A real redis-server; a fleet of N live sessions (N = 10, 100, 1000), each sending `RATE` control entries a
second (updates and flushes, alternately) from a writer in another process; one worker owning `OWNED` of
them. For each N, both designs in the same run, one after the other:

- `shared_tail` (before): every worker tailed all of chorus:control and decoded every entry, applying the
  few that were its own (the removed `SessionOwnership.follow_control(start=...)`, reproduced here);
- `per_session` (now): the worker reads only its sessions' control streams (`SessionOwnership.follow_control`
  over `SessionControl`), in one blocking XREAD.

Measured over `MEASURE_S` after `WARMUP_S`, in the worker's process (the writer's work is not in it):
control entries decoded a second, those that were its own, and CPU milliseconds a second
(`time.process_time`).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from chorus.devtools.redis_server import EmbeddedRedis
from shared.bus import Bus, tail
from shared.messages import (
    CONTROL,
    ControlMessage,
    Envelope,
    SessionFlush,
    SessionStart,
    SessionStop,
    SessionUpdate,
)
from shared.ownership import RecentStops, SessionOwnership
from shared.sessions import SessionStore
from shared.streams import StreamNames

FLEETS = (10, 100, 1000)
OWNED = 8
RATE = 2.0  # control entries a second per session (a barge-in's flush, a voice update)
WARMUP_S = 1.0
MEASURE_S = 4.0
TICK_S = 0.05


def control_entry(sid: str, n: int) -> Envelope:
    return SessionUpdate(session_id=sid, voice="moshika") if n % 2 else SessionFlush(session_id=sid)


async def write_fleet(url: str, prefix: str, design: str, sids: list[str], stop_after_s: float) -> None:
    """The fleet's control traffic, paced in ticks: to chorus:control (before) or each session's stream."""
    names = StreamNames(prefix)
    bus = await Bus.connect(url, names)
    per_tick = len(sids) * RATE * TICK_S
    sent, due, started = 0, 0.0, time.monotonic()
    try:
        while (now := time.monotonic()) - started < stop_after_s:
            due += per_tick
            batch = []
            while sent < int(due):
                sid = sids[sent % len(sids)]
                stream = names.control if design == "shared_tail" else names.session_control(sid)
                batch.append((stream, control_entry(sid, sent // len(sids))))
                sent += 1
            await bus.append_many(batch)
            await asyncio.sleep(max(0.0, TICK_S - (time.monotonic() - now)))
    finally:
        await bus.close()


def writer_process(url: str, prefix: str, design: str, sids: list[str], stop_after_s: float) -> None:
    asyncio.run(write_fleet(url, prefix, design, sids, stop_after_s))


async def shared_tail(
    bus: Bus, stop: asyncio.Event, apply: Callable[[ControlMessage], Awaitable[None]]
) -> None:
    """The design before: tail all of chorus:control, remember every stop, hand every entry to `apply`."""
    stops = RecentStops()
    async for message, _ in tail(bus, bus.names.control, CONTROL, stop=stop):
        if isinstance(message, SessionStop):
            stops.remember(message.session_id)
        await apply(message)


async def measure(url: str, design: str, fleet: int) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    bus = await Bus.connect(url, StreamNames(prefix))
    store = SessionStore(bus, 600)
    sids = [f"s{i:04d}" for i in range(fleet)]
    for sid in sids:
        await store.create(SessionStart(session_id=sid), lease_s=600)
    worker = SessionOwnership(bus, store, service="tts", group="tts", worker_id="w1", field="tts_worker")
    own = set(sids[:: fleet // OWNED][:OWNED])  # spread over the writer's round, so theirs arrive apart
    for sid in own:
        await worker.take(sid)
    counts = {"decoded": 0, "own": 0}

    async def apply(message: ControlMessage) -> None:
        counts["decoded"] += 1
        counts["own"] += message.session_id in own

    stop = asyncio.Event()
    reader = shared_tail(bus, stop, apply) if design == "shared_tail" else worker.follow_control(stop, apply)
    task = asyncio.create_task(reader)
    writer = multiprocessing.get_context("spawn").Process(
        target=writer_process, args=(url, prefix, design, sids, WARMUP_S + MEASURE_S + 1.0)
    )
    writer.start()
    await asyncio.sleep(WARMUP_S)
    before, cpu, wall = dict(counts), time.process_time(), time.monotonic()
    await asyncio.sleep(MEASURE_S)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    decoded, owned = counts["decoded"] - before["decoded"], counts["own"] - before["own"]
    stop.set()
    await task
    await asyncio.to_thread(writer.join)
    await bus.close()
    return {
        "design": design,
        "fleet_sessions": fleet,
        "owned_sessions": OWNED,
        "fleet_entries_per_s": round(fleet * RATE, 1),
        "decoded_per_s": round(decoded / wall, 1),
        "own_entries_per_s": round(owned / wall, 1),
        "cpu_ms_per_s": round(1000 * cpu / wall, 2),
    }


async def _measure_all(url: str) -> list[dict[str, Any]]:
    await measure(url, "per_session", FLEETS[0])  # warm-up (first connections, first calls): not kept
    await measure(url, "shared_tail", FLEETS[0])
    rows = []
    for fleet in FLEETS:
        for design in ("shared_tail", "per_session"):
            row = await measure(url, design, fleet)
            print(f"   {row}", flush=True)
            rows.append(row)
    return rows


def run() -> dict[str, Any]:
    with EmbeddedRedis() as redis:
        rows = asyncio.run(_measure_all(redis.url))
    return {
        "what": f"one worker's control reading while the fleet grows (it owns {OWNED} sessions; each of the "
        f"fleet's sessions sends {RATE:g} control entries a second)",
        "owned_sessions": OWNED,
        "rate_per_session": RATE,
        "measure_s": MEASURE_S,
        "rows": rows,
        "machine": "this CPU machine (shared), redis-server on localhost",
    }
