"""The router's core loop: every owned session's `:dlg`, `:tts` and `:in` in ONE XREAD, through each
session's `Mixer`, out to `:out` in one pipelined write.

Tasks (one `Router.run`):
- `control_group`: the "router" consumer group on chorus:control takes `start`s and holds them;
- `control_tail`: every `update` / `stop` for owned sessions (no group: each owner sees each one);
- `route`: the reader loop, the only writer of `:out`, so a session's output stays in seq order;
- `tts_watch`: TTS presence every few frames, one scan for all sessions.

A new session reads its streams from the start ('0-0'), so the dialogue's `ready` is never missed; a
session claimed from a dead router starts at the streams' ends and continues its `:out` seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.router.mixer import Mixer, MixerOutput
from services.router.settings import RouterSettings
from services.router.speech import SpeechDetector, SpeechEdges, detector_factory
from shared import metrics
from shared.audio import FRAME_SEC
from shared.bus import Bus, Entry, GroupConsumer, Handled, tail
from shared.errors import MalformedMessage
from shared.messages import (
    CONTROL,
    DIALOGUE,
    INPUT,
    OUTPUT,
    TTS,
    VOICE_PATTERN,
    Codec,
    ControlMessage,
    Envelope,
    SessionFlush,
    SessionStart,
    SessionStop,
    SessionUpdate,
    UserAudio,
    VoiceMode,
)
from shared.presence import WorkerFields, list_workers
from shared.sessions import SessionState, SessionStore

log = logging.getLogger(__name__)

SERVICE = "router"
RECENT_STOPS = 1000  # stops remembered for sessions not (yet) ours: a late `start` must not revive them
VOICE_MODES: tuple[VoiceMode, ...] = typing.get_args(VoiceMode)


@dataclass
class RoutedSession:
    sid: str
    start_entry: str  # the held `start` on chorus:control
    mixer: Mixer
    detector: SpeechDetector
    edges: SpeechEdges
    cursors: dict[str, str]  # stream key -> id of the last entry read
    pending: MixerOutput = field(default_factory=MixerOutput)  # produced outside the route loop
    stop_reason: str | None = None


class Router:
    def __init__(
        self,
        bus: Bus,
        settings: RouterSettings,
        *,
        make_detector: Callable[[], SpeechDetector] | None = None,
    ) -> None:
        self.bus = bus
        self.names = bus.names
        self.settings = settings
        self.worker_id = settings.worker_id
        self.store = SessionStore(bus, settings.session_ttl_s)
        self.make_detector = make_detector or detector_factory(settings)
        self.sessions: dict[str, RoutedSession] = {}
        self.consumer: GroupConsumer[ControlMessage] = GroupConsumer(
            bus,
            self.names.control,
            SERVICE,
            self.worker_id,
            CONTROL,
            self._on_control,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
        )
        self._recent_stops: OrderedDict[str, None] = OrderedDict()
        self._changed = asyncio.Event()

    def describe(self) -> WorkerFields:
        return {"sessions": len(self.sessions)}

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop`. Sessions are left held, not ended: another router claims them."""
        control_start = await self.bus.last_id(self.names.control)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_control(stop, control_start), name="control_tail")
            tasks.create_task(self.consumer.run(stop), name="control_group")
            tasks.create_task(self._route(stop), name="route")
            tasks.create_task(self._watch_tts(stop), name="tts_watch")

    # --- control -------------------------------------------------------------------------------

    async def _on_control(self, message: ControlMessage, entry: Entry) -> str | None:
        """Group delivery: take `start`s; `update`/`stop`/`flush` are the tail's business."""
        if not isinstance(message, SessionStart):
            return Handled.ACK
        sid = message.session_id
        if sid in self.sessions:
            return Handled.HOLD if self.sessions[sid].start_entry == entry.entry_id else Handled.ACK
        state = await self.store.get(sid)
        if sid in self._recent_stops or await self._is_over(sid, state):
            log.info("ignoring the start of a session that is over", extra={"session_id": sid})
            return Handled.ACK
        session = await self._open(message, entry.entry_id, state)
        if sid in self._recent_stops:  # stopped while we were opening it: end it properly
            session.stop_reason = "stopped"
        self.sessions[sid] = session
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        self._changed.set()
        return Handled.HOLD

    async def _is_over(self, sid: str, state: dict[str, str]) -> bool:
        """A `start` from the control stream's history (a new consumer group reads it all) may be of a
        session long gone: its hash expired or says ended, or an owner already gave its keys a TTL."""
        if not state or state.get("state") == SessionState.ENDED:
            return True
        return int(await self.bus.redis.ttl(self.names.session_input(sid))) > 0

    async def _open(self, start: SessionStart, entry_id: str, state: dict[str, str]) -> RoutedSession:
        sid = start.session_id
        previous = state.get("router_worker", "")
        failover = bool(previous) and previous != self.worker_id
        names = self.names
        streams = [names.session_dialogue(sid), names.session_tts(sid), names.session_input(sid)]
        if failover:
            cursors = {s: await self.bus.last_id(s) for s in streams}
            first_seq = await self._next_output_seq(sid)
        else:
            cursors, first_seq = dict.fromkeys(streams, "0-0"), 0
        # The hash may be fresher than the start (an update applied while no router owned the session).
        voice = state.get("voice", "")
        mode = state.get("voice_mode", "")
        mixer = Mixer(
            sid,
            voice if _valid_voice(voice) else start.voice,
            mode if mode in VOICE_MODES else start.voice_mode,
            budget_frames=self.settings.router_budget_frames,
            queue_frames=self.settings.router_cloned_queue_frames,
            first_seq=first_seq,
        )
        s = self.settings
        session = RoutedSession(
            sid,
            entry_id,
            mixer,
            self.make_detector(),
            SpeechEdges(s.router_vad_threshold, s.router_vad_start_frames, s.router_vad_stop_frames),
            cursors,
        )
        await self.store.update(sid, router_worker=self.worker_id)
        await self._check_tts([session])
        log.info(
            "routing session",
            extra={"session_id": sid, "voice": mixer.voice, "voice_mode": mixer.mode, "failover": failover},
        )
        return session

    async def _next_output_seq(self, sid: str) -> int:
        """After a failover `:out` goes on where the dead router stopped (the gateway drops repeats)."""
        last_id = await self.bus.last_id(self.names.session_output(sid))
        entries = await self.bus.range(self.names.session_output(sid), last_id, last_id)
        if not entries:
            return 0
        try:
            return OUTPUT.decode(entries[0].fields).seq + 1
        except MalformedMessage:
            return 0

    async def _follow_control(self, stop: asyncio.Event, start: str) -> None:
        async for message, _ in tail(
            self.bus, self.names.control, CONTROL, start=start, block_ms=self._block_ms, stop=stop
        ):
            session = self.sessions.get(message.session_id)
            if isinstance(message, SessionStop):
                self._remember_stop(message.session_id)
                if session is not None:
                    session.stop_reason = message.reason
                    self._changed.set()
            elif isinstance(message, SessionUpdate) and session is not None:
                session.pending.merge(session.mixer.set_voice(message.voice, message.voice_mode))

    def _remember_stop(self, sid: str) -> None:
        self._recent_stops[sid] = None
        while len(self._recent_stops) > RECENT_STOPS:
            self._recent_stops.popitem(last=False)

    # --- the route loop ------------------------------------------------------------------------

    @property
    def _block_ms(self) -> int:
        return self.settings.router_read_block_ms

    async def _route(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            await self._finish_stopped()
            if not self.sessions:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._block_ms / 1000)
                continue
            try:
                await self.route_once()
                backoff = 0.1
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("router read failed, retrying in %.1fs: %s", backoff, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def route_once(self) -> None:
        """One XREAD over every owned session's streams, dispatched, and one pipelined write."""
        owners = {key: s for s in self.sessions.values() for key in s.cursors}
        cursors = {key: cursor for s in self.sessions.values() for key, cursor in s.cursors.items()}
        entries = await self.bus.read(cursors, count=self.settings.router_read_count, block_ms=self._block_ms)
        by_session: dict[str, list[Entry]] = {}
        for entry in entries:
            session = owners[entry.stream]
            session.cursors[entry.stream] = entry.entry_id
            by_session.setdefault(session.sid, []).append(entry)
        user_audio = [e for e in entries if e.stream == self.names.session_input(owners[e.stream].sid)]
        speech = await asyncio.to_thread(self._detect_speech, owners, user_audio) if user_audio else {}
        for sid, session_entries in by_session.items():
            if (routed := self.sessions.get(sid)) is not None:
                self._dispatch(routed, session_entries, speech.get(sid, []))
        await self._publish(self.sessions.values())

    def _detect_speech(self, owners: dict[str, RoutedSession], entries: list[Entry]) -> dict[str, list[bool]]:
        """Runs in a thread (the VAD is a model): speech edges per session, in input order."""
        edges: dict[str, list[bool]] = {}
        for entry in entries:
            session = owners[entry.stream]
            message = _decode(INPUT, entry)
            if isinstance(message, UserAudio):
                edge = session.edges.push(session.detector.speech_probability(message.pcm))
                if edge is not None:
                    edges.setdefault(session.sid, []).append(edge)
        return edges

    def _dispatch(self, session: RoutedSession, entries: list[Entry], speech: list[bool]) -> None:
        """Cloned audio first, then user speech, then dialogue ticks: a tick sees what arrived with it."""
        names, out, mixer = self.names, session.pending, session.mixer
        for entry in entries:
            if entry.stream == names.session_tts(session.sid) and (tts := _decode(TTS, entry)) is not None:
                out.merge(mixer.on_tts(tts))
        for started in speech:
            out.merge(mixer.on_user_speech(started))
        now = time.time()
        for entry in entries:
            if entry.stream == names.session_dialogue(session.sid):
                dialogue = _decode(DIALOGUE, entry)
                if dialogue is not None:
                    metrics.STREAM_LAG.labels(stream_kind="dlg").observe(max(0.0, now - dialogue.created_at))
                    out.merge(mixer.on_dialogue(dialogue))

    async def _publish(self, sessions: Iterable[RoutedSession]) -> None:
        appends: list[tuple[str, Envelope]] = []
        for session in sessions:
            out, session.pending = session.pending, MixerOutput()
            stream = self.names.session_output(session.sid)
            appends.extend((stream, message) for message in out.messages)
            if out.flush_tts:
                appends.append((self.names.control, SessionFlush(session_id=session.sid)))
            for to, reason in out.switches:
                metrics.VOICE_SWITCHES.labels(to=to, reason=reason).inc()
                log.info("audio source switched to %s (%s)", to, reason, extra={"session_id": session.sid})
            for reason, count in out.dropped.items():
                metrics.FRAMES_DROPPED.labels(service=SERVICE, reason=reason).inc(count)
        await self.bus.append_many(appends)

    async def _finish_stopped(self) -> None:
        stopped = [s for s in self.sessions.values() if s.stop_reason is not None]
        if not stopped:
            return
        for session in stopped:
            session.pending.merge(session.mixer.end(session.stop_reason or ""))
        await self._publish(stopped)
        for session in stopped:
            await self.consumer.release(session.start_entry)
            await self.bus.expire_session(session.sid, self.settings.session_ttl_s)
            del self.sessions[session.sid]
            log.info("session ended", extra={"session_id": session.sid, "reason": session.stop_reason})
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))

    # --- TTS presence --------------------------------------------------------------------------

    async def _watch_tts(self, stop: asyncio.Event) -> None:
        interval = self.settings.router_tts_check_frames * FRAME_SEC
        while not stop.is_set():
            try:
                await self._check_tts(list(self.sessions.values()))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("TTS presence check failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _check_tts(self, sessions: list[RoutedSession]) -> None:
        """A session's TTS is up when the worker named in its hash (`tts_worker`) is alive, or, before
        one is named, when any TTS worker is."""
        sessions = [s for s in sessions if s.mixer.wants_tts]
        if not sessions:
            return
        alive = {worker.worker_id for worker in await list_workers(self.bus, "tts")}
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for session in sessions:
                pipe.hget(self.names.session(session.sid), "tts_worker")
            named: list[bytes | None] = await pipe.execute()
        for session, worker in zip(sessions, named, strict=True):
            up = worker.decode() in alive if worker else bool(alive)
            session.pending.merge(session.mixer.set_tts_available(up))


def _valid_voice(voice: str) -> bool:
    return re.fullmatch(VOICE_PATTERN, voice) is not None


M = typing.TypeVar("M", bound=Envelope)


def _decode(codec: Codec[M], entry: Entry) -> M | None:
    try:
        return codec.decode(entry.fields)
    except MalformedMessage as exc:
        log.warning("malformed entry skipped: %s", exc.detail, extra={"stream": entry.stream})
        return None
