"""What the chaos tests share: a client that talks and listens in real time while faults happen (and
records when each message arrived), a read-only view of Redis to check what the services did, and
small waiting helpers. Nothing here retries or hides a failure: it observes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from websockets.exceptions import ConnectionClosed

from shared.audio import FRAME_SEC
from shared.bus import Bus
from shared.messages import DIALOGUE, OUTPUT, TTS, Codec, Envelope
from shared.presence import list_workers
from shared.redis_server import free_port
from shared.streams import StreamNames
from tests.support.audio import speech_like
from tests.support.clients import AUDIO, ERROR, TEXT, MoshiClient, frames
from tests.support.stack import ChorusStack

T = TypeVar("T")
M = TypeVar("M", bound=Envelope)


# --- the stack's readiness ---------------------------------------------------------------------------


def readiness(stack: ChorusStack) -> dict[str, Any]:
    """The gateway's /readyz body (whatever its status); {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"{stack.url}/readyz", timeout=2) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return dict(json.loads(error.read()))
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return {}


def wait_serving(stack: ChorusStack, timeout_s: float = 120, **serving: int) -> dict[str, Any]:
    """Wait until the gateway's readiness counts at least `serving[service]` serving workers of each
    service (e.g. dialogue=2, router=1, tts=1): models loaded and warmed up."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for name, process in stack.processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{stack.log_tail(name)}"
        body = readiness(stack)
        services = body.get("services") or {}
        if body and all(services.get(s, {}).get("serving", 0) >= n for s, n in serving.items()):
            return body
        time.sleep(0.3)
    logs = "\n".join(f"--- {n}\n{stack.log_tail(n)}" for n in stack.processes)
    raise AssertionError(f"not serving {serving} within {timeout_s}s: {body}\n{logs}")


def start_services(stack: ChorusStack, *instances: str, timeout_s: float = 120) -> None:
    """Start worker instances ("dialogue", "dialogue-2", "router", ...) and the gateway, and wait until
    every one of them is serving."""
    stack.workdir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, int] = {}
    for instance in instances:
        service = instance.split("-")[0]
        if instance not in stack.ports:  # a further worker's health port (the stack would take any)
            stack.ports[instance] = free_port(stack.ports.values())
        stack.start(service, instance)
        wanted[service] = wanted.get(service, 0) + 1
    stack.start("gateway")
    wait_serving(stack, timeout_s, **wanted)


def instance_of(stack: ChorusStack, worker_id: str) -> str:
    """The stack instance ("dialogue-2") running the worker with this id."""
    matches = [name for name in stack.processes if stack.worker_id(name) == worker_id]
    assert matches, f"no instance runs worker {worker_id!r}"
    return matches[0]


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
