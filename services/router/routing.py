"""The router's core loop: every owned session's `:dlg`, `:tts` and `:in` read together once per dialogue
tick (`route_once`), through each session's `Mixer`, out to `:out` in one script call (two when natively
voiced sessions go ahead of the speech detector).

Tasks (one `Router.run`); sessions are owned through `shared.ownership`:
- `control_group`: the "router" consumer group on chorus:control takes `start`s;
- `failover`: sessions of a dead router move here;
- `session_control`: `update` / `stop` of owned sessions, from each one's control stream;
- `liveness`: sessions that ended, moved away or lost their lease are let go;
- `route`: the reader loop, the only writer of `:out`, so a session's output stays in seq order;
- `tts_watch`: TTS presence every few frames, one scan for all sessions.

A new session reads its streams from the start ('0-0'), so the dialogue's `ready` is never missed; a
session taken over from a dead router starts at the streams' ends and continues its `:out` seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.router.mixer import Mixer, MixerOutput
from services.router.settings import RouterSettings
from services.router.speech import SpeechDetector, SpeechEdges, SpeechStream
from shared import metrics
from shared.audio import FRAME_SEC, FloatAudio, pcm16_to_float
from shared.bus import Bus, Entry, GroupConsumer
from shared.errors import MalformedMessage
from shared.messages import (
    CONTROL,
    DIALOGUE,
    INPUT,
    OUTPUT,
    TTS,
    Codec,
    ControlMessage,
    DialogueFrame,
    DialogueMessage,
    Envelope,
    LeanFrame,
    SessionFlush,
    SessionStart,
    SessionStop,
    SessionUpdate,
    UserAudio,
    lean_frame,
)
from shared.ownership import Liveness, SessionOwnership, Takeover, next_seq
from shared.presence import WorkerFields, list_workers
from shared.retry import keep_running, sleep_unless_stopped
from shared.sessions import SessionStore

log = logging.getLogger(__name__)
# Observed per dialogue frame: the labelled child looked up once, not on every frame.
_DLG_LAG = metrics.STREAM_LAG.labels(stream_kind="dlg")

SERVICE = "router"
# A round with at most this many user frames scores them on the event loop; more go to a thread. Handing
# the detector to a thread and back costs this process ~0.2-0.3 ms of CPU per round (two wake-ups: ~0.7
# against ~0.55 ms for one loud frame, ~2.6 against ~2.3 ms for ten, measured alone), and the round waits
# for the scores either way; past this many (a few ms of silero) the loop stays free for the other tasks.
INLINE_SPEECH_FRAMES = 16
# In the session hash: the session detail's `counters` (docs/api.md).
VOICE_SWITCHES_COUNTER = "voice_switches"
FRAMES_DROPPED_COUNTER = "frames_dropped"


@dataclass
class RoutedSession:
    sid: str
    mixer: Mixer
    detector: SpeechStream
    edges: SpeechEdges
    cursors: dict[str, str]  # stream key -> id of the last entry read
    pending: MixerOutput = field(default_factory=MixerOutput)  # produced outside the route loop
    stop_reason: str | None = None


class Router:
    def __init__(
        self,
        bus: Bus,
        settings: RouterSettings,
        detector: SpeechDetector[Any],
    ) -> None:
        self.bus = bus
        self.names = bus.names
        self.settings = settings
        self.worker_id = settings.worker_id
        self.store = SessionStore(bus, settings.session_ttl_s)
        self.detector = detector  # each session gets its own stream of it
        self.sessions: dict[str, RoutedSession] = {}
        self.ownership = SessionOwnership(
            bus, self.store, service=SERVICE, group=SERVICE, worker_id=self.worker_id, field="router_worker"
        )
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
        self._changed = asyncio.Event()
        self._lane = bus.lane()  # the route loop's own connection: its read and its write each tick

    def describe(self) -> WorkerFields:
        return {"sessions": len(self.sessions)}

    async def warmup(self) -> None:
        """Nothing to build before the first session: the speech detector is loaded."""

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop`. Sessions stay owned, not ended: another router takes them over."""
        await self.ownership.set_leftovers_aside()
        try:
            await self._serve(stop)
        finally:
            await self._lane.close()

    async def _serve(self, stop: asyncio.Event) -> None:
        own = self.ownership
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.consumer.run(stop), name="control_group")
            own.start_loops(
                tasks,
                stop,
                apply=self._apply,
                sessions=lambda: list(self.sessions),
                on_over=self._on_over,
                capacity=lambda: 1_000_000,  # routing is cheap: a router takes every orphan
                on_takeover=self._on_takeover,
                check_s=self.settings.session_check_s,
                poll_s=self.settings.failover_poll_s,
            )
            tasks.create_task(keep_running("route", lambda: self._route(stop), stop), name="route")
            tasks.create_task(
                keep_running("tts watch", lambda: self._watch_tts(stop), stop), name="tts_watch"
            )

    # --- control -------------------------------------------------------------------------------

    async def _on_control(self, message: ControlMessage, entry: Entry) -> None:
        """Group delivery: take `start`s (`update`/`stop` come on each session's control stream)."""
        if not isinstance(message, SessionStart) or message.session_id in self.sessions:
            return
        if (start := await self.ownership.admit(message)) is not None:
            await self._open(start, failover=False)

    async def _on_takeover(self, takeover: Takeover) -> None:
        await self._open(takeover.start, failover=True)

    async def _open(self, start: SessionStart, *, failover: bool) -> None:
        sid = start.session_id
        names = self.names
        streams = [names.session_dialogue(sid), names.session_tts(sid), names.session_input(sid)]
        if failover:
            cursors = {s: await self.bus.last_id(s) for s in streams}
            first_seq = await next_seq(self.bus, names.session_output(sid), OUTPUT)
        else:
            cursors, first_seq = dict.fromkeys(streams, "0-0"), 0
        mixer = Mixer(
            sid,
            start.voice,
            start.voice_mode,
            budget_frames=self.settings.router_budget_frames,
            queue_frames=self.settings.router_cloned_queue_frames,
            first_seq=first_seq,
        )
        s = self.settings
        session = RoutedSession(
            sid,
            mixer,
            self.detector.stream(),
            SpeechEdges(s.router_vad_threshold, s.router_vad_start_frames, s.router_vad_stop_frames),
            cursors,
        )
        await self._check_tts([session])
        if sid in self.ownership.stops:  # stopped while we were opening it: end it properly
            session.stop_reason = "stopped"
        self.sessions[sid] = session
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        self._changed.set()
        log.info(
            "routing session",
            extra={"session_id": sid, "voice": mixer.voice, "voice_mode": mixer.mode, "failover": failover},
        )

    async def _apply(self, message: ControlMessage) -> None:
        session = self.sessions.get(message.session_id)
        if session is None:
            return
        if isinstance(message, SessionStop):
            session.stop_reason = message.reason
            self._changed.set()
        elif isinstance(message, SessionUpdate):
            session.pending.merge(session.mixer.set_voice(message.voice, message.voice_mode))

    async def _on_over(self, sid: str, liveness: Liveness) -> None:
        session = self.sessions.get(sid)
        if session is None:
            return
        if liveness in (Liveness.MOVED, Liveness.GONE):
            await self._forget(sid, liveness)
        elif session.stop_reason is None:
            session.stop_reason = liveness.value
            self._changed.set()

    async def _forget(self, sid: str, why: Liveness) -> None:
        """Let go without a word: another router owns the session now, or Redis lost it."""
        if self.sessions.pop(sid, None) is None:
            return
        await self.ownership.release(sid)
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        log.warning("session let go: %s", why, extra={"session_id": sid})

    # --- the route loop ------------------------------------------------------------------------

    @property
    def _block_ms(self) -> int:
        return self.settings.router_read_block_ms

    async def _route(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._finish_stopped()
            if not self.sessions:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._block_ms / 1000)
                continue
            await self.route_once()

    async def route_once(self) -> None:
        """One round for every owned session: wait for a dialogue tick or cloned audio, read everything
        new, dispatch it, write the output in one script (two when natively voiced sessions go ahead of the
        speech detector; the second only when the detector or a cloned session left something to write).

        User audio does not wake the router: its clients' frames arrive unsynchronized, and a round per
        frame costs a read, a speech-detector hand-off and a write per session and frame. A blocking XREAD
        over `:dlg` and `:tts` only wakes the round (at most `router_read_block_ms` apart: longer than a
        tick, so a live dialogue wakes it first, and speech is still detected while no dialogue ticks),
        then one XREAD of all three streams, without blocking, reads what it finds: both in one round trip
        per tick for all sessions (`Bus.read_when_woken`)."""
        sessions = list(self.sessions.values())
        owners = {key: s for s in sessions for key in s.cursors}
        cursors = {key: cursor for s in sessions for key, cursor in s.cursors.items()}
        user_streams = {self.names.session_input(s.sid) for s in sessions}
        pacing = {key: cursor for key, cursor in cursors.items() if key not in user_streams}
        entries = await self.bus.read_when_woken(
            pacing, cursors, count=self.settings.router_read_count, block_ms=self._block_ms, lane=self._lane
        )
        by_session: dict[str, list[Entry]] = {}
        for entry in entries:
            session = owners[entry.stream]
            session.cursors[entry.stream] = entry.entry_id
            by_session.setdefault(session.sid, []).append(entry)
        user_audio = [e for e in entries if e.stream in user_streams]
        # A session Moshi speaks for itself (no cloned audio wanted, so none queued for a barge-in to drop)
        # gets this round's frames out before the speech detector runs: silero is most of a round, and its
        # edges only add events (docs/performance.md, "The event loop and the router's order").
        ahead = [
            routed
            for sid in by_session
            if (routed := self.sessions.get(sid)) is not None and not routed.mixer.wants_tts
        ]
        if user_audio and ahead:
            for routed in ahead:
                self._dispatch(routed, by_session.pop(routed.sid), [])
            try:
                await self._publish(ahead)
            except Exception as exc:
                # The rest of the round was read too (the cursors moved): it is still scored and dispatched.
                # What was not written went back to its sessions, and the write below retries it.
                sids = [routed.sid for routed in ahead]
                log.warning("output not written yet: %r", exc, extra={"session_ids": sids})
        if len(user_audio) > INLINE_SPEECH_FRAMES:
            speech = await asyncio.to_thread(self._detect_speech, owners, user_audio)
        else:
            speech = self._detect_speech(owners, user_audio) if user_audio else {}
        # The sessions with entries left (those that went ahead have none), and those with speech edges only.
        left = [*by_session, *(sid for sid in speech if sid not in by_session)]
        for sid in left:
            if (routed := self.sessions.get(sid)) is not None:
                self._dispatch(routed, by_session.get(sid, []), speech.get(sid, []))
        await self._publish(self.sessions.values())

    def _detect_speech(self, owners: dict[str, RoutedSession], entries: list[Entry]) -> dict[str, list[bool]]:
        """Speech edges per session, in input order (in a thread when the round has many frames: the VAD
        is a model). Every session's frames are scored together (one batched model call per round of
        windows)."""
        frames: list[tuple[RoutedSession, FloatAudio]] = []
        for entry in entries:
            if (pcm := _user_pcm(entry)) is not None:
                frames.append((owners[entry.stream], pcm16_to_float(pcm)))
        scores = self.detector.score([(session.detector, frame) for session, frame in frames])
        edges: dict[str, list[bool]] = {}
        for (session, _), probability in zip(frames, scores, strict=True):
            edge = session.edges.push(probability)
            if edge is not None:
                edges.setdefault(session.sid, []).append(edge)
        return edges

    def _dispatch(self, session: RoutedSession, entries: list[Entry], speech: list[bool]) -> None:
        """Cloned audio first, then user speech, then dialogue ticks: a tick sees what arrived with it (a
        natively voiced session's ticks come here ahead of the round's speech, which then comes alone)."""
        out, mixer = session.pending, session.mixer
        tts_stream = self.names.session_tts(session.sid)
        dialogue_stream = self.names.session_dialogue(session.sid)
        for entry in entries:
            if entry.stream == tts_stream and (tts := _decode(TTS, entry)) is not None:
                out.merge(mixer.on_tts(tts))
        for started in speech:
            out.merge(mixer.on_user_speech(started))
        now = time.time()
        for entry in entries:
            if entry.stream == dialogue_stream:
                dialogue = _dialogue(entry)
                if dialogue is not None:
                    _DLG_LAG.observe(max(0.0, now - dialogue.created_at))
                    out.merge(mixer.on_dialogue(dialogue))

    async def _publish(self, sessions: Iterable[RoutedSession]) -> None:
        taken = [(session, session.pending) for session in sessions]
        outputs: dict[str, list[tuple[str, Envelope]]] = {}
        flushes: list[SessionFlush] = []
        for session, out in taken:
            session.pending = MixerOutput()
            stream = self.names.session_output(session.sid)
            outputs[session.sid] = [(stream, message) for message in out.messages]
            if out.flush_tts:
                flushes.append(SessionFlush(session_id=session.sid))
        try:
            # Flushes first: control beats data (the TTS drops what the user interrupted as early as
            # possible, and whoever sees the barge-in on :out finds the flush already asked for).
            for flush in flushes:  # on the session's control stream, which its TTS worker reads
                await self.bus.append_control(flush)
            lost = await self.bus.append_sessions(outputs, self.ownership.fence, lane=self._lane)
        except Exception:
            # Not written (Redis away): each session gets its output back, ahead of what comes next, and
            # the next round writes it (`ready` or `ended` must not be lost; the gateway drops repeats).
            for session, out in taken:
                session.pending = out.merge(session.pending)
            raise
        for session, out in taken:
            for to, reason in out.switches:
                metrics.VOICE_SWITCHES.labels(to=to, reason=reason).inc()
                log.info("audio source switched to %s (%s)", to, reason, extra={"session_id": session.sid})
            for dropped, count in out.dropped.items():
                metrics.FRAMES_DROPPED.labels(service=SERVICE, reason=dropped).inc(count)
            if out.switches or out.dropped:  # rare (a switch, a late phrase): one call then, none per frame
                await self._count(session.sid, len(out.switches), sum(out.dropped.values()))
        for sid in lost:
            await self._forget(sid, Liveness.MOVED)

    async def _count(self, sid: str, switches: int, dropped: int) -> None:
        """The session detail's `voice_switches` and `frames_dropped`; its output is written already, so a
        count Redis refuses is logged, not retried."""
        try:
            if switches:
                await self.store.count(sid, VOICE_SWITCHES_COUNTER, switches)
            if dropped:
                await self.store.count(sid, FRAMES_DROPPED_COUNTER, dropped)
        except Exception:
            log.warning("could not count a session's switches and drops", extra={"session_id": sid})

    async def _finish_stopped(self) -> None:
        stopped = [s for s in self.sessions.values() if s.stop_reason is not None]
        if not stopped:
            return
        for session in stopped:
            session.pending.merge(session.mixer.end(session.stop_reason or ""))
        await self._publish(stopped)
        for session in stopped:
            await self.ownership.release(session.sid)
            await self.bus.expire_session(session.sid)
            self.sessions.pop(session.sid, None)
            log.info("session ended", extra={"session_id": session.sid, "reason": session.stop_reason})
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))

    # --- TTS presence --------------------------------------------------------------------------

    async def _watch_tts(self, stop: asyncio.Event) -> None:
        interval = self.settings.router_tts_check_frames * FRAME_SEC
        while not stop.is_set():
            await self._check_tts(list(self.sessions.values()))
            await sleep_unless_stopped(stop, interval)

    async def _check_tts(self, sessions: list[RoutedSession]) -> None:
        """A session's TTS is up when the worker named in its hash (`tts_worker`) is alive, or, before
        one is named, while a live TTS worker has room to take its start. Every worker full (or still
        loading), the start waits in the `tts` group and nobody speaks the session: counted as up, a
        cloned session played silence with nothing said to the client."""
        sessions = [s for s in sessions if s.mixer.wants_tts]
        if not sessions:
            return
        workers = await list_workers(self.bus, "tts")
        alive = {worker.worker_id for worker in workers}
        room = any(worker.free_slots > 0 for worker in workers)
        named = await self.store.tts_workers([session.sid for session in sessions])
        for session, worker in zip(sessions, named, strict=True):
            up = worker in alive if worker else room
            session.pending.merge(session.mixer.set_tts_available(up))


M = typing.TypeVar("M", bound=Envelope)


def _decode(codec: Codec[M], entry: Entry) -> M | None:
    try:
        return codec.decode(entry.fields)
    except MalformedMessage as exc:
        log.warning("malformed entry skipped: %s", exc.detail, extra={"stream": entry.stream})
        return None


# The lean path: the conversation's frames (a user's `UserAudio`, the dialogue's `DialogueFrame`) are read
# as their fields (`lean_frame`: checked as their models check them, without building one); anything else,
# events and every malformed entry included, goes through its codec, refused and logged as always.


def _user_pcm(entry: Entry) -> bytes | None:
    """A user frame's PCM from a `:in` entry; None for events and malformed entries (logged)."""
    if (frame := lean_frame(UserAudio, entry.fields)) is not None:
        return frame.pcm
    message = _decode(INPUT, entry)
    return message.pcm if isinstance(message, UserAudio) else None


def _dialogue(entry: Entry) -> DialogueMessage | LeanFrame | None:
    """A `:dlg` entry: a frame's fields, an event, or None when malformed (logged)."""
    frame = lean_frame(DialogueFrame, entry.fields)
    return frame if frame is not None else _decode(DIALOGUE, entry)
