"""The floor of one hop between two processes on this machine, with no work on either side: what Chorus's
added latency (`bench_latency`) cannot go below, however lean its code.

The added-latency path crosses two WebSocket hops (client -> gateway, gateway -> client) and two Redis hops
(dialogue -> `:dlg` -> router, router -> `:out` -> gateway), each between two Python processes on asyncio:

- `redis`: one process appends an 80 ms PCM16 frame (3,840 bytes) and its send time to a stream every 80 ms
  with redis-py (hiredis, as the services use it); another, blocked in `XREAD` on that stream, stamps each
  entry as it gets it;
- `websocket`: one process sends the same frame as a binary message every 80 ms with `websockets`; another,
  its server, stamps each message as it gets it.

Nothing else runs in either process, so the figure is the kernel's wake-ups, the loopback socket, Redis
and the two libraries' own per-message work. `floor_of_added_path` is two of each, p50s added.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from bench.bench_latency import percentiles

FRAMES = 200  # 16 s per hop kind, one frame per 80 ms
FRAME_S = 0.08
PAYLOAD = b"\0" * 3840


async def _redis_receiver(url: str) -> list[float]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    cursor: Any = "$"
    delays: list[float] = []
    try:
        while len(delays) < FRAMES:
            reply: Any = await client.xread({"floor": cursor}, block=5000, count=10)
            for _, entries in reply or []:
                now = time.time()
                for entry_id, fields in entries:
                    cursor = entry_id
                    delays.append(now - float(fields[b"t"]))
    finally:
        await client.aclose()
    return delays


async def _redis_sender(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        for _ in range(FRAMES + 20):  # more than received: the receiver may start after the first
            await client.xadd("floor", {"t": repr(time.time()), "pcm": PAYLOAD}, maxlen=100)
            await asyncio.sleep(FRAME_S)
    finally:
        await client.aclose()


async def _websocket_receiver(port: int) -> list[float]:
    from websockets.asyncio.server import ServerConnection, serve

    delays: list[float] = []
    done = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        async for message in connection:
            now = time.time()
            assert isinstance(message, bytes)
            delays.append(now - float(message[: message.index(b"|")]))
            if len(delays) >= FRAMES:
                done.set()
                return

    async with serve(handler, "127.0.0.1", port):
        print("listening", flush=True)  # the sender waits for this line
        await done.wait()
    return delays


async def _websocket_sender(port: int) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}", compression=None) as connection:
        for _ in range(FRAMES):
            await connection.send(repr(time.time()).encode() + b"|" + PAYLOAD)
            await asyncio.sleep(FRAME_S)


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_hop_floor", *args], stdout=subprocess.PIPE, text=True
    )


def _received(receiver: subprocess.Popen[str], sender: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = receiver.communicate(timeout=FRAMES * FRAME_S + 60)
    sender.wait(timeout=30)
    if receiver.returncode != 0 or sender.returncode != 0:
        raise RuntimeError(f"a child failed: receiver {receiver.returncode}, sender {sender.returncode}")
    return percentiles(json.loads(out.strip().splitlines()[-1]), digits=3)


def run() -> dict[str, Any]:
    from chorus.devtools.redis_server import EmbeddedRedis, free_port

    with EmbeddedRedis() as redis:
        receiver = _child("redis-receiver", redis.url)
        time.sleep(0.5)  # blocked in XREAD before the first append
        redis_hop = _received(receiver, _child("redis-sender", redis.url))
    port = free_port()
    receiver = _child("websocket-receiver", str(port))
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
    websocket_hop = _received(receiver, _child("websocket-sender", str(port)))
    return {
        "description": __doc__.split("\n\n")[0],
        "frames_per_hop": FRAMES,
        "redis_hop": redis_hop,
        "websocket_hop": websocket_hop,
        "floor_of_added_path_p50_ms": round(2 * redis_hop["p50_ms"] + 2 * websocket_hop["p50_ms"], 3),
    }


def _main(role: str, target: str) -> None:
    if role == "redis-receiver":
        print(json.dumps(asyncio.run(_redis_receiver(target))))
    elif role == "redis-sender":
        asyncio.run(_redis_sender(target))
    elif role == "websocket-receiver":
        print(json.dumps(asyncio.run(_websocket_receiver(int(target)))))
    elif role == "websocket-sender":
        asyncio.run(_websocket_sender(int(target)))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
