"""A Moshi dialogue worker's core: up to CHORUS_DIALOGUE_SLOTS sessions served in one batch (the process
wiring is `worker.py`).

Loops sharing one slot table (batcher.py); sessions are owned through `shared.ownership`:
- placement: this model's consumer group on chorus:control takes a `start` while a slot is free;
- failover: sessions of a dead worker of this model move here while slots are free (primed again with
  their persona and transcript; `resumed` is sent);
- context rollover: a session whose state nears the model's context moves to a fresh state, primed the
  same way (batcher.py; `context_rollover` is sent);
- control: each worker reads the control streams of the sessions it owns (`update` / `stop`);
- liveness: sessions that ended, moved away or lost their lease are let go;
- ticks: every 80 ms, ONE read of all live sessions' input streams, ONE batched model step in the
  model thread (the event loop never waits on a forward pass), ONE fenced write of all their frames,
  which runs while the clock waits and the next tick reads and steps (off the step's critical path).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from services.dialogue.adapter_cache import AdapterCache, slots_for
from services.dialogue.adapters import NO_ADAPTER, AdapterBank, layer_shapes, resolve_graphs, resolve_kernel
from services.dialogue.batcher import Batcher, Phase, RolloverKind, RowOutput, Slot
from services.dialogue.inputs import Arrival, InputTimeline, Take
from services.dialogue.model import MoshiModel
from services.dialogue.priming import (
    ROLLOVER_SLACK_FRAMES,
    check_context,
    check_rollover_at,
    primer_tokens,
    rollover_head_start,
    rollover_threshold,
    spoken_so_far,
)
from services.dialogue.settings import DialogueSettings
from services.dialogue.ticks import TickClock, prime_deadline
from services.dialogue.utterances import UtteranceBuilder
from shared import metrics
from shared.adapter_store import AdapterRecord, AdapterStore
from shared.audio import FRAME_BYTES, FRAME_SAMPLES, float_to_pcm16, pcm16_to_float
from shared.bus import Bus, Entry, GroupConsumer, Handled
from shared.errors import ChorusError, MalformedMessage, NoCapacity, NotFound, Unprocessable
from shared.messages import (
    CONTROL,
    DIALOGUE,
    INPUT,
    ContextRollover,
    ControlMessage,
    DialogueFrame,
    Envelope,
    EventName,
    Failure,
    Placement,
    SessionEvent,
    SessionStart,
    SessionStop,
    SessionUpdate,
    UserAudio,
    model_of_voice,
)
from shared.ownership import Liveness, SessionOwnership, Takeover, next_seq
from shared.presence import WorkerFields, WorkerPresence, list_workers
from shared.retry import keep_running
from shared.sessions import SessionInfo, SessionState, SessionStore
from shared.storage import LocalStorage
from shared.transcripts import TranscriptLog, TranscriptWriter

log = logging.getLogger(__name__)

SERVICE = "dialogue"
MAX_HANDOFFS = 16  # a start naming an adapter is passed on at most this often, then placed where it is read
HANDOFF_FIRST_DELAY_S = 0.005  # doubled each hop, up to HANDOFF_MAX_DELAY_S: 16 hops take ~5 s at most
HANDOFF_MAX_DELAY_S = 0.5


def handoff_delay(handoffs: int) -> float:
    """How long a start passed on `handoffs` times already waits before its next hop."""
    return min(HANDOFF_FIRST_DELAY_S * 2.0**handoffs, HANDOFF_MAX_DELAY_S)


ROLLOVERS_COUNTER = "context_rollovers"  # in the session hash: the session detail's counters
SILENCE = bytes(FRAME_BYTES)  # a frame of a session re-primed in place (PCM16)
T = TypeVar("T")


def placement_group(model: str) -> str:
    """One consumer group per model: a start is placed by the workers of the model it needs."""
    return f"{SERVICE}-{model}"


def required_model(start: SessionStart) -> str | None:
    """The model a session needs: named, or implied by a native voice; None = any (cloned voices)."""
    return start.model or model_of_voice(start.voice)


@dataclass
class Session:
    """A session this worker serves: its I/O side (its model side is the batcher's slot `row`)."""

    start: SessionStart
    row: int
    timeline: InputTimeline
    next_seq: int  # of the next entry on :dlg
    resumed_from: str | None
    primer_tokens: int
    utterances: UtteranceBuilder
    cursor: str | None = None  # position in :in, from the moment the session listens
    late_frames: int = 0
    announce_due: bool = False  # its `ready` / `resumed` is not on :dlg yet (went live; the write failed)
    rollover_started: float = 0.0  # time.monotonic() of the last rollover's start
    ending: bool = False  # `end` is under way: no more frames

    @property
    def sid(self) -> str:
        return self.start.session_id

    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1


class DialogueWorker:
    def __init__(
        self,
        bus: Bus,
        settings: DialogueSettings,
        model: MoshiModel,
        presence: WorkerPresence | None = None,
        transcripts: TranscriptLog | None = None,
    ) -> None:
        self.bus = bus
        self.presence = presence  # beaten at once when a slot is taken or freed: placement sees it now
        self.settings = settings
        self.model = model
        self.worker_id = settings.worker_id
        compile_ = settings.dialogue_compile
        primer_bound = settings.dialogue_max_primer_tokens + max(model.lm.delays)  # the batcher's delay
        check_context(settings.dialogue_context, primer_bound)
        check_rollover_at(settings.dialogue_rollover_at, model.lm.context, primer_bound)
        self.rollover_at = rollover_threshold(settings.dialogue_rollover_at, model.lm.context, primer_bound)
        self.reserve = settings.dialogue_rollover_reserve  # rows kept free for rollovers
        if self.reserve and self.rollover_at is None:
            raise ValueError(
                f"CHORUS_DIALOGUE_ROLLOVER_RESERVE ({self.reserve}) keeps rows for context rollovers, and "
                "this worker rolls none over (CHORUS_DIALOGUE_ROLLOVER_AT 0, or a context under twice the "
                "rollover margin)"
            )
        # Sessions joining together come due for rollover this far apart: a fresh state primes within the
        # primer bound (one token a step at worst), and the kept rows prime that many at once.
        self._rollover_spacing = -(-primer_bound // self.reserve) if self.reserve else 0
        self.adapter_store = AdapterStore(LocalStorage(settings.data_dir))
        bank = self._adapter_bank()
        self.batcher = Batcher(
            model,
            settings.dialogue_slots,
            audio_temperature=settings.dialogue_audio_temperature,
            audio_top_k=settings.dialogue_audio_top_k,
            compile=model.device.type == "cuda" if compile_ is None else compile_,
            adapters=bank,
        )
        self.adapters = AdapterCache(bank, self.adapter_store, self._in_model_thread) if bank else None
        self.sessions: dict[str, Session] = {}
        self.store = SessionStore(bus, settings.session_ttl_s)
        self.ownership = SessionOwnership(
            bus,
            self.store,
            service=SERVICE,
            group=placement_group(model.name),
            worker_id=self.worker_id,
            field="dialogue_owner",  # "model/worker": who serves it, and from which group
            token_of=lambda worker_id: f"{model.name}/{worker_id}",
        )
        self.transcripts = TranscriptWriter(transcripts or TranscriptLog(LocalStorage(settings.data_dir)))
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
            can_take=self.can_take,
        )
        self._table = asyncio.Lock()  # the slot table changes only between steps
        self._placing = asyncio.Lock()  # placement and failover never count the same free slot
        self._joined = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="dialogue-model")
        self._publishing: asyncio.Task[set[str]] | None = None  # the write of the last tick, while in flight
        # The tick loop's own connections (`shared.bus.Lane`): its `:in` read, its write (in flight beside).
        self._read_lane, self._write_lane = bus.lane(), bus.lane()
        self._switches: dict[str, asyncio.Task[None]] = {}  # each session's latest adapter switch, running
        self._handoffs: set[asyncio.Task[None]] = set()  # starts being passed on (`_hand_off`)
        # A due rollover waits this long for a free slot, then goes in place.
        self._last_call = (self.rollover_at or 0) + ROLLOVER_SLACK_FRAMES
        metrics.WORKER_SLOTS_TOTAL.labels(service=SERVICE).set(self.capacity)
        metrics.WORKER_SLOTS_FREE.labels(service=SERVICE).set(self.capacity)

    # --- presence ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Sessions this worker serves at once: its rows, less those kept for rollovers."""
        return self.settings.dialogue_capacity

    def free_slots(self) -> int:
        """Sessions that placement and failover may seat now: the free rows, up to what the capacity
        leaves (the rows kept for rollovers, whether free or holding a fresh state, are not theirs)."""
        return max(0, min(len(self.batcher.free_rows()), self.capacity - self.batcher.seated_sessions()))

    def can_take(self) -> bool:
        return self.free_slots() > 0

    def describe(self) -> WorkerFields:
        fields: WorkerFields = {
            "capacity": self.capacity,
            "free_slots": self.free_slots(),
            "model": self.model.name,
            "checkpoint": self.model.source,
            "device": str(self.model.device),
            "group": placement_group(self.model.name),
        }
        if self.adapters is not None:
            fields.update(
                adapter_slots=self.adapters.bank.slots,
                adapter_max_rank=self.adapters.bank.max_rank,
                adapters=" ".join(self.adapters.held()),
            )
        return fields

    def _adapter_bank(self) -> AdapterBank | None:
        """Per-row LoRA on this worker's LM when CHORUS_DIALOGUE_ADAPTER_MEMORY allows a slot (before the
        batcher: the layers are wrapped before any CUDA graph is captured)."""
        s = self.settings
        if not s.dialogue_adapter_memory:
            return None
        lm = self.model.lm
        rank = s.dialogue_adapter_max_rank
        slots = slots_for(lm, s.dialogue_adapter_memory, rank)
        graphs = resolve_graphs(s.dialogue_lora_graphs, lm, rank, s.dialogue_lora_kernel)
        kernel = resolve_kernel(s.dialogue_lora_kernel, lm, rank, graphs=graphs)
        log.info(
            "adapter bank: %d slots of rank %d, %s kernel, CUDA graphs with adapters %s",
            slots,
            rank,
            kernel,
            "on" if graphs else "off",
        )
        return AdapterBank(lm, s.dialogue_slots, slots, rank, kernel=kernel, static=graphs)

    # --- the core loop -------------------------------------------------------------------------

    async def warmup(self) -> None:
        """Build kernels (and CUDA graphs) before the first session: a worker is ready only after this.
        Then everything alive (the model, its graphs, the imports) is moved out of the collector's sight:
        the collections a tick still triggers walk only what the ticks themselves allocate."""
        await self._in_model_thread(self.batcher.warmup)
        gc.collect()
        gc.freeze()

    async def run(self, stop: asyncio.Event) -> None:
        if not self.batcher.warmed_up:
            await self.warmup()
        log.info("dialogue worker serving", extra={**self.describe(), "rollover_at": self.rollover_at})
        await self.ownership.set_leftovers_aside()
        await self.adapter_store.publish_layers(self.model.name, layer_shapes(self.model.lm))
        writer = asyncio.create_task(self.transcripts.run(), name="transcripts")
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.consumer.run(stop), name="placement")
                self.ownership.start_loops(
                    tasks,
                    stop,
                    apply=self._apply_control,
                    sessions=lambda: list(self.sessions),
                    on_over=self._on_over,
                    capacity=self.free_slots,
                    on_takeover=self._on_takeover,
                    check_s=self.settings.session_check_s,
                    poll_s=self.settings.failover_poll_s,
                    placing=self._placing,
                )
                tasks.create_task(keep_running("ticks", lambda: self._tick_loop(stop), stop), name="ticks")
        finally:
            if self.sessions:
                # Owned still: once this worker's presence is gone, another worker takes them over.
                log.info("leaving sessions for re-placement", extra={"sessions": sorted(self.sessions)})
            await self.transcripts.drain()
            writer.cancel()
            for switch in list(self._switches.values()):
                switch.cancel()  # the session is re-placed with what the hash holds
            for handoff in list(self._handoffs):
                handoff.cancel()  # its entry stays pending: another worker claims it
            self._model_thread.shutdown(wait=True)
            self.batcher.close()
            if self.adapters is not None:
                self.adapters.bank.remove()  # the LM as it was loaded (a test may batch it again)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        """Read, step, and hand the tick's frames to a write that runs while the clock waits and the next
        step computes: a tick's budget is its read and its step, never the round trip of its output."""
        clock = TickClock(self.settings.dialogue_tick_ms / 1000)
        try:
            while not stop.is_set():
                if not self.sessions:
                    await self._published()
                    await self._wait_for_sessions(stop)
                    clock.restart()
                    continue
                async with self._table:
                    slots_moved = await self._roll_over_due()
                    await self._read_inputs()
                    audio = self._frames_due()
                    started = time.monotonic()
                    prime_until = self._prime_until(started, clock.interval_s)
                    outputs = await self._in_model_thread(self.batcher.step, audio, prime_until=prime_until)
                    metrics.STAGE_LATENCY.labels(stage="dialogue_step").observe(time.monotonic() - started)
                    slots_moved = self._took_over(outputs) or slots_moved
                if slots_moved:  # a rollover took a free slot, or gave one back
                    await self._slots_changed()
                await self._published()  # one write in flight at a time: a session's entries stay in order
                self._publishing = asyncio.create_task(self._publish(outputs), name="publish")
                await clock.wait(stop)
        finally:
            try:
                await self._published()
            finally:  # a write that failed still gives the lanes' connections back
                await self._read_lane.close()
                await self._write_lane.close()

    async def _published(self) -> None:
        """The previous tick's write has landed; the sessions it found moved away are let go."""
        task, self._publishing = self._publishing, None
        if task is None or not (lost := await task):
            return
        try:  # a write the fence refused: another worker owns the session, or its hash is gone (rare)
            found = await self.ownership.check(lost)
        except Exception:
            found = {}
        for sid in lost:
            await self._forget(sid, Liveness.GONE if found.get(sid) is Liveness.GONE else Liveness.MOVED)

    def _prime_until(self, started: float, interval_s: float) -> float | None:
        """How long a tick's spare time may go on priming steps (`ticks.prime_deadline`); none when off."""
        if not self.settings.dialogue_prime_ahead:
            return None
        return prime_deadline(started, interval_s, live=bool(self._listening()))

    # --- context rollover ---------------------------------------------------------------------------

    async def _roll_over_due(self) -> bool:
        """Start the rollover of every session whose state reached `rollover_at` (between steps); True when
        one took a free slot."""
        if self.rollover_at is None:
            return False
        took_slot = False
        # The oldest state first: nearest its last call (one due early by its head start can wait longer).
        for slot in sorted(self.batcher.due_rollovers(self.rollover_at), key=lambda s: -s.age):
            session = self.sessions.get(slot.session_id or "")
            if session is None or self._rollover_kind(slot) is None:
                continue
            history = self.settings.dialogue_rollover_history_tokens
            tokens = self._primer(session.start, await self._spoken_lately(session, history), history)
            # Asked again: a placement or takeover may have begun during the read.
            if (route := self._rollover_kind(slot)) is None:
                continue
            kind = self.batcher.roll_over(slot.row, tokens, in_place=route is RolloverKind.IN_PLACE)
            session.rollover_started = time.monotonic()
            took_slot = took_slot or kind is RolloverKind.FREE_SLOT
            extra = {
                "session_id": session.sid,
                "kind": kind,
                "frames": slot.age,
                "primer_tokens": len(tokens),
            }
            if kind is RolloverKind.IN_PLACE:
                log.warning(
                    "context rollover in place (no free row by its last call): the session pauses while "
                    "it is primed",
                    extra=extra,
                )
            else:
                log.info("context rollover started on a free slot", extra=extra)
        return took_slot

    def _rollover_kind(self, slot: Slot) -> RolloverKind | None:
        """How a due rollover goes now, or None while it waits. On a free row, unless a placement or
        takeover under way may need it: it counted the free rows as its own (taking one would make its join
        find none), all but the reserve's, so a rollover may take a row while fewer rollovers than the
        reserve hold one. Otherwise it waits for a row (another rollover frees one, the placement ends), at
        most until its last call, then goes in place: a pause, never a context that overflows, however
        long a placement takes (an adapter's load, a failover seating many sessions)."""
        placement_may_need = self._placing.locked() and self.batcher.fresh_rows() >= self.reserve
        if self.batcher.free_rows() and not placement_may_need:
            return RolloverKind.FREE_SLOT
        return RolloverKind.IN_PLACE if slot.age >= self._last_call else None

    async def _spoken_lately(self, session: Session, history_tokens: int) -> str:
        """The tail of what the session said: its last utterances (each is a token at least) and the one in
        progress."""
        utterances = await self.store.transcript(session.sid, last=history_tokens)
        if (current := session.utterances.current) is not None:
            utterances.append(current.record())
        return spoken_so_far(utterances)

    def _took_over(self, outputs: list[RowOutput]) -> bool:
        """Sessions whose fresh state took over this step: their row is the fresh one's from the next tick
        on. True when one freed a slot."""
        freed = False
        for out in outputs:
            if out.rollover is None or (session := self.sessions.get(out.session_id)) is None:
                continue
            kind = out.rollover.kind
            freed = freed or kind is RolloverKind.FREE_SLOT
            session.row = out.row
            metrics.CONTEXT_ROLLOVERS.labels(kind=kind).inc()
            took = time.monotonic() - session.rollover_started
            metrics.CONTEXT_ROLLOVER_SECONDS.labels(kind=kind).observe(took)
            log.info(
                "context rollover done",
                extra={
                    "session_id": session.sid,
                    "kind": kind,
                    "slot": out.row,
                    "seconds": round(took, 3),
                    "gap_frames": out.rollover.gap_frames,
                },
            )
        return freed

    # --- input: one XREAD for every listening session, one frame per row -----------------------------

    def _listening(self) -> list[Session]:
        """Sessions whose user is heard: live, or re-primed in place after they were (their frames are
        taken and dropped meanwhile, so none pile up as latency)."""
        return [
            s
            for s in self.sessions.values()
            if s.cursor is not None or self.batcher.slots[s.row].phase is Phase.LIVE
        ]

    async def _read_inputs(self) -> None:
        listening = self._listening()
        for session in listening:
            if session.cursor is None:  # it starts listening now; earlier audio was not heard
                session.cursor = await self.bus.last_id(self.bus.names.session_input(session.sid))
        by_stream = {self.bus.names.session_input(s.sid): s for s in listening}
        if not by_stream:
            return
        cursors = {stream: s.cursor or "0-0" for stream, s in by_stream.items()}
        entries = await self.bus.read(
            cursors, count=self.settings.dialogue_input_buffer_frames, lane=self._read_lane
        )
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

    # --- output: one fenced write with every session's frame -----------------------------------

    async def _publish(self, outputs: list[RowOutput]) -> set[str]:
        """Every session's entries of one tick in one fenced write; returns the sessions it found lost (moved
        to another worker). Takes no lock: it runs beside the next step."""
        writes: dict[str, list[tuple[str, Envelope]]] = {}
        went_live: list[str] = []
        spoke: dict[str, list[dict[str, Any]]] = {}  # sessions with text this tick: utterances it closed
        rolled: dict[str, int] = {}  # sessions whose fresh state took over this tick: its row
        for out in outputs:
            session = self.sessions.get(out.session_id)
            if session is None or session.ending:
                continue
            stream = self.bus.names.session_dialogue(session.sid)
            entries = writes.setdefault(session.sid, [])
            session.announce_due = session.announce_due or out.went_live
            if session.announce_due:
                entries.append((stream, self._started_event(session)))
                went_live.append(session.sid)
            if out.rollover is not None:
                entries.append((stream, self._rollover_event(session, out)))
                rolled[session.sid] = out.row
            if out.gap:
                text, pcm = "", SILENCE
            elif out.pcm is not None and out.text_token is not None:
                text, pcm = self.model.text_piece(out.text_token), float_to_pcm16(out.pcm)
            else:
                continue
            seq = session.take_seq()
            entries.append((stream, DialogueFrame(session_id=session.sid, seq=seq, text=text, pcm=pcm)))
            closed = session.utterances.push(seq, text)
            if text or closed is not None:
                spoke[session.sid] = [closed.record()] if closed is not None else []
        try:
            lost = await self.bus.append_sessions(writes, self.ownership.fence, lane=self._write_lane)
        except Exception:
            # Redis is away: this tick's audio is gone (it is live), its finished words are not.
            for sid, finished in spoke.items():
                for utterance in finished:
                    self.transcripts.append(sid, utterance)
            raise
        for sid in went_live:
            if (session := self.sessions.get(sid)) is not None:
                session.announce_due = False
        await self._save_progress(
            [sid for sid in went_live if sid not in lost], {k: v for k, v in spoke.items() if k not in lost}
        )
        for sid, row in rolled.items():
            if sid not in lost:
                await self.store.count(sid, ROLLOVERS_COUNTER)
                await self.store.update(sid, dialogue_slot=row)  # the session detail's slot: its row now
        return lost

    async def _save_progress(self, went_live: list[str], spoke: dict[str, list[dict[str, Any]]]) -> None:
        """Session hash updates of a tick, in one round trip: `active` for sessions that went live, and the
        utterance in progress (a worker taking the session over records it: nothing said is lost)."""
        for sid, closed in spoke.items():
            for utterance in closed:
                await self._record(sid, utterance)
        if not went_live and not spoke:
            return
        in_progress: dict[str, str | None] = {}
        for sid in spoke:
            current = self.sessions[sid].utterances.current if sid in self.sessions else None
            in_progress[sid] = json.dumps(current.record()) if current is not None else None
        await self.store.save_progress(went_live, in_progress)

    async def _record(self, sid: str, utterance: dict[str, Any]) -> None:
        """A finished utterance: the durable log soon after (off the tick), the live list now."""
        self.transcripts.append(sid, utterance)
        await self.store.append_utterance(sid, utterance)

    def _started_event(self, session: Session) -> SessionEvent:
        placement = Placement(
            worker=self.worker_id,
            slot=session.row,
            model=self.model.name,
            primer_tokens=session.primer_tokens,
            previous_worker=session.resumed_from,
        )
        name = EventName.READY if session.resumed_from is None else EventName.RESUMED
        log.info("session %s", name, extra={"session_id": session.sid, **placement.model_dump()})
        return SessionEvent(session_id=session.sid, seq=session.take_seq(), name=name, data=placement)

    def _rollover_event(self, session: Session, out: RowOutput) -> SessionEvent:
        assert out.rollover is not None
        done = out.rollover
        data = ContextRollover(
            kind=done.kind.value,
            frames=done.frames,
            primer_tokens=done.primer_tokens,
            gap_frames=done.gap_frames,
        )
        return SessionEvent(
            session_id=session.sid, seq=session.take_seq(), name=EventName.CONTEXT_ROLLOVER, data=data
        )

    # --- placement and failover ----------------------------------------------------------------------

    async def _on_control(self, message: ControlMessage, entry: Entry) -> Handled | None:
        """Placement group handler: starts only (update/stop come on each session's control stream)."""
        if not isinstance(message, SessionStart) or required_model(message) not in (None, self.model.name):
            return None
        if message.session_id in self.sessions:
            return None
        record = await self._adapter_record(message)  # read once for both checks below
        if required_model(message) is None and record is not None and record.model != self.model.name:
            return None  # any model may serve it, but its adapter is for the other one: that group places it
        if await self._better_placed_elsewhere(message, record):
            self._hand_off(message, entry)
            return Handled.TAKEN
        async with self._placing:
            if not self.can_take():  # a takeover filled the last slot since the read: pending for another
                return Handled.RETRY_LATER
            if (start := await self.ownership.admit(message)) is not None:
                await self._place(start, resumed_from=None)
        return None

    async def _better_placed_elsewhere(self, start: SessionStart, record: AdapterRecord | None) -> bool:
        """Whether a start naming an adapter is for a better placed worker of the group (`_hand_off`):
        while this worker serves no adapters and another of the group does; while the adapter's rank is
        above this worker's bound and another's bound takes it; or when this worker does not hold the
        adapter and another with a free slot does. At most MAX_HANDOFFS times, then it is placed here.
        `record`: the adapter's stored record (None: none stored, or no adapter)."""
        adapter = start.persona.adapter
        if adapter is None or start.handoffs >= MAX_HANDOFFS:
            return False
        if self.adapters is not None and self.adapters.holds(adapter):
            return False
        group = placement_group(self.model.name)
        others = [
            w
            for w in await list_workers(self.bus, SERVICE)
            if w.worker_id != self.worker_id and w.fields.get("group") == group
        ]
        if self.adapters is None:  # one that serves adapters takes it once it has a slot (or warmed up)
            better = any(int(w.fields.get("adapter_slots", "0")) > 0 for w in others)
        elif record is not None and record.rank > self.adapters.bank.max_rank:
            better = any(int(w.fields.get("adapter_max_rank", "0")) >= record.rank for w in others)
        else:
            better = any(w.free_slots > 0 and adapter in w.fields.get("adapters", "").split() for w in others)
        return better

    def _hand_off(self, start: SessionStart, entry: Entry) -> None:
        """Append the start to `chorus:control` again (whichever worker reads it next: a few hops at
        most), then ack this entry. Each hop waits longer (`handoff_delay`), in a task of its own so this
        worker's placement reads on: a worker that is not reading at that moment (busy, or just joined)
        would otherwise lose every hop to this one, which reads its own hand-off back at once, and the
        start would be placed where it is worst served. The entry is pending until then: if this worker
        dies first, another claims it."""

        # Well inside the claim bound: a pending entry idle that long is claimed by another worker.
        delay = min(handoff_delay(start.handoffs), self.settings.claim_idle_ms / 1000 / 4)

        async def hand_off() -> None:
            await asyncio.sleep(delay)
            await self.bus.append_control(start.model_copy(update={"handoffs": start.handoffs + 1}))
            await self.consumer.ack(entry)
            log.info(
                "start passed on for its adapter",
                extra={"session_id": start.session_id, "handoffs": start.handoffs + 1},
            )

        def handed_off(task: asyncio.Task[None]) -> None:
            self._handoffs.discard(task)
            exc = None if task.cancelled() else task.exception()
            if task.cancelled() or exc is not None:
                self.consumer.let_go(entry)  # pending: claimed after CHORUS_CLAIM_IDLE_MS
            if exc is not None:
                log.warning(  # if the append landed and the ack failed, admission takes the copy once
                    "a start's hand-off failed; its entry is left pending for a worker to claim: %s",
                    exc,
                    extra={"session_id": start.session_id},
                )

        task = asyncio.create_task(hand_off(), name=f"hand-off {start.session_id}")
        self._handoffs.add(task)
        task.add_done_callback(handed_off)

    async def _adapter_slot(self, start: SessionStart) -> int:
        """The bank slot of the session's adapter (loaded now if this worker does not hold it)."""
        adapter = start.persona.adapter
        if adapter is None:
            return NO_ADAPTER
        if self.adapters is None:
            raise NoCapacity(
                "this dialogue worker serves no LoRA adapters (CHORUS_DIALOGUE_ADAPTER_MEMORY=0)"
            )
        # The model it was checked against (none stored: loading it says so). moshiko and moshika share
        # their shapes: the file alone would load on either.
        record = await self._adapter_record(start)
        if record is not None and record.model != self.model.name:
            raise Unprocessable(
                f"adapter {adapter} was checked against {record.model}; this session runs on "
                f"{self.model.name} (its voice is that model's): upload the adapter for it, or pick "
                "another voice"
            )
        slot = await self.adapters.acquire(adapter)
        await self._slots_changed()  # presence lists the adapter: placement prefers this worker for it
        return slot

    async def _adapter_record(self, start: SessionStart) -> AdapterRecord | None:
        """The stored record of the session's adapter (None: no adapter, or none stored)."""
        if start.persona.adapter is None:
            return None
        try:
            return await self.adapter_store.get(start.persona.adapter)
        except NotFound:
            return None

    def _release_adapter(self, start: SessionStart) -> None:
        if self.adapters is not None and start.persona.adapter is not None:
            self.adapters.release(start.persona.adapter)

    async def _refuse(self, start: SessionStart, seq: int, error: ChorusError) -> None:
        """A session this worker took but cannot serve (its adapter): `error` then `ended` on :dlg."""
        sid = start.session_id
        events = [
            SessionEvent.of(sid, seq, EventName.ERROR, error.detail, Failure(code=error.code)),
            SessionEvent.of(sid, seq + 1, EventName.ENDED, error.code),
        ]
        stream = self.bus.names.session_dialogue(sid)
        await self.bus.append_session(sid, [(stream, event) for event in events], self.ownership.fence)
        await self.ownership.release(sid)
        log.warning("session refused: %s", error.detail, extra={"session_id": sid, "code": error.code})

    async def _on_takeover(self, takeover: Takeover) -> None:
        await self._place(takeover.start, resumed_from=takeover.previous_worker, info=takeover.info)

    async def _place(
        self, start: SessionStart, *, resumed_from: str | None, info: SessionInfo | None = None
    ) -> None:
        sid = start.session_id
        s = self.settings
        history = s.dialogue_resume_history_tokens
        spoken = await self._spoken_before(sid, info, history) if resumed_from else ""
        tokens = self._primer(start, spoken, history)
        seq = await next_seq(self.bus, self.bus.names.session_dialogue(sid), DIALOGUE)
        try:
            adapter_slot = await self._adapter_slot(start)
        except ChorusError as exc:
            await self._refuse(start, seq, exc)
            return
        async with self._table:
            if sid in self.sessions or sid in self.ownership.stops:  # placed, or stopped meanwhile
                self._release_adapter(start)
                if sid not in self.sessions:
                    await self.ownership.release(sid)
                return
            refused: NoCapacity | None = None
            try:
                row = self.batcher.join(sid, tokens, start.persona.sampling, adapter_slot)
            except NoCapacity as exc:
                # Placement and failover count free rows under `_placing`, and a rollover leaves them the
                # rows they may have counted; should that ever break, the session is refused (logged
                # there), not the worker's loops ended.
                self._release_adapter(start)
                refused = exc
            except BaseException:
                self._release_adapter(start)  # its use of the adapter goes with it
                raise
            else:
                head_start = self._rollover_head_start(row)
                self.batcher.give_head_start(row, head_start)
                timeline = InputTimeline(s.dialogue_input_buffer_frames, s.dialogue_jitter_frames)
                utterances = UtteranceBuilder(s.dialogue_utterance_pause_frames)
                self.sessions[sid] = Session(start, row, timeline, seq, resumed_from, len(tokens), utterances)
        if refused is not None:
            await self._refuse(start, seq, refused)
            await self._slots_changed()  # its adapter, if it had one, is no longer held here
            return
        await self._slots_changed()
        self._joined.set()
        placed: dict[str, str | int | float] = {"dialogue_worker": self.worker_id, "dialogue_slot": row}
        if resumed_from:
            placed.update(state=SessionState.RESUMING, resumed_at=time.time())
        else:
            placed.update(state=SessionState.PLACING)
        await self.store.update(sid, **placed)
        metrics.SESSIONS_PLACED.labels(service=SERVICE, kind="resumed" if resumed_from else "new").inc()
        log.info(
            "session placed",
            extra={
                "session_id": sid,
                "slot": row,
                "primer_tokens": len(tokens),
                "resumed": resumed_from,
                "rollover_head_start": head_start,
            },
        )

    def _rollover_head_start(self, row: int) -> int:
        """How early the first rollover of the session joining on `row` comes, spaced from the others'
        (`priming.rollover_head_start`): only with rows kept for rollovers (without, a full worker rolls
        over in place however they are spread), and never before a quarter of its context is used."""
        at = self.rollover_at
        if not self._rollover_spacing or at is None:
            return 0
        dues = self.batcher.frames_until_due(at, besides=row)
        return rollover_head_start(dues, at, self._rollover_spacing, most=at * 3 // 4)

    def _primer(self, start: SessionStart, spoken: str, history_tokens: int) -> list[int]:
        """What a fresh state of the session is primed with (a new or resumed session, a rollover): the
        persona primer, then the tail of what it said, within CHORUS_DIALOGUE_MAX_PRIMER_TOKENS."""
        limit = self.settings.dialogue_max_primer_tokens
        encode = self.model.encode_text
        return primer_tokens(encode, start.persona.primer, spoken, limit, history_limit=history_tokens)

    async def _spoken_before(self, sid: str, info: SessionInfo | None, history_tokens: int) -> str:
        """What the session said before its worker died: the tail of the live transcript, plus the utterance
        the dead worker had not finished (kept in the hash for exactly this), which is recorded now."""
        if info is not None and info.utterance is not None:
            await self._record(sid, info.utterance)
            await self.store.clear_utterance(sid)
        return spoken_so_far(await self.store.transcript(sid, last=history_tokens))

    # --- update / stop / liveness ------------------------------------------------------------------

    async def _apply_control(self, message: ControlMessage) -> None:
        if isinstance(message, SessionStop):
            await self.end(message.session_id, message.reason)
        elif isinstance(message, SessionUpdate) and (session := self.sessions.get(message.session_id)):
            if message.sampling is not None:
                async with self._table:
                    self.batcher.set_sampling(session.row, message.sampling)
            if message.adapter is not None:
                self._switch_later(session, message.adapter)

    def _switch_later(self, session: Session, adapter: str) -> None:
        """Switch the session's adapter in a task of its own, after the session's earlier switches: loading
        an adapter may take seconds (a file of hundreds of MB), and this worker's one control loop serves
        every session's stops and updates meanwhile."""
        before = self._switches.get(session.sid)

        async def switch() -> None:
            if before is not None:
                await asyncio.wait([before])
            if adapter != session.start.persona.adapter:
                await self._switch_adapter(session, adapter)

        task = asyncio.create_task(switch(), name=f"adapter switch {session.sid}")
        self._switches[session.sid] = task
        task.add_done_callback(functools.partial(self._switched, session.sid))

    def _switched(self, sid: str, task: asyncio.Task[None]) -> None:
        if self._switches.get(sid) is task:
            del self._switches[sid]
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("adapter switch failed", exc_info=error, extra={"session_id": sid})

    async def _switch_adapter(self, session: Session, adapter: str) -> None:
        """The session's rows use `adapter` from the next step on: a row's adapter is a slot number the
        LoRA layers read per step, so switching is a table write between steps (after loading the adapter
        when this worker does not hold it). One this worker cannot serve is an `error` event on :dlg, and
        the session goes on with the adapter it had.

        The gateway wrote the adapter asked for into the session's hash before sending the update (a worker
        taking the session over finds it there); the hash is set to the outcome after, in update order, so
        a refused switch leaves a takeover serving the adapter the session kept, not the refused one."""
        persona = session.start.persona.model_copy(update={"adapter": adapter})
        start = session.start.model_copy(update={"persona": persona})
        try:
            slot = await self._adapter_slot(start)
        except ChorusError as exc:
            kept = session.start.persona.adapter or ""  # "" (none): the start's, which named none either
            await self.store.update(session.sid, adapter=kept)
            await self._report(session, exc)
            return
        async with self._table:
            if self.sessions.get(session.sid) is not session:  # ended meanwhile
                self._release_adapter(start)
                return
            self.batcher.set_adapter(session.row, slot)
            self._release_adapter(session.start)
            session.start = start
        # `adapter`: a refusal of an earlier update overwrote it; `adapter_served`: the old one is no
        # longer in use here (a delete of it was refused until now: `SessionStore.using_adapter`).
        await self.store.update(session.sid, adapter=adapter, adapter_served=adapter)
        await self._slots_changed()
        log.info("session adapter switched", extra={"session_id": session.sid, "adapter_id": adapter})

    async def _report(self, session: Session, error: ChorusError) -> None:
        """An error the session survives: an `error` event on :dlg (the client hears of it), in its
        place among the frames (after those of the tick being written, as `end` does)."""
        async with self._table:
            if self._publishing is not None:
                await asyncio.wait([self._publishing])
            event = SessionEvent.of(
                session.sid, session.take_seq(), EventName.ERROR, error.detail, Failure(code=error.code)
            )
            await self.bus.append_session(
                session.sid, [(self.bus.names.session_dialogue(session.sid), event)], self.ownership.fence
            )
        log.warning("session update refused: %s", error.detail, extra={"session_id": session.sid})

    async def _on_over(self, sid: str, liveness: Liveness) -> None:
        if liveness in (Liveness.MOVED, Liveness.GONE):
            await self._forget(sid, liveness)
        else:
            await self.end(sid, liveness.value)

    async def end(self, sid: str, reason: str) -> None:
        """Stop serving a session: record its last words, `ended` on :dlg, free its row, let its keys go."""
        async with self._table:
            session = self.sessions.get(sid)
            if session is None:
                return
            # The frames of the tick in flight go out before `ended`; a write of the tick stepped before this
            # lock was taken, not yet begun, leaves the session out (its words would miss the transcript).
            session.ending = True
            if self._publishing is not None:
                await asyncio.wait([self._publishing])
            # Its last words are recorded before `ended`: whoever reads `ended` finds the transcript whole.
            if (utterance := session.utterances.current) is not None and utterance.text:
                await self._record(sid, utterance.record())
            session.utterances.flush()
            ended = SessionEvent(session_id=sid, seq=session.take_seq(), name=EventName.ENDED, detail=reason)
            # `ended` goes out before the slot shows free: whoever sees the slot free finds it ended. If
            # the write fails (Redis away), the session stays, and the stop is applied again.
            await self.bus.append_session(
                sid, [(self.bus.names.session_dialogue(sid), ended)], self.ownership.fence
            )
            del self.sessions[sid]
            self.batcher.leave(session.row)
            self._release_adapter(session.start)
        await self._slots_changed()
        self.transcripts.end(sid, reason)
        await self.ownership.release(sid)
        await self.bus.expire_session(sid)
        late = session.late_frames
        log.info("session ended", extra={"session_id": sid, "reason": reason, "late_frames": late})

    async def _forget(self, sid: str, why: Liveness) -> None:
        """Let go of a session without a word: another worker owns it now, or Redis lost it."""
        async with self._table:
            session = self.sessions.pop(sid, None)
            if session is None:
                return
            self.batcher.leave(session.row)
            self._release_adapter(session.start)
        if why is Liveness.GONE and (utterance := session.utterances.current) is not None and utterance.text:
            self.transcripts.append(sid, utterance.record())  # nobody takes it over: its last words, kept
        await self._slots_changed()
        await self.ownership.release(sid)
        log.warning("session let go: %s", why, extra={"session_id": sid})

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
        metrics.WORKER_SLOTS_FREE.labels(service=SERVICE).set(self.free_slots())
        if self.presence is not None:
            await self.presence.refresh()
