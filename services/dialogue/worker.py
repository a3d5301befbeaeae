"""`chorus dialogue`: one Moshi worker serving up to CHORUS_DIALOGUE_SLOTS sessions in one batch.

Three loops share one slot table (batcher.py):
- placement: this model's consumer group on chorus:control takes a `start` while a slot is free and
  holds it while the session lives; a dead worker's held starts go idle and another worker claims
  them (failover: the session is primed again with its persona and transcript, and `resumed` is sent);
- control: every worker tails chorus:control for `update` / `stop` of the sessions it owns;
- ticks: every 80 ms, ONE read of all live sessions' input streams, ONE batched model step in the
  model thread (the event loop never waits on a forward pass), ONE write of all their frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.dialogue.batcher import Batcher, Phase, RowOutput
from services.dialogue.inputs import Arrival, InputTimeline, Take
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.priming import ASSISTANT, primer_tokens, spoken_so_far
from services.dialogue.settings import DialogueSettings, get_settings
from shared import metrics
from shared.audio import FRAME_SAMPLES, float_to_pcm16, pcm16_to_float
from shared.bus import Bus, Entry, GroupConsumer, Handled, tail
from shared.errors import MalformedMessage, NoCapacity
from shared.messages import (
    CONTROL,
    DIALOGUE,
    INPUT,
    NATIVE_VOICES,
    ControlMessage,
    DialogueFrame,
    Envelope,
    EventName,
    SessionEvent,
    SessionStart,
    SessionStop,
    SessionUpdate,
    UserAudio,
)
from shared.presence import WorkerFields, WorkerPresence
from shared.runtime import ServiceRuntime
from shared.sessions import SessionState, SessionStore

log = logging.getLogger(__name__)

SERVICE = "dialogue"
T = TypeVar("T")


def placement_group(model: str) -> str:
    """One consumer group per model: a start is placed by the workers of the model it needs."""
    return f"{SERVICE}-{model}"


def required_model(start: SessionStart) -> str | None:
    """The model a session needs: named, or implied by a native voice; None = any (cloned voices)."""
    return start.model or (start.voice if start.voice in NATIVE_VOICES else None)


@dataclass
class Session:
    """A session this worker serves: its I/O side (its model side is the batcher's slot `row`)."""

    start: SessionStart
    entry_id: str  # the held start entry
    row: int
    timeline: InputTimeline
    next_seq: int  # of the next entry on :dlg
    resumed_from: str | None
    primer_tokens: int
    cursor: str | None = None  # position in :in, from the moment the session listens
    late_frames: int = 0

    @property
    def sid(self) -> str:
        return self.start.session_id

    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1


class TickClock:
    """Paces ticks at a fixed interval. A late tick is followed at once; one more than a whole interval
    late re-bases the clock (no burst of catch-up ticks)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = time.monotonic()

    def restart(self) -> None:
        self._next = time.monotonic()

    async def wait(self, stop: asyncio.Event) -> None:
        self._next += self.interval_s
        delay = self._next - time.monotonic()
        if delay < 0:
            metrics.TICK_OVERRUNS.labels(service=SERVICE).inc()
            if delay < -self.interval_s:
                self._next = time.monotonic()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


class DialogueWorker:
    def __init__(
        self,
        bus: Bus,
        settings: DialogueSettings,
        model: MoshiModel,
        presence: WorkerPresence | None = None,
    ) -> None:
        self.bus = bus
        self.presence = presence  # beaten at once when a slot is taken or freed: placement sees it now
        self.settings = settings
        self.model = model
        self.worker_id = settings.worker_id
        compile_ = settings.dialogue_compile
        self.batcher = Batcher(
            model,
            settings.dialogue_slots,
            audio_temperature=settings.dialogue_audio_temperature,
            audio_top_k=settings.dialogue_audio_top_k,
            compile=model.device.type == "cuda" if compile_ is None else compile_,
        )
        self.sessions: dict[str, Session] = {}
        self.store = SessionStore(bus, settings.session_ttl_s)
        self.consumer: GroupConsumer[ControlMessage] = GroupConsumer(
            bus,
            bus.names.control,
            placement_group(model.name),
            self.worker_id,
            CONTROL,
            self._on_control,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
            batch=1,  # take one start at a time, so a burst spreads over the workers with free slots
            claim_batch=settings.dialogue_slots,
            can_take=self.can_take,
        )
        self._table = asyncio.Lock()  # the slot table changes only between steps
        self._joined = asyncio.Event()
        self._ended: OrderedDict[str, None] = OrderedDict()  # recently stopped: a late start is ignored
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="dialogue-model")
        self._tick = 0
        metrics.WORKER_SLOTS_TOTAL.labels(service=SERVICE).set(self.batcher.batch_size)
        metrics.WORKER_SLOTS_FREE.labels(service=SERVICE).set(self.batcher.batch_size)

    # --- presence ------------------------------------------------------------------------------

    def can_take(self) -> bool:
        return bool(self.batcher.free_rows())

    def describe(self) -> WorkerFields:
        return {
            "capacity": self.batcher.batch_size,
            "free_slots": len(self.batcher.free_rows()),
            "model": self.model.name,
            "checkpoint": self.model.source,
            "device": str(self.model.device),
            "group": placement_group(self.model.name),
        }

    # --- the core loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self._in_model_thread(self.batcher.warmup)
        log.info("dialogue worker serving", extra=self.describe())
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.consumer.run(stop), name="placement")
                tasks.create_task(self._follow_control(stop), name="control")
                tasks.create_task(self._tick_loop(stop), name="ticks")
        finally:
            if self.sessions:
                # Their starts stay pending: another worker claims and resumes them.
                log.info("leaving sessions for re-placement", extra={"sessions": sorted(self.sessions)})
            self._model_thread.shutdown(wait=True)
            self.batcher.close()

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        clock = TickClock(self.settings.dialogue_tick_ms / 1000)
        while not stop.is_set():
            if not self.sessions:
                await self._wait_for_sessions(stop)
                clock.restart()
                continue
            async with self._table:
                await self._read_inputs()
                audio = self._frames_due()
                started = time.monotonic()
                prime_until = (
                    started + 0.75 * clock.interval_s if self.settings.dialogue_prime_ahead else None
                )
                outputs = await self._in_model_thread(self.batcher.step, audio, prime_until=prime_until)
                metrics.STAGE_LATENCY.labels(stage="dialogue_step").observe(time.monotonic() - started)
                await self._publish(outputs)
            await clock.wait(stop)

    # --- input: one XREAD for every listening session, one frame per row -----------------------------

    def _listening(self) -> list[Session]:
        return [s for s in self.sessions.values() if self.batcher.slots[s.row].phase is Phase.LIVE]

    async def _read_inputs(self) -> None:
        listening = self._listening()
        for session in listening:
            if session.cursor is None:  # it starts listening now; earlier audio was not heard
                session.cursor = await self.bus.last_id(self.bus.names.session_input(session.sid))
        by_stream = {self.bus.names.session_input(s.sid): s for s in listening}
        if not by_stream:
            return
        cursors = {stream: s.cursor or "0-0" for stream, s in by_stream.items()}
        entries = await self.bus.read(cursors, count=self.settings.dialogue_input_buffer_frames)
        for entry in entries:
            session = by_stream[entry.stream]
            session.cursor = entry.entry_id
            self._accept_input(session, entry)

    def _accept_input(self, session: Session, entry: Entry) -> None:
        try:
            message = INPUT.decode(entry.fields)
        except MalformedMessage as exc:
            log.warning("malformed input entry skipped: %s", exc.detail, extra={"session_id": session.sid})
            return
        if not isinstance(message, UserAudio):
            return
        metrics.STREAM_LAG.labels(stream_kind="in").observe(max(0.0, time.time() - message.created_at))
        if message.is_stale():
            metrics.FRAMES_DROPPED.labels(service=SERVICE, reason="stale").inc()
            return
        arrival = session.timeline.push(message.seq, message.pcm)
        if arrival is Arrival.LATE:
            session.late_frames += 1
            metrics.FRAMES_DROPPED.labels(service=SERVICE, reason="late").inc()
            if session.late_frames in (1, 10) or session.late_frames % 100 == 0:
                log.warning(
                    "late input frame dropped (its tick was filled with silence)",
                    extra={"session_id": session.sid, "seq": message.seq, "late_frames": session.late_frames},
                )
        elif arrival is Arrival.OVERFLOW:
            metrics.FRAMES_DROPPED.labels(service=SERVICE, reason="overflow").inc()

    def _frames_due(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        audio = np.zeros((self.batcher.batch_size, FRAME_SAMPLES), dtype=np.float32)
        for session in self._listening():
            taken, pcm = session.timeline.take()
            if pcm is not None:
                audio[session.row] = pcm16_to_float(pcm)
            elif taken is Take.MISSING:
                metrics.FRAMES_FILLED.inc()
        return audio

    # --- output: one pipeline with every session's frame ---------------------------------------

    async def _publish(self, outputs: list[RowOutput]) -> None:
        entries: list[tuple[str, Envelope]] = []
        writes: list[Awaitable[Any]] = []
        for out in outputs:
            session = self.sessions.get(out.session_id)
            if session is None:
                continue
            stream = self.bus.names.session_dialogue(session.sid)
            if out.went_live:
                entries.append((stream, self._started_event(session)))
                writes.append(self.store.update(session.sid, state=SessionState.ACTIVE))
            if out.pcm is None or out.text_token is None:
                continue
            seq = session.take_seq()
            text = self.model.text_piece(out.text_token)
            pcm = float_to_pcm16(out.pcm)
            entries.append((stream, DialogueFrame(session_id=session.sid, seq=seq, text=text, pcm=pcm)))
            if text:
                writes.append(self.store.append_transcript(session.sid, ASSISTANT, text, seq=seq))
        self._tick += 1
        if self._tick % 25 == 0:  # every 2 s: live sessions keep their hash alive
            writes.extend(self.store.update(sid, dialogue_worker=self.worker_id) for sid in self.sessions)
        await self.bus.append_many(entries)
        await asyncio.gather(*writes)

    def _started_event(self, session: Session) -> SessionEvent:
        data: dict[str, Any] = {
            "worker": self.worker_id,
            "slot": session.row,
            "model": self.model.name,
            "primer_tokens": session.primer_tokens,
        }
        name = EventName.READY
        if session.resumed_from is not None:
            name, data["previous_worker"] = EventName.RESUMED, session.resumed_from
        log.info("session %s", name, extra={"session_id": session.sid, **data})
        return SessionEvent(session_id=session.sid, seq=session.take_seq(), name=name, data=data)

    # --- placement -----------------------------------------------------------------------------

    async def _on_control(self, message: ControlMessage, entry: Entry) -> str:
        """Placement group handler: starts only (update/stop reach every worker through the tail)."""
        if not isinstance(message, SessionStart) or required_model(message) not in (None, self.model.name):
            return Handled.ACK
        sid = message.session_id
        if sid in self.sessions or sid in self._ended:
            return Handled.ACK
        state = await self.store.get(sid)
        if state.get("state") == SessionState.ENDED:
            return Handled.ACK
        # `dialogue_owner` = "model/worker", set atomically: who serves it, and from which group.
        previous = state.get("dialogue_owner", "")
        previous_model, _, previous_worker = previous.partition("/")
        if previous and previous_model != self.model.name:
            return Handled.ACK  # the other model's group placed this any-model session
        if not self.can_take():
            raise NoCapacity("no free slot; the start stays pending for another worker", session_id=sid)
        owner = f"{self.model.name}/{self.worker_id}"
        if not await self.store.compare_and_set(sid, "dialogue_owner", previous, owner):
            return Handled.ACK  # another worker won it
        # Held by a worker of this group that is gone (its entry went idle and was claimed): a failover.
        resumed_from = previous_worker if previous_worker not in ("", self.worker_id) else None
        placed = await self._place(message, entry.entry_id, resumed_from)
        return Handled.HOLD if placed else Handled.ACK

    async def _place(self, start: SessionStart, entry_id: str, resumed_from: str | None) -> bool:
        sid = start.session_id
        spoken = spoken_so_far(await self.store.transcript(sid)) if resumed_from else ""
        tokens = primer_tokens(
            self.model.encode_text, start.persona.primer, spoken, self.settings.dialogue_max_primer_tokens
        )
        next_seq = await self._next_dialogue_seq(sid)
        s = self.settings
        async with self._table:
            if sid in self._ended:  # stopped while we were placing it
                return False
            row = self.batcher.join(sid, tokens, start.persona.sampling)
            timeline = InputTimeline(s.dialogue_input_buffer_frames, s.dialogue_jitter_frames)
            self.sessions[sid] = Session(start, entry_id, row, timeline, next_seq, resumed_from, len(tokens))
        await self._slots_changed()
        self._joined.set()
        state = SessionState.RESUMING if resumed_from else SessionState.PLACING
        await self.store.update(sid, state=state, dialogue_worker=self.worker_id, dialogue_slot=row)
        metrics.SESSIONS_PLACED.labels(service=SERVICE, kind="resumed" if resumed_from else "new").inc()
        log.info(
            "session placed",
            extra={"session_id": sid, "slot": row, "primer_tokens": len(tokens), "resumed": resumed_from},
        )
        return True

    async def _next_dialogue_seq(self, sid: str) -> int:
        """After a failover :dlg already holds entries: continue their numbering."""
        stream = self.bus.names.session_dialogue(sid)
        last = await self.bus.last_id(stream)
        if last == "0-0":
            return 0
        try:
            return DIALOGUE.decode((await self.bus.range(stream, last, last))[0].fields).seq + 1
        except (MalformedMessage, IndexError):
            return 0

    # --- update / stop -------------------------------------------------------------------------

    async def _follow_control(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async for message, _ in tail(self.bus, self.bus.names.control, CONTROL, stop=stop):
                    await self._apply_control(message)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("control tail failed, retrying: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _apply_control(self, message: ControlMessage) -> None:
        if isinstance(message, SessionStop):
            await self.end(message.session_id, message.reason)
        elif isinstance(message, SessionUpdate) and message.sampling is not None:
            session = self.sessions.get(message.session_id)
            if session is not None:
                async with self._table:
                    self.batcher.set_sampling(session.row, message.sampling)

    async def end(self, sid: str, reason: str) -> None:
        """Stop serving a session: free its row, send `ended`, release its start, let its keys expire."""
        self._ended[sid] = None
        while len(self._ended) > 1000:
            self._ended.popitem(last=False)
        async with self._table:
            session = self.sessions.pop(sid, None)
            if session is None:
                return
            ended = SessionEvent(session_id=sid, seq=session.take_seq(), name=EventName.ENDED, detail=reason)
            # `ended` goes out before the slot shows free: whoever sees the slot free finds it ended.
            await self.bus.append(self.bus.names.session_dialogue(sid), ended)
            self.batcher.leave(session.row)
        await self._slots_changed()
        await self.consumer.release(session.entry_id)
        await self.bus.expire_session(sid, self.settings.session_ttl_s)
        late = session.late_frames
        log.info("session ended", extra={"session_id": sid, "reason": reason, "late_frames": late})

    # --- helpers -------------------------------------------------------------------------------

    async def _wait_for_sessions(self, stop: asyncio.Event) -> None:
        self._joined.clear()
        waiters = [asyncio.ensure_future(self._joined.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _in_model_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, call)

    async def _slots_changed(self) -> None:
        metrics.SESSIONS_ACTIVE.labels(service=SERVICE).set(len(self.sessions))
        metrics.WORKER_SLOTS_FREE.labels(service=SERVICE).set(len(self.batcher.free_rows()))
        if self.presence is not None:
            try:
                await self.presence.beat()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("presence update failed (the next heartbeat retries): %s", exc)


# --- wiring ------------------------------------------------------------------------------------


class _Service:
    """Loads the model inside the runtime (heartbeats go on meanwhile), then runs the worker."""

    def __init__(self, settings: DialogueSettings) -> None:
        self.settings = settings
        self.worker: DialogueWorker | None = None

    def describe(self) -> WorkerFields:
        if self.worker is None:  # loading: present, but placing nothing here yet
            return {"capacity": self.settings.dialogue_slots, "free_slots": 0, "state": "loading"}
        return {**self.worker.describe(), "state": "serving"}

    async def ready(self, runtime: ServiceRuntime) -> tuple[bool, dict[str, Any]]:
        redis = await runtime.bus.ping()
        return redis and self.worker is not None, {"redis": redis, "model_loaded": self.worker is not None}

    async def serve(self, runtime: ServiceRuntime) -> None:
        model = await asyncio.to_thread(load_moshi, self.settings)
        self.worker = DialogueWorker(runtime.bus, self.settings, model, runtime.presence)
        await self.worker.run(runtime.stop)


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime(SERVICE, settings, http_port=settings.dialogue_http_port or None)
    service = _Service(settings)
    runtime.describe = service.describe
    runtime.ready_check = lambda: service.ready(runtime)
    asyncio.run(runtime.run(service.serve))
