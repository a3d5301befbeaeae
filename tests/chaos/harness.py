"""What the chaos tests share: a client that talks and listens in real time while faults happen (and
records when each message arrived), and a read-only view of Redis to check what the services did.
Starting, signalling and waiting on the processes is the stack's (tests/support/stack.py). Nothing here
retries or hides a failure: it observes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from websockets.exceptions import ConnectionClosed

from shared.audio import FRAME_SEC
from shared.bus import Bus
from shared.messages import DIALOGUE, OUTPUT, TTS, Codec, Envelope
from shared.presence import list_workers
from shared.streams import StreamNames
from tests.support.audio import speech_like
from tests.support.clients import AUDIO, ERROR, TEXT, MoshiClient, frames
from tests.support.stack import ChorusStack

M = TypeVar("M", bound=Envelope)


# --- a client in a real-time conversation ------------------------------------------------------------


@dataclass
class Arrival:
    at: float  # time.monotonic()
    kind: int
    payload: bytes


@dataclass
class Call:
    """A Moshi-protocol client that talks (speech-like audio, in real time) and listens at once, and
    records when every message arrived: faults are judged by what the client saw, and when."""

    client: MoshiClient
    arrivals: list[Arrival] = field(default_factory=list)
    closed_at: float | None = None
    close_code: int | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def open(cls, ws_url: str, **query: str) -> Call:
        call = cls(await MoshiClient.open(ws_url, **query))
        call._tasks = [
            asyncio.create_task(call._listen(), name="call-listen"),
            asyncio.create_task(call._talk(), name="call-talk"),
        ]
        return call

    @property
    def session_id(self) -> str:
        return self.client.session_id

    async def _listen(self) -> None:
        try:
            async for message in self.client.ws:
                assert isinstance(message, bytes), f"text message on the Moshi protocol: {message!r}"
                self.arrivals.append(Arrival(time.monotonic(), message[0], message[1:]))
        except ConnectionClosed:
            pass
        self.closed_at = time.monotonic()
        self.close_code = self.client.ws.close_code

    async def _talk(self) -> None:
        """Speech-like audio at the real-time pace until the socket closes."""
        began, sent = time.monotonic(), 0
        seed = 0
        with contextlib.suppress(ConnectionClosed):
            while True:
                for frame in frames(speech_like(4.0, seed=seed)):
                    opus = self.client.encoder.encode(frame)
                    if opus:
                        await self.client.ws.send(bytes([AUDIO]) + opus)
                    sent += 1
                    await asyncio.sleep(max(0.0, began + sent * FRAME_SEC - time.monotonic()))
                seed += 1

    async def hang_up(self) -> None:
        await self.client.ws.close()
        await self.finished(10)

    async def finished(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the server to close the socket; True when it did."""
        done, _ = await asyncio.wait([self._tasks[0]], timeout=timeout_s)
        self._tasks[1].cancel()
        return bool(done)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    def audio_times(self, since: float = 0.0) -> list[float]:
        return [a.at for a in self.arrivals if a.kind == AUDIO and a.at >= since]

    @property
    def errors(self) -> list[str]:
        return [a.payload.decode(errors="replace") for a in self.arrivals if a.kind == ERROR]

    @property
    def texts(self) -> list[str]:
        return [a.payload.decode(errors="replace") for a in self.arrivals if a.kind == TEXT]

    async def audio_flowing(self, since: float, frames_wanted: int = 10) -> bool:
        return len(self.audio_times(since)) >= frames_wanted

    def longest_audio_gap(self, since: float, until: float | None = None) -> float:
        """The longest silence between two audio messages (from the last one before `since`) up to
        `until`: the gap a fault opened in what the client hears."""
        times = [a.at for a in self.arrivals if a.kind == AUDIO]
        before = [t for t in times if t < since]
        window = [t for t in times if t >= since and (until is None or t <= until)]
        points = before[-1:] + window
        return float(np.max(np.diff(points))) if len(points) > 1 else float("inf")


# --- Redis as the services left it ---------------------------------------------------------------------


class Observer:
    """Read-only looks at a stack's Redis keys (the same names the services use)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.names: StreamNames = bus.names

    @classmethod
    async def connect(cls, stack: ChorusStack) -> Observer:
        return cls(await Bus.connect(stack.redis_url, StreamNames(stack.key_prefix)))

    async def close(self) -> None:
        await self.bus.close()

    async def session(self, sid: str) -> dict[str, str]:
        raw = await self.bus.redis.hgetall(self.names.session(sid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def dialogue_slots(self) -> tuple[int, int]:
        """(free, capacity) over every live dialogue worker, as their presence says."""
        workers = await list_workers(self.bus, "dialogue")
        return sum(w.free_slots for w in workers), sum(int(w.fields.get("capacity", 0)) for w in workers)

    async def worker_fields(self, service: str, worker_id: str) -> dict[str, str]:
        raw = await self.bus.redis.hgetall(self.names.worker(service, worker_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def live_sessions_of(self, owner: str = "") -> set[str]:
        """The per-key set of live sessions (owner '' = auth off, the anonymous owner)."""
        return {m.decode() for m in await self.bus.redis.smembers(self.names.owner_sessions(owner))}

    async def entries(self, stream: str, codec: Codec[M]) -> list[M]:
        return [codec.decode(e.fields) for e in await self.bus.range(stream)]

    async def output(self, sid: str) -> list[Envelope]:
        return list(await self.entries(self.names.session_output(sid), OUTPUT))

    async def dialogue(self, sid: str) -> list[Envelope]:
        return list(await self.entries(self.names.session_dialogue(sid), DIALOGUE))

    async def tts(self, sid: str) -> list[Envelope]:
        return list(await self.entries(self.names.session_tts(sid), TTS))


def strictly_increasing(values: list[int]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))
