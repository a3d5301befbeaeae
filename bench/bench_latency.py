"""The latency Chorus adds per 80 ms frame, and what the plumbing costs, at 1 to 100 concurrent sessions.

Path: client send -> gateway -> Redis `:in` -> dialogue tick -> `:dlg` -> router -> `:out` -> gateway ->
client receive, through real processes (a `chorus` stack, one dialogue slot per session) and real
WebSockets: Moshi's protocol (Ogg/Opus), or with `CHORUS_BENCH_PROTOCOL=realtime` the OpenAI-Realtime one
(`/v1/realtime`: PCM16 in base64 `input_audio_buffer.append` events in, JSON events out; no codec, so the
plumbing's own cost is measured on a real path rather than computed as Moshi's less its Opus work).
The dialogue runs the tiny generated checkpoint (real moshi classes, tiny
dims: `write_moshi_checkpoint(tiny=True)`), so its step stays small at 100 sessions and the plumbing, not
the model, is what grows with the sessions. Each client talks like a person: `SPEECH_S` of loud audio, then
`PAUSE_S` of quiet room noise, over and over. All clocks are this machine's, so each hop is measured
from the entries' own timestamps:

- forward: client send of frame k (its message built: the client's own Opus encode, or base64 and JSON, is
  the client's work, timed apart as `client_encode`) -> the gateway's `:in` entry k made (its
  `created_at`: before its write to Redis); `forward_landed`: -> the entry in the stream (the write
  included; from the entry id, in whole ms, floored, so up to 1 ms early);
- return: the dialogue writing a frame's text to `:dlg` -> router -> gateway -> the client receiving it
  (Moshi's text message; in the Realtime protocol its `response.output_audio_transcript.delta` event);
- the return hop in two: `:dlg` written -> the router made the frame's `:out` entry (its read, speech
  detector and mixing: `return_dlg_to_router`), then -> the client receiving it (the router's write, the
  gateway's read, queue, Opus encode and WebSocket send: `return_router_to_client`);
- added = forward + return per frame: Chorus's plumbing. Not in it: the model's compute (`model_step`,
  the dialogue's own per-tick histogram in the same run) and the wait for the next 80 ms tick (0-80 ms,
  inherent to a fixed-rate model).

What the plumbing costs, over the measured window: every session is open before it begins (a Realtime
session's conversation too: one append of room noise and a commit place it), all stream together, none
closes before it ends. A session-second is one second of conversation through the
plumbing: 12.5 user frames in and 12.5 dialogue frames out (the window's frames of both kinds, counted
from the streams, halved, times 80 ms), so a figure stays per unit of work when a loaded machine falls
behind real time:

- `idle_cpu_ms_per_s`: what each process spends per second with no session (heartbeats, presence,
  polling), measured just before; it is taken out of the figures below, which are the sessions' own;
- `cpu_ms_per_session_s`: CPU time (user + system, from /proc, the process and its children) per
  session-second of each process: gateway, router, tts, redis-server, the dialogue worker in all and
  outside its model step (`dialogue_loop`: its event loop's thread; the model runs in a thread of its own);
  `plumbing` = gateway + router + Redis; `gateway_codec`: the gateway's Opus work (decoding the user's
  audio, encoding ours: its own CPU figure, `chorus_codec_cpu_seconds`), which Moshi's protocol
  needs whatever the plumbing; `plumbing_without_codecs` = plumbing less it;
- `redis_ops_per_session_s`: Redis commands per session-second, from `INFO commandstats` (commands a Lua
  script runs count too: they cost Redis the same), in all and per command (`evalsha`: the append
  script's runs);
- `user_frames_per_s`, `dialogue_frames_per_s`: frames per session and wall-clock second in the window
  (12.5 is real time; less when the clients or the model step fell behind on a loaded machine);
- `marginal` (over all rows): the slope of each process's busy CPU (ms per wall second) against the
  sessions the window carried (session-seconds / window), a least-squares line through the points: what
  one more session costs, with the fixed per-tick work of a process (shared by all its sessions) left in
  the intercept.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed

from chorus.devtools.redis_server import EmbeddedRedis
from shared.audio import FRAME_SAMPLES, FRAME_SEC, float_to_pcm16
from shared.bus import Bus
from shared.messages import DIALOGUE, INPUT, OUTPUT, DialogueFrame, OutputText, UserAudio
from shared.streams import StreamNames

# CHORUS_BENCH_SESSIONS="1,10" measures fewer points (100 sessions take long on a small machine).
# CHORUS_BENCH_PROTOCOL=realtime drives Realtime-protocol clients (PCM16 JSON events) instead of Moshi's.
PROTOCOL = os.environ.get("CHORUS_BENCH_PROTOCOL", "moshi")
SESSION_COUNTS = tuple(int(n) for n in os.environ.get("CHORUS_BENCH_SESSIONS", "1,10,50,100").split(","))
# How long every session talks in the measured window; CHORUS_BENCH_SECONDS changes it (longer: steadier).
SECONDS_PER_SESSION = float(os.environ.get("CHORUS_BENCH_SECONDS", "10"))
# CHORUS_BENCH_STACK_ENV="CHORUS_WS_COMPRESSION=false ..." adds settings to every process of the stack
# (the stack takes no CHORUS_* variable from this environment): a setting's cost, measured.
STACK_ENV = dict(pair.partition("=")[::2] for pair in os.environ.get("CHORUS_BENCH_STACK_ENV", "").split())
if bad := [name for name in STACK_ENV if not name.startswith("CHORUS_")]:
    raise SystemExit(f"CHORUS_BENCH_STACK_ENV takes CHORUS_NAME=value pairs, not {bad}")
SPEECH_S, PAUSE_S = 1.2, 0.8  # a user talks, then listens: the speech detector sees both
SPEECH_RMS, ROOM_RMS = 0.1, 0.0005  # -20 dBFS of noise for speech, -66 dBFS of room noise between
OPEN_WAVE = 20  # sessions opened at once, before the measured window
OPEN_TIMEOUT_S = 120.0  # a session's placement, as CHORUS_PLACEMENT_WAIT_S below allows
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_WINDOW_S = 3.0


def _user_audio() -> np.ndarray:
    """SECONDS_PER_SESSION of a user talking and pausing: loud noise bursts over quiet room noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(SECONDS_PER_SESSION * 24_000)) / 24_000
    talking = (t % (SPEECH_S + PAUSE_S)) < SPEECH_S
    level = np.where(talking, SPEECH_RMS, ROOM_RMS)
    return (level * rng.standard_normal(len(t))).astype(np.float32)


def percentiles(values: list[float], digits: int = 1) -> dict[str, float]:
    """p50 and p99 of durations in seconds, in ms rounded to `digits` (bench_hop_floor's too)."""
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    arr = np.asarray(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), digits),
        "p99_ms": round(float(np.percentile(arr, 99)), digits),
        "n": len(values),
    }


def _model_step_seconds(metrics_url: str) -> tuple[float, float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        match = re.search(rf'^{name}{{stage="dialogue_step"}} ([0-9.e+-]+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("chorus_stage_latency_seconds_sum"), value("chorus_stage_latency_seconds_count")


def _codec_seconds(metrics_url: str) -> float:
    """CPU seconds the gateway spent in the Opus codec (encode + decode), from its own counter."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(r"^chorus_codec_cpu_seconds{[^}]*} ([0-9.e+-]+)$", text, re.M))


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


@dataclass
class _Phases:
    """Every session opens first, then all stream together (`go`), and close only once all have streamed
    (`done`): the measured window holds N live sessions, not their opening or closing."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    opened: int = 0
    refused: int = 0
    streamed: int = 0

    async def count(self, what: str) -> None:
        async with self.changed:
            setattr(self, what, getattr(self, what) + 1)
            self.changed.notify_all()

    async def wait_until(self, test: Callable[[], bool]) -> None:
        async with self.changed:
            await self.changed.wait_for(test)


class _Talker:
    """One bench client: opens a session, sends one 80 ms frame, stamps each text piece on arrival.
    `first_seq`: the `:in` frames it sent while opening (they precede the measured frames); `texts_before`:
    the text pieces it received while opening, not stamped (they precede the timed ones)."""

    session_id: str
    ws: Any
    first_seq = 0
    texts_before = 0

    async def open(self, ws_url: str) -> None:
        raise NotImplementedError

    def message(self, frame: np.ndarray) -> str | bytes | None:
        """Frame k as the client sends it (None: its encoder holds the frame back)."""
        raise NotImplementedError

    def is_text(self, message: str | bytes) -> bool:
        raise NotImplementedError


class _MoshiTalker(_Talker):
    async def open(self, ws_url: str) -> None:
        from tests.support.clients import MoshiClient

        self.client = await MoshiClient.open(ws_url, voice="moshiko")
        self.session_id, self.ws = self.client.session_id, self.client.ws

    def message(self, frame: np.ndarray) -> bytes | None:
        opus = self.client.encoder.encode(frame)
        return bytes([0x01]) + opus if opus else None

    def is_text(self, message: str | bytes) -> bool:
        return isinstance(message, bytes) and message[:1] == b"\x02"


class _RealtimeTalker(_Talker):
    TEXT = '"response.output_audio_transcript.delta"'

    async def open(self, ws_url: str) -> None:
        """The socket, then its conversation: a Realtime session is placed on a dialogue worker at its
        first append, so one frame of room noise opens it here, before the measured window (a Moshi socket
        is placed before its handshake). Its commit is answered once that append was handled, placement
        included. Left in the window, the placement (150-230 ms at 10 sessions) was the forward hop's p99."""
        from tests.support.clients import RealtimeClient

        client = await RealtimeClient.open(ws_url)
        self.session_id, self.ws = client.events[-1]["session"]["id"], client.ws
        await client.append_frame(ROOM_RMS * np.random.default_rng(1).standard_normal(FRAME_SAMPLES))
        await client.send({"type": "input_audio_buffer.commit"})
        await client.wait_for("input_audio_buffer.committed", timeout_s=OPEN_TIMEOUT_S)
        self.first_seq = 1
        self.texts_before = len(client.of_type("response.output_audio_transcript.delta"))

    def message(self, frame: np.ndarray) -> str:
        audio = base64.b64encode(float_to_pcm16(frame)).decode()
        return json.dumps({"type": "input_audio_buffer.append", "audio": audio})

    def is_text(self, message: str | bytes) -> bool:
        # A text delta is short: no parse of every audio delta (5 kB each) on the clients' core.
        return isinstance(message, str) and len(message) < 2048 and self.TEXT in message


async def _one_session(stack: Any, samples: np.ndarray, phases: _Phases) -> dict[str, Any]:
    from tests.support.clients import frames

    talker = _RealtimeTalker() if PROTOCOL == "realtime" else _MoshiTalker()
    try:
        await talker.open(stack.ws_url)
    except BaseException:
        await phases.count("refused")
        raise
    sent: list[float] = []
    encoding: list[float] = []  # the client's own work on each frame before sending it
    received: list[float] = []

    async def receive() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in talker.ws:
                if talker.is_text(message):
                    received.append(time.time())  # stamped on arrival, not when a loop gets to it

    receiver = asyncio.create_task(receive())
    await phases.count("opened")
    try:
        await phases.go.wait()
        start = time.monotonic()
        for i, frame in enumerate(frames(samples)):
            built = time.perf_counter()
            message = talker.message(frame)
            encoding.append(time.perf_counter() - built)
            sent.append(time.time())
            if message is not None:
                await talker.ws.send(message)
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_SEC - time.monotonic()))
        await asyncio.sleep(0.5)
    finally:
        await phases.count("streamed")
    await phases.done.wait()
    await talker.ws.close()
    await asyncio.gather(receiver, return_exceptions=True)
    return {
        "session_id": talker.session_id,
        "first_seq": talker.first_seq,
        "texts_before": talker.texts_before,
        "sent": sent,
        "encoding": encoding,
        "received": received,
    }


@dataclass
class _Snapshot:
    wall: float
    cpu: dict[str, float]
    calls: dict[str, int]
    model_sum: float
    model_count: float

    @classmethod
    async def take(cls, stack: Any, pids: dict[str, int]) -> _Snapshot:
        model_sum, model_count = _model_step_seconds(f"http://127.0.0.1:{stack.ports['dialogue']}/metrics")
        cpu = _cpu_by_process(pids)
        cpu["gateway_codec"] = _codec_seconds(f"http://127.0.0.1:{stack.ports['gateway']}/metrics")
        return cls(time.time(), cpu, await _command_calls(stack.redis_url), model_sum, model_count)


async def _measure(stack: Any, redis_pid: int, sessions: int) -> dict[str, Any]:
    pids = {name: process.pid for name, process in stack.processes.items()} | {"redis": redis_pid}
    idle = await _idle_cpu_per_s(pids)
    phases = _Phases()
    samples = _user_audio()
    talks: list[asyncio.Task[dict[str, Any]]] = []
    while len(talks) < sessions:  # in waves: a hundred joins at once outlast a client's handshake wait
        wave = min(OPEN_WAVE, sessions - len(talks))
        talks += [asyncio.create_task(_one_session(stack, samples, phases)) for _ in range(wave)]
        started = len(talks)
        await phases.wait_until(lambda started=started: phases.opened + phases.refused == started)
    before = await _Snapshot.take(stack, pids)
    phases.go.set()
    await phases.wait_until(lambda: phases.streamed == phases.opened)
    after = await _Snapshot.take(stack, pids)
    phases.done.set()
    results = await asyncio.gather(*talks, return_exceptions=True)
    window_s = after.wall - before.wall
    talked = [r for r in results if not isinstance(r, BaseException)]
    hops = await _hops(stack, talked, before.wall, after.wall)
    frames_in, frames_out = hops.pop("user_frames"), hops.pop("dialogue_frames")
    session_s = max(1e-9, (frames_in + frames_out) / 2 * FRAME_SEC)
    # What the sessions cost: the window's CPU less what the processes spend idle over as long.
    busy = {name: after.cpu[name] - before.cpu[name] - idle.get(name, 0) * window_s for name in after.cpu}
    cost = _plumbing_cost(
        _per_session_s({}, busy, session_s), (after.model_sum - before.model_sum) / session_s
    )
    ops = _per_session_s(before.calls, after.calls, session_s)  # type: ignore[arg-type]
    ops.pop("info", None)  # the benchmark's own
    model_s = (after.model_sum - before.model_sum) / max(1.0, after.model_count - before.model_count)
    live = max(1, phases.opened)
    return {
        "sessions": sessions,
        "failed_sessions": phases.refused,
        "window_s": round(window_s, 2),
        "model_step_ms": round(model_s * 1000, 1),
        **hops,
        "session_s": round(session_s, 1),
        "user_frames_per_s": round(frames_in / live / window_s, 2),
        "dialogue_frames_per_s": round(frames_out / live / window_s, 2),
        "idle_cpu_ms_per_s": {name: round(rate * 1000, 2) for name, rate in idle.items()},
        "cpu_ms_per_session_s": cost,
        "redis_ops_per_session_s": round(sum(ops.values()), 1),
        "redis_ops_by_command": {k: round(v, 1) for k, v in sorted(ops.items()) if v},
    }


async def _hops(stack: Any, results: list[dict[str, Any]], began: float, ended: float) -> dict[str, Any]:
    """Forward, return and added latency from the entries' own timestamps; the dialogue frames written
    within the measured window."""
    bus = await Bus.connect(stack.redis_url, StreamNames(stack.key_prefix))
    forward: list[float] = []
    landed: list[float] = []  # ... -> in `:in` (the write included; ms resolution, floored)
    back: list[float] = []
    router: list[float] = []  # the return hop in two: `:dlg` written -> the router made the `:out` entry
    gateway: list[float] = []  # ... -> written to `:out`, read by the gateway, sent, received
    user_frames = dialogue_frames = 0
    try:
        for result in results:
            sid = result["session_id"]
            for entry in await bus.range(bus.names.session_input(sid)):
                message = INPUT.decode(entry.fields)
                k = message.seq - result["first_seq"] if isinstance(message, UserAudio) else -1
                if 0 <= k < len(result["sent"]):
                    forward.append(message.created_at - result["sent"][k])
                    # Redis's own clock, in whole ms (the entry id): when the frame was in the stream.
                    landed.append(int(entry.entry_id.split("-")[0]) / 1000 - result["sent"][k])
                    user_frames += began <= message.created_at <= ended
            ticks = [
                m
                for m in (DIALOGUE.decode(e.fields) for e in await bus.range(bus.names.session_dialogue(sid)))
                if isinstance(m, DialogueFrame)
            ]
            dialogue_frames += sum(began <= m.created_at <= ended for m in ticks)
            spoken = [m for m in ticks if m.text][result["texts_before"] :]
            texts = [
                m
                for m in (OUTPUT.decode(e.fields) for e in await bus.range(bus.names.session_output(sid)))
                if isinstance(m, OutputText)
            ][result["texts_before"] :]
            # Text pieces reach the client in order, one per :dlg frame with text (and one :out entry).
            for said, routed, received in zip(spoken, texts, result["received"], strict=False):
                back.append(received - said.created_at)
                router.append(routed.created_at - said.created_at)
                gateway.append(received - routed.created_at)
    finally:
        await bus.close()
    n = min(len(forward), len(back))
    rng = np.random.default_rng(1)
    added = list(rng.choice(forward, n) + rng.choice(back, n)) if n else []
    return {
        "forward_hop": percentiles(forward),
        "forward_landed": percentiles(landed),
        "return_hop": percentiles(back),
        "return_dlg_to_router": percentiles(router),
        "return_router_to_client": percentiles(gateway),
        "added": percentiles(added),
        "client_encode": percentiles([s for r in results for s in r["encoding"]]),
        "user_frames": user_frames,
        "dialogue_frames": dialogue_frames,
    }


def _marginal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per process, the least-squares line of busy CPU (ms per second) against sessions: its slope is what
    one more session costs (ms per session-second), its intercept the work shared by all sessions."""
    ok = [row for row in rows if row["session_s"] > 0.1]  # rows where some sessions talked
    if len({row["sessions"] for row in ok}) < 2:
        return {}
    sessions = np.array([row["session_s"] / row["window_s"] for row in ok])
    out: dict[str, Any] = {"sessions_carried": [round(float(n), 1) for n in sessions]}
    for name in (
        "gateway",
        "gateway_codec",
        "router",
        "redis",
        "dialogue_loop",
        "plumbing",
        "plumbing_without_codecs",
    ):
        busy = np.array([row["cpu_ms_per_session_s"][name] for row in ok]) * sessions
        slope, intercept = np.polyfit(sessions, busy, 1)
        out[name] = {"ms_per_session_s": round(float(slope), 2), "fixed_ms_per_s": round(float(intercept), 1)}
    ops = np.array([row["redis_ops_per_session_s"] for row in ok]) * sessions
    out["redis_ops_per_session_s"] = round(float(np.polyfit(sessions, ops, 1)[0]), 1)
    return out


def _plumbing_cost(cpu_s: dict[str, float], model_s: float) -> dict[str, float]:
    """CPU ms per session-second per process, and the dialogue's model step (wall time) for scale."""
    cost = {name: round(seconds * 1000, 2) for name, seconds in cpu_s.items()}
    cost["dialogue_model_step_wall"] = round(model_s * 1000, 2)
    cost["plumbing"] = round(cost["gateway"] + cost["router"] + cost["redis"], 2)
    # Opus (decoding the user's audio, encoding ours) is work Moshi's protocol needs; the rest is plumbing.
    cost["plumbing_without_codecs"] = round(cost["plumbing"] - cost["gateway_codec"], 2)
    return cost


def run() -> dict[str, Any]:
    from chorus.devtools.checkpoints import make_checkpoints
    from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint
    from tests.support.stack import ChorusStack

    root = Path(__file__).resolve().parents[1]
    checkpoints = root / ".cache" / "checkpoints"
    make_checkpoints(checkpoints, parts=("tts",))
    tiny_moshi = write_moshi_checkpoint(checkpoints / "moshi-tiny", tiny=True)
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
                    "CHORUS_MOSHI_DIR": str(tiny_moshi),
                    "OMP_NUM_THREADS": "1",  # the model on one core, the other left to the plumbing
                    # Sessions open before the measured window: 100 joins (each primed) outlast the defaults.
                    "CHORUS_PLACEMENT_WAIT_S": "120",
                    "CHORUS_SESSION_READY_TIMEOUT_S": "120",
                    "CHORUS_DIALOGUE_SLOTS": str(count),
                    "CHORUS_MAX_SESSIONS_PER_KEY": "0",  # one anonymous owner opens them all
                    "CHORUS_WS_MAX_SOCKETS_PER_KEY": str(max(64, count)),  # ... over one socket each
                    "CHORUS_LOG_LEVEL": "WARNING",
                    # Every entry of the window stays in the streams the hops are read from: past the
                    # default cap (1,500, 2 minutes of frames), `:out`'s text, 2 entries a tick, loses its
                    # first ones, and the split of the return hop would pair the wrong pieces.
                    "CHORUS_SESSION_STREAM_MAXLEN": str(
                        max(1500, int(4 * (SECONDS_PER_SESSION + 60) / FRAME_SEC))
                    ),
                    **STACK_ENV,
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
        "protocol": PROTOCOL,
        "stack_env": STACK_ENV,
        "seconds_per_session": SECONDS_PER_SESSION,
        "model": "tiny generated Moshi checkpoint (CHORUS_MOSHI_DIR), small TTS checkpoint, CPU",
        "user_audio": f"{SPEECH_S:g} s of speech-level noise, {PAUSE_S:g} s of room noise, repeated",
        "rows": rows,
        "marginal": _marginal(rows),
    }
