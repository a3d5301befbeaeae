"""The CPU floor of the conversation path's plumbing in Python: the least a gateway, a router and Redis can
spend per session-second to carry one frame each way, with none of Chorus's work. `bench_latency`'s
plumbing figure (target: ≤ 5 ms per session-second) cannot go below it in this design and this language.

The path is the one design.md mandates, stripped bare: N clients each send a binary 80 ms frame (3,840
bytes of PCM16, no codec, no JSON, no deflate) every 80 ms over a WebSocket to a `gateway` process
(`websockets`, the library uvicorn's protocol wraps), which appends it to the session's `in` stream;
a `worker` standing in for the dialogue (not counted) reads every session's `in` and, once a tick (80
ms), appends each session's frame to its `dlg` stream; a `router` reads every `dlg` and appends each
frame to the session's `out`; the gateway reads every `out` and sends each frame to its client. Every
stream read is one blocking `XREAD` over all sessions' streams, every round of appends one pipeline:
the batching Chorus does, and none of its per-frame work (validation, the speech detector, counters,
fencing, one entry per text and per audio, the session hash, leases, metrics, logs).

CPU (user + system from /proc) of the gateway, the router and redis-server over the window, divided by
the session-seconds carried (`out` appends × 80 ms), at each session count; `marginal` is the slope of
each process's busy CPU against the sessions, as `bench_latency` reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.bench_latency import _cpu_seconds

SESSIONS = tuple(int(n) for n in os.environ.get("CHORUS_BENCH_SESSIONS", "10,50").split(","))
WINDOW_S = float(os.environ.get("CHORUS_BENCH_SECONDS", "20"))
WARMUP_S = 3.0
FRAME_S = 0.08
PAYLOAD = b"\1" * 3840
MAXLEN = 100  # each stream's cap (approximate trim), as Chorus caps its streams


def _streams(kind: str, sessions: int) -> list[str]:
    return [f"floor:{i}:{kind}" for i in range(sessions)]


class _Reader:
    """One blocking `XREAD` over every session's stream of a kind, each stream's cursor kept."""

    def __init__(self, client: Any, kind: str, sessions: int) -> None:
        self.client = client
        self.cursors: dict[str, str] = dict.fromkeys(_streams(kind, sessions), "0-0")

    async def read(self) -> list[tuple[int, bytes]]:
        reply: Any = await self.client.xread(self.cursors, block=1000)
        frames = []
        for stream, entries in reply or []:
            name = stream.decode()
            session = int(name.split(":")[1])
            for entry_id, fields in entries:
                self.cursors[name] = entry_id
                frames.append((session, fields[b"pcm"]))
        return frames


async def _append(client: Any, kind: str, frames: list[tuple[int, bytes]]) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for session, pcm in frames:
            pipe.xadd(f"floor:{session}:{kind}", {"pcm": pcm}, maxlen=MAXLEN, approximate=True)
        await pipe.execute()


async def _gateway(url: str, port: int, sessions: int) -> None:
    import redis.asyncio as aioredis
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    writer, reader_client = aioredis.from_url(url), aioredis.from_url(url)
    sockets: dict[int, ServerConnection] = {}
    waiting: list[tuple[int, bytes]] = []
    woken = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        session = int(await connection.recv())
        sockets[session] = connection
        async for message in connection:
            assert isinstance(message, bytes)
            waiting.append((session, message))
            woken.set()

    async def write_in() -> None:  # what arrived during a loop turn, in one pipeline
        while True:
            await woken.wait()
            woken.clear()
            frames = waiting[:]
            waiting.clear()
            await _append(writer, "in", frames)

    async def send_out() -> None:
        reader = _Reader(reader_client, "out", sessions)
        while True:
            for session, pcm in await reader.read():
                if (connection := sockets.get(session)) is not None:
                    with contextlib.suppress(ConnectionClosed):  # a client done talking
                        await connection.send(pcm)

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=2**16):
        print("listening", flush=True)
        await asyncio.gather(write_in(), send_out())


async def _worker(url: str, sessions: int) -> None:
    """The dialogue's stand-in: each session's latest frame, all of them once a tick, in one pipeline."""
    import redis.asyncio as aioredis

    reader, writer = _Reader(aioredis.from_url(url), "in", sessions), aioredis.from_url(url)
    latest: dict[int, bytes] = {}

    async def read() -> None:
        while True:
            latest.update(await reader.read())

    async def tick() -> None:
        next_tick = time.monotonic()
        while True:
            next_tick += FRAME_S
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            if latest:
                frames = list(latest.items())
                latest.clear()
                await _append(writer, "dlg", frames)

    await asyncio.gather(read(), tick())


async def _router(url: str, sessions: int) -> None:
    import redis.asyncio as aioredis

    reader, writer = _Reader(aioredis.from_url(url), "dlg", sessions), aioredis.from_url(url)
    while True:
        frames = await reader.read()
        if frames:
            await _append(writer, "out", frames)


async def _clients(port: int, sessions: int, seconds: float) -> None:
    from websockets.asyncio.client import connect

    received = 0

    async def talk(session: int) -> None:
        nonlocal received
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=2**16) as connection:
            await connection.send(str(session))

            async def listen() -> None:
                nonlocal received
                async for _ in connection:
                    received += 1

            listening = asyncio.create_task(listen())
            next_send = time.monotonic() + session * FRAME_S / sessions  # spread over a tick
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                await connection.send(PAYLOAD)
                next_send += FRAME_S
            listening.cancel()

    await asyncio.gather(*(talk(i) for i in range(sessions)))
    print(json.dumps({"received": received}), flush=True)


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_relay_floor", *args], stdout=subprocess.PIPE, text=True
    )


def _xadd_calls(client: Any) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_xadd", {}).get("calls", 0))


def _commands(client: Any) -> int:
    stats = client.info("commandstats")
    return sum(int(v.get("calls", 0)) for k, v in stats.items() if k != "cmdstat_info")


def _point(sessions: int) -> dict[str, Any]:
    import redis

    from chorus.devtools.redis_server import EmbeddedRedis, free_port

    with EmbeddedRedis() as server:
        assert server.process is not None
        port = free_port()
        gateway = _child("gateway", server.url, str(port), str(sessions))
        assert gateway.stdout is not None and gateway.stdout.readline().strip() == "listening"
        router, worker = (
            _child("router", server.url, str(sessions)),
            _child("worker", server.url, str(sessions)),
        )
        clients = _child("clients", str(port), str(sessions), str(WARMUP_S + WINDOW_S + 2))
        pids = {"gateway": gateway.pid, "router": router.pid, "redis": server.process.pid}
        admin = redis.Redis.from_url(server.url)
        try:
            time.sleep(WARMUP_S)
            cpu, xadds, commands, began = (
                {n: _cpu_seconds(p) for n, p in pids.items()},
                _xadd_calls(admin),
                _commands(admin),
                time.monotonic(),
            )
            time.sleep(WINDOW_S)
            used = {n: _cpu_seconds(p) - cpu[n] for n, p in pids.items()}
            window_s = time.monotonic() - began
            appended = _xadd_calls(admin) - xadds  # in, dlg and out: one each per frame carried
            ran = _commands(admin) - commands
            out, _ = clients.communicate(timeout=60)
        finally:
            for child in (clients, router, worker, gateway):
                child.kill()
                child.wait()
            admin.close()
    session_s = appended / 3 * FRAME_S
    return {
        "sessions": sessions,
        "window_s": round(window_s, 2),
        "session_s": round(session_s, 1),
        "frames_per_s_per_session": round(appended / 3 / window_s / sessions, 2),
        "received_by_clients": json.loads(out.strip().splitlines()[-1])["received"],
        "busy_ms_per_s": {n: round(1000 * s / window_s, 2) for n, s in used.items()},
        "cpu_ms_per_session_s": {
            **{n: round(1000 * s / session_s, 3) for n, s in used.items()},
            "plumbing": round(1000 * sum(used.values()) / session_s, 3),
        },
        "redis_ops_per_session_s": round(ran / session_s, 1),
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )


def run() -> dict[str, Any]:
    load_average = Path("/proc/loadavg").read_text().split()[:3]
    rows = [_point(n) for n in SESSIONS]
    carried = [r["session_s"] / r["window_s"] for r in rows]  # sessions the window carried, in real time
    marginal: dict[str, float] = {}
    if len(rows) > 1:
        for name in ("gateway", "router", "redis"):
            marginal[name] = round(_slope(carried, [r["busy_ms_per_s"][name] for r in rows]), 3)
        marginal["plumbing"] = round(sum(marginal.values()), 3)
    return {
        "description": __doc__.split("\n\n")[0],
        "seconds_per_point": WINDOW_S,
        "frame_bytes": len(PAYLOAD),
        "rows": rows,
        "marginal_ms_per_session_s": marginal,
        "load_average_before": load_average,
    }


def _main(role: str, *args: str) -> None:
    if role == "gateway":
        asyncio.run(_gateway(args[0], int(args[1]), int(args[2])))
    elif role == "router":
        asyncio.run(_router(args[0], int(args[1])))
    elif role == "worker":
        asyncio.run(_worker(args[0], int(args[1])))
    elif role == "clients":
        asyncio.run(_clients(int(args[0]), int(args[1]), float(args[2])))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    _main(*sys.argv[1:])
