"""What one hot-path Redis call costs the calling process in CPU: through redis-py's pool (a command, a
pipeline, a registered script) and through a `Lane` (a connection of the loop's own, commands packed and
sent together, raw replies parsed by the bus).

In process, against an embedded redis-server on this machine: each call repeated `CALLS` times, timed with
`time.thread_time` (this thread's CPU only: Redis's own work is in its process), pool and lane
alternating, `ROUNDS` times; the median of the rounds is reported. The calls are those of the
conversation path: the gateway's `:in` append (one user frame, `SharedWriter`), the router's output append
(10 sessions' text and audio, fenced), a `:out` read of one entry (`SharedReader` with one session), the
router's `read_when_woken` over 10 sessions' three streams, and a PING for the floor of any command.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from chorus.devtools.redis_server import EmbeddedRedis
from shared.audio import silence_frame
from shared.bus import Bus, Fence, Lane
from shared.messages import OutputAudio, OutputText, UserAudio
from shared.streams import StreamNames

CALLS = 1000
ROUNDS = 5
SESSIONS = 10
Call = Callable[[Lane | None], Awaitable[Any]]


async def cpu_us(call: Call, lane: Lane | None) -> float:
    for _ in range(CALLS // 10):
        await call(lane)
    started = time.thread_time()
    for _ in range(CALLS):
        await call(lane)
    return (time.thread_time() - started) / CALLS * 1e6


async def calls(bus: Bus) -> dict[str, Call]:
    names = bus.names
    sids = [f"s{i}" for i in range(SESSIONS)]
    for sid in sids:
        await bus.redis.hset(names.session(sid), mapping={"state": "live", "router_worker": "r"})
    pcm = silence_frame()
    seq = iter(range(10**9))

    def user_frame(lane: Lane | None) -> Awaitable[Any]:
        frame = UserAudio(session_id="s0", seq=next(seq), pcm=pcm)
        return bus.append_sessions({"s0": [(names.session_input("s0"), frame)]}, lane=lane)

    def router_output(lane: Lane | None) -> Awaitable[Any]:
        n = next(seq)
        writes = {
            sid: [
                (names.session_output(sid), OutputText(session_id=sid, seq=n, text="hi")),
                (names.session_output(sid), OutputAudio(session_id=sid, seq=n, pcm=pcm, source="native")),
            ]
            for sid in sids
        }
        return bus.append_sessions(writes, Fence("router_worker", "r"), lane=lane)

    await user_frame(None)
    for sid in sids:
        await bus.append_sessions(
            {sid: [(names.session_dialogue(sid), UserAudio(session_id=sid, seq=0, pcm=pcm))]}
        )
    single = names.session_control("s0")  # a stream of one entry
    await bus.redis.xadd(single, {b"pcm": pcm})
    one = {single: "0-0"}
    streams = [key for sid in sids for key in (names.session_dialogue(sid), names.session_tts(sid))]
    # Every session's dialogue stream holds one entry after '0-0': the pacing read wakes at once.
    everything = dict.fromkeys(streams + [names.session_input(sid) for sid in sids[1:]], "0-0")
    pacing = dict.fromkeys(streams, "0-0")
    return {
        "ping": lambda lane: lane.execute(("PING",)) if lane else bus.redis.ping(),
        "append one user frame (:in)": user_frame,
        f"append {SESSIONS} sessions' output (:out, fenced)": router_output,
        "read one entry (:out, one session)": lambda lane: bus.read(one, count=100, block_ms=100, lane=lane),
        f"read_when_woken over {SESSIONS} sessions": lambda lane: bus.read_when_woken(
            pacing, everything, count=50, block_ms=100, lane=lane
        ),
    }


async def measure() -> dict[str, dict[str, float]]:
    with EmbeddedRedis() as server:
        bus = await Bus.connect(server.url, StreamNames(prefix="bench:"))
        lane = bus.lane()
        try:
            results: dict[str, dict[str, float]] = {}
            for label, call in (await calls(bus)).items():
                pool, laned = [], []
                for _ in range(ROUNDS):
                    pool.append(await cpu_us(call, None))
                    laned.append(await cpu_us(call, lane))
                results[label] = {
                    "pool_us": round(statistics.median(pool), 1),
                    "lane_us": round(statistics.median(laned), 1),
                }
                print(f"   {label:45s} {results[label]}")
            return results
        finally:
            await lane.close()
            await bus.close()


def run() -> dict[str, Any]:
    load = Path("/proc/loadavg").read_text(encoding="ascii").split()[:3]
    return {"calls": CALLS, "rounds": ROUNDS, "load_average": load, "cpu_per_call": asyncio.run(measure())}
