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

What the plumbing costs, over the measured window (sessions x its wall time = session-seconds):

- `idle_cpu_ms_per_s`: what each process spends per second with no session (heartbeats, presence,
  polling), measured just before; it is taken out of the figures below, which are the sessions' own;
- `cpu_ms_per_session_s`: CPU time (user + system, from /proc, the process and its children) per
  session-second of each process: gateway, router, tts, redis-server, the dialogue worker in all and
  outside its model step (`dialogue_loop`: its event loop's thread; the model runs in a thread of its own);
  `plumbing` = gateway + router + Redis;
- `redis_ops_per_session_s`: Redis commands per session-second, from `INFO commandstats` (commands a Lua
  script runs count too: they cost Redis the same), in all and per command (`evalsha`: the append
  script's runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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

# CHORUS_BENCH_SESSIONS="1,10" measures fewer points (100 sessions take long on a small machine).
SESSION_COUNTS = tuple(int(n) for n in os.environ.get("CHORUS_BENCH_SESSIONS", "1,10,100").split(","))
SECONDS_PER_SESSION = 4.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_WINDOW_S = 3.0


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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of the processes in its process group (its children)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
        if int(entry.name) == pid or int(fields[2]) == pid:  # fields[2]: the process group
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return total


def _thread_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread (where a service runs its event loop)."""
    try:
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    cpu = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    cpu["dialogue_loop"] = _thread_cpu_seconds(pids["dialogue"])
    return cpu


async def _command_calls(redis_url: str) -> dict[str, int]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def _idle_cpu_per_s(pids: dict[str, int], window_s: float = IDLE_WINDOW_S) -> dict[str, float]:
    """CPU seconds per second each process spends with no session (heartbeats, presence, polling)."""
    before = _cpu_by_process(pids)
    await asyncio.sleep(window_s)
    return {name: (cpu - before[name]) / window_s for name, cpu in _cpu_by_process(pids).items()}


def _per_session_s(before: dict[str, float], after: dict[str, float], session_s: float) -> dict[str, float]:
    return {k: (after.get(k, 0) - before.get(k, 0)) / session_s for k in after}


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


async def _measure(stack: Any, redis_pid: int, sessions: int) -> dict[str, Any]:
    samples = (0.1 * np.random.default_rng(0).standard_normal(int(SECONDS_PER_SESSION * 24_000))).astype(
        np.float32
    )
    metrics_url = f"http://127.0.0.1:{stack.ports['dialogue']}/metrics"
    pids = {name: process.pid for name, process in stack.processes.items()} | {"redis": redis_pid}
    sum0, count0 = _model_step_seconds(metrics_url)
    idle = await _idle_cpu_per_s(pids)
    cpu0 = _cpu_by_process(pids)
    calls0 = await _command_calls(stack.redis_url)
    began = time.monotonic()
    results = await asyncio.gather(
        *(_one_session(stack, samples) for _ in range(sessions)), return_exceptions=True
    )
    window_s = time.monotonic() - began
    session_s = sessions * window_s
    calls1 = await _command_calls(stack.redis_url)
    cpu1 = _cpu_by_process(pids)
    sum1, count1 = _model_step_seconds(metrics_url)
    model_s = (sum1 - sum0) / max(1.0, count1 - count0)
    # What the sessions cost: the window's CPU less what the processes spend idle over as long.
    busy = {name: cpu1[name] - cpu0[name] - idle[name] * window_s for name in cpu1}
    cost = _plumbing_cost(_per_session_s({}, busy, session_s), (sum1 - sum0) / session_s)
    ops = _per_session_s(calls0, calls1, session_s)  # type: ignore[arg-type]
    ops.pop("info", None)  # the benchmark's own
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
        "idle_cpu_ms_per_s": {name: round(rate * 1000, 2) for name, rate in idle.items()},
        "cpu_ms_per_session_s": cost,
        "redis_ops_per_session_s": round(sum(ops.values()), 1),
        "redis_ops_by_command": {k: round(v, 1) for k, v in sorted(ops.items()) if v},
    }


def _plumbing_cost(cpu_s: dict[str, float], model_s: float) -> dict[str, float]:
    """CPU ms per session-second per process, and the dialogue's model step (wall time) for scale."""
    cost = {name: round(seconds * 1000, 2) for name, seconds in cpu_s.items()}
    cost["dialogue_model_step_wall"] = round(model_s * 1000, 2)
    cost["plumbing"] = round(cost["gateway"] + cost["router"] + cost["redis"], 2)
    return cost


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
                assert redis.process is not None
                row = asyncio.run(_measure(stack, redis.process.pid, count))
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
