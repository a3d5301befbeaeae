"""Failover: from `kill -9` of the dialogue worker serving a session to the client's next audio frame.

A `chorus` stack of real processes (gateway, router, two dialogue workers, the small generated checkpoint,
default heartbeat/TTL/poll settings), one Moshi-protocol client streaming audio in real time. Each round
opens a session, lets audio flow, kills the worker serving it, and times:

- `kill_to_audio`: the kill -> the first audio frame the client receives after it (what the user hears as
  a gap, minus the audio already in flight);
- `silence`: the last audio frame received before the kill -> the first after it.

The killed worker is started again before the next round (so two workers are always there). Death is
detected from presence (CHORUS_WORKER_TTL_S), not from a claim timeout; the rest is the takeover poll
(CHORUS_FAILOVER_POLL_S), priming (persona primer and transcript tail) and the router's next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed

from chorus.devtools.redis_server import EmbeddedRedis
from shared.bus import Bus
from shared.settings import CommonSettings
from shared.streams import StreamNames

KILLS = 10
AUDIO_BEFORE_KILL_S = 2.0
WAIT_AFTER_KILL_S = 30.0
AUDIO = 0x01


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {
        "p50_s": round(float(np.percentile(arr, 50)), 3),
        "max_s": round(float(arr.max()), 3),
        "min_s": round(float(arr.min()), 3),
        "n": len(values),
    }


class Listener:
    """A Moshi-protocol client that streams speech-like audio and stamps every audio frame on arrival."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.audio_at: list[float] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._send())]

    async def _receive(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.client.ws:
                if isinstance(message, bytes) and message[:1] == bytes([AUDIO]):
                    self.audio_at.append(time.monotonic())

    async def _send(self) -> None:
        from tests.support.audio import speech_like
        from tests.support.clients import frames

        with contextlib.suppress(ConnectionClosed):
            for i, frame in enumerate(frames(speech_like(120.0, seed=3))):
                opus = self.client.encoder.encode(frame)
                if opus:
                    await self.client.ws.send(bytes([AUDIO]) + opus)
                await asyncio.sleep(0.08 if i else 0)

    async def wait_audio_for(self, seconds: float, timeout_s: float) -> None:
        """Until audio has been arriving for `seconds`."""
        deadline = time.monotonic() + timeout_s
        while not self.audio_at or self.audio_at[-1] - self.audio_at[0] < seconds:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {seconds} s of audio within {timeout_s} s")
            await asyncio.sleep(0.05)

    async def wait_audio_after(self, moment: float, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            after = [t for t in self.audio_at if t > moment]
            if after:
                return after[0]
            await asyncio.sleep(0.01)
        return None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.client.ws.close()


async def _takeover_times(bus: Bus, sid: str) -> tuple[float, float]:
    """When the new worker placed the session (its `resuming` state) and when it said `resumed` on :dlg
    (the entry id's milliseconds: Redis's clock, this machine's)."""
    from shared.messages import DIALOGUE, EventName, SessionEvent

    placed = float((await bus.redis.hget(bus.names.session(sid), "resumed_at") or b"0").decode())
    for entry in await bus.range(bus.names.session_dialogue(sid)):
        message = DIALOGUE.decode(entry.fields)
        if isinstance(message, SessionEvent) and message.name == EventName.RESUMED:
            return placed, int(entry.entry_id.split("-")[0]) / 1000
    events = [
        (m.name, m.detail, m.data)
        for m in (DIALOGUE.decode(e.fields) for e in await bus.range(bus.names.session_dialogue(sid)))
        if isinstance(m, SessionEvent)
    ]
    raise RuntimeError(f"no resumed event in {events}")


async def _serving_instance(bus: Bus, sid: str, stack: Any) -> str:
    worker = (await bus.redis.hget(bus.names.session(sid), "dialogue_worker") or b"").decode()
    return next(name for name in ("dialogue", "dialogue-2") if stack.worker_id(name) == worker)


async def _round(stack: Any, bus: Bus) -> dict[str, float]:
    from tests.support.clients import MoshiClient

    listener = Listener(await MoshiClient.open(stack.ws_url, voice="moshiko"))
    listener.start()
    try:
        await listener.wait_audio_for(AUDIO_BEFORE_KILL_S, timeout_s=30)
        sid = listener.client.session_id
        victim = await _serving_instance(bus, sid, stack)
        last_before = listener.audio_at[-1]
        killed_at, killed_wall = time.monotonic(), time.time()
        stack.send_signal(victim, signal.SIGKILL)
        first_after = await listener.wait_audio_after(killed_at, WAIT_AFTER_KILL_S)
        if first_after is None:
            raise RuntimeError(f"no audio within {WAIT_AFTER_KILL_S} s of killing {victim}")
        stack.processes.pop(victim).wait(10)
        stack.start("dialogue", victim)
        taken_at, resumed_at = await _takeover_times(bus, sid)
        return {
            "kill_to_audio": first_after - killed_at,
            "silence": first_after - last_before,
            "kill_to_takeover": taken_at - killed_wall,
            "kill_to_resumed": resumed_at - killed_wall,
        }
    finally:
        await listener.close()


async def _measure(checkpoints: Path, workdir: Path) -> dict[str, Any]:
    from tests.support.stack import ChorusStack

    with EmbeddedRedis() as redis:
        prefix = f"fo{uuid.uuid4().hex[:6]}:"
        defaults = CommonSettings()
        # The test stack slows presence down (loaded CI machines); this measures the product defaults.
        env = {
            "CHORUS_DIALOGUE_SLOTS": "2",
            "CHORUS_WORKER_TTL_S": str(defaults.worker_ttl_s),
            "CHORUS_CLAIM_IDLE_MS": str(defaults.claim_idle_ms),
        }
        stack = ChorusStack(
            workdir=workdir, redis_url=redis.url, checkpoints=checkpoints, key_prefix=prefix, extra_env=env
        )
        for service, instance in (("router", None), ("gateway", None), ("dialogue", None)):
            stack.start(service, instance)
        stack.start("dialogue", "dialogue-2")
        bus = await Bus.connect(redis.url, StreamNames(prefix))
        try:
            stack.wait_ready(need_tts=False)
            rounds = []
            for i in range(KILLS):
                await _wait_both_serving(bus, stack)
                rounds.append(await _round(stack, bus))
                print(f"   kill {i + 1}: {rounds[-1]['kill_to_audio']:.2f} s to audio", flush=True)
        finally:
            await bus.close()
            stack.stop_all()
    return {
        "kills": KILLS,
        "kill_to_audio": _stats([r["kill_to_audio"] for r in rounds]),
        "silence": _stats([r["silence"] for r in rounds]),
        "kill_to_takeover": _stats([r["kill_to_takeover"] for r in rounds]),
        "kill_to_resumed": _stats([r["kill_to_resumed"] for r in rounds]),
        "settings": {
            "worker_ttl_s": defaults.worker_ttl_s,
            "heartbeat_interval_s": defaults.heartbeat_interval_s,
            "failover_poll_s": defaults.failover_poll_s,
        },
    }


async def _wait_both_serving(bus: Bus, stack: Any) -> None:
    from shared.presence import list_workers

    wanted = {stack.worker_id("dialogue"), stack.worker_id("dialogue-2")}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        serving = {w.worker_id for w in await list_workers(bus, "dialogue") if w.serving}
        if wanted <= serving:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the dialogue workers did not come back")


def run() -> dict[str, Any]:
    from chorus.devtools.checkpoints import make_checkpoints

    checkpoints = Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"
    make_checkpoints(checkpoints)
    with tempfile.TemporaryDirectory(prefix="chorus-failover-") as workdir:
        result = asyncio.run(_measure(checkpoints, Path(workdir)))
    result["machine"] = "this CPU machine, small generated checkpoint"
    return result
