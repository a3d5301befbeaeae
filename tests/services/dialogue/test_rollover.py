"""Context rollover on the real Moshi classes (small generated checkpoint, a small threshold): a session
moves to a fresh state primed with its primer again, on a free row without missing a frame or in place
with a bounded gap, while its neighbour in the batch goes on exactly as it would alone; and through the
worker and Redis: the event, the session's counter, one frame per tick and a whole transcript."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from pydantic import ValidationError

from services.dialogue.batcher import Batcher, Phase, RolloverKind, RowOutput
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.priming import ROLLOVER_SLACK_FRAMES, rollover_head_start
from services.dialogue.serving import DialogueWorker, placement_group
from services.dialogue.settings import DialogueSettings
from shared.audio import FRAME_SAMPLES
from shared.bus import Bus
from shared.messages import ContextRollover, EventName, PersonaSpec, SessionStart, SessionStop
from shared.ownership import SessionOwnership, TakeOutcome
from shared.sessions import SessionStore
from tests.services.dialogue.conftest import DialogueReader, RunningWorker, settings_for
from tests.services.dialogue.test_batcher import GREEDY, tokens, user_audio
from tests.support.sessions import open_session
from tests.support.waiting import wait_until

StartWorker = Callable[..., Awaitable[RunningWorker]]
AT = 20  # steps before a row rolls over
STEPS = 80  # three rollovers at least


@dataclass
class Talk:
    """What a run of steps gave: each row's outputs, and what was forced into each fresh state."""

    outputs: dict[str, list[RowOutput]] = field(default_factory=dict)
    forced: list[list[int]] = field(default_factory=list)  # per rollover: tokens written while it primed


def talk(batcher: Batcher, voices: dict[str, list[np.ndarray]], primer: Sequence[int], steps: int) -> Talk:
    """Step with each session's voice on its row, rolling `roller` over whenever it is due; records what
    the model's text stream got on every row being primed (LMGen writes the hooked tensor into it)."""
    run = Talk({sid: [] for sid in voices})
    hook = batcher.gen.on_text_hook
    assert hook is not None
    priming: dict[int, int] = {}  # row -> index in run.forced, while it primes this step

    def spy(text_token: torch.Tensor) -> None:
        hook(text_token)
        for row, index in priming.items():
            run.forced[index].append(int(text_token[row]))

    batcher.gen.on_text_hook = spy
    rows = {s.session_id: s.row for s in batcher.active()}
    fresh: int | None = None
    for t in range(steps):
        for slot in batcher.due_rollovers(AT):
            if slot.session_id == "roller":
                batcher.roll_over(slot.row, primer)
                fresh = next(s.row for s in batcher.slots if s.session_id == "roller" and s.forced)
                run.forced.append([])
        primes = fresh is not None and batcher.slots[fresh].phase is Phase.PRIMING
        priming = {fresh: len(run.forced) - 1} if primes and fresh is not None else {}
        audio = np.zeros((batcher.batch_size, FRAME_SAMPLES), dtype=np.float32)
        for sid, frames in voices.items():
            audio[rows[sid]] = frames[t]
        for out in batcher.step(audio):
            run.outputs[out.session_id].append(out)
            rows[out.session_id] = out.row
    batcher.gen.on_text_hook = hook
    return run


def test_a_session_rolls_over_on_a_free_row_without_a_gap_and_its_neighbour_is_undisturbed(
    make_batcher: Callable[..., Batcher],
) -> None:
    batcher = make_batcher(3, audio_temperature=0.0)
    voices = {"steady": user_audio(seed=1, steps=STEPS), "roller": user_audio(seed=2, steps=STEPS)}
    batcher.join("steady", (), GREEDY)
    alone = talk(batcher, {"steady": voices["steady"]}, (), STEPS).outputs["steady"]

    batcher.leave(0)
    primer = batcher.model.encode_text("You are a calm and curious teacher.")
    batcher.join("steady", (), GREEDY)
    batcher.join("roller", primer, GREEDY)
    run = talk(batcher, voices, primer, STEPS)

    outs = run.outputs["roller"]
    assert all(len(run.outputs[sid]) == STEPS for sid in voices), "one output per session per step"
    rollovers = [o.rollover for o in outs if o.rollover is not None]
    assert len(rollovers) >= 3
    assert all(r.kind is RolloverKind.FREE_SLOT and r.gap_frames == 0 for r in rollovers)
    first_frame = next(t for t, o in enumerate(outs) if o.pcm is not None)
    assert all(o.pcm is not None and not o.gap for o in outs[first_frame:]), "a frame every step from then on"
    assert sum(o.went_live for o in outs) == 1, "ready once: the fresh states take over silently"
    assert len({o.row for o in outs}) > 1, "the session moved rows"
    assert run.forced[: len(rollovers)] == [primer] * len(rollovers), "each fresh state was primed again"
    assert tokens(run.outputs["steady"]) == tokens(alone), "the neighbour's row was never touched"
    assert len(batcher.free_rows()) >= 1, "the replaced rows were freed"


def test_without_a_free_row_a_session_is_primed_again_in_place_with_a_bounded_gap(
    make_batcher: Callable[..., Batcher],
) -> None:
    batcher = make_batcher(2, audio_temperature=0.0)
    voices = {"steady": user_audio(seed=1, steps=STEPS), "roller": user_audio(seed=2, steps=STEPS)}
    batcher.join("steady", (), GREEDY)
    alone = talk(batcher, {"steady": voices["steady"]}, (), STEPS).outputs["steady"]

    batcher.leave(0)
    primer = batcher.model.encode_text("You are a pirate.")
    batcher.join("steady", (), GREEDY)
    batcher.join("roller", primer, GREEDY)
    run = talk(batcher, voices, primer, STEPS)

    outs = run.outputs["roller"]
    rollovers = [o.rollover for o in outs if o.rollover is not None]
    assert len(rollovers) >= 2 and all(r.kind is RolloverKind.IN_PLACE for r in rollovers)
    gap = len(primer) + batcher.delay
    assert all(r.gap_frames == gap for r in rollovers), "the gap is the primer and the acoustic delay"
    first_frame = next(t for t, o in enumerate(outs) if o.pcm is not None)
    assert all((o.pcm is not None) != o.gap for o in outs[first_frame:]), "every step a frame or a gap"
    assert sum(o.gap for o in outs) == gap * len(rollovers)
    assert {o.row for o in outs} == {1} and sum(o.went_live for o in outs) == 1
    assert run.forced[: len(rollovers)] == [primer] * len(rollovers)
    assert tokens(run.outputs["steady"]) == tokens(alone), "the neighbour's row was never touched"


def test_a_session_leaving_mid_rollover_frees_both_its_rows(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(3)
    row = batcher.join("roller", (), GREEDY)
    batcher.slots[row].age = AT
    assert batcher.roll_over(row, [5, 6, 7]) is RolloverKind.FREE_SLOT
    assert len(batcher.free_rows()) == 1
    batcher.leave(row)
    assert batcher.free_rows() == [0, 1, 2]


def test_states_joining_together_are_spaced_for_their_first_rollover() -> None:
    """Each state joining comes due `spacing` frames from every other, by the fewest frames early; alone or
    with room, on time; past `most` early, on time too (no room to space it)."""
    at, spacing, most = 60, 9, 45
    assert rollover_head_start([], at, spacing, most) == 0
    assert rollover_head_start([30, 20], at, spacing, most) == 0, "nobody near its due"
    dues: list[int] = []
    heads = []
    for _ in range(7):  # joining one after the other, on one tick
        heads.append(rollover_head_start(dues, at, spacing, most))
        dues.append(at - heads[-1])
    assert heads == [0, 9, 18, 27, 36, 45, 0], "the seventh finds no room within `most`"
    assert rollover_head_start([60, 50, 20], at, spacing, most) == 19, "past every neighbour it meets"
    assert rollover_head_start([55], at, spacing, most) == 14
    # About to roll over (or waiting to): due again about `at` later, near this one's first due.
    assert rollover_head_start([5], at, spacing, most) == 4
    assert rollover_head_start([-3], at, spacing, most) == 9


def test_a_threshold_within_the_primer_bound_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="must exceed the primer bound of 16 frames"):
        DialogueSettings(dialogue_rollover_at=16, dialogue_max_primer_tokens=16)


def test_a_threshold_past_a_shortened_context_is_refused_before_any_model_loads() -> None:
    """A CHORUS_DIALOGUE_ROLLOVER_AT left over from the checkpoint's context (3000 frames) with a shorter
    CHORUS_DIALOGUE_CONTEXT: refused by the settings, not minutes later once the 7B is loaded."""
    with pytest.raises(ValidationError, match="at most 1459"):  # 1500 less 16 and 25 of slack
        DialogueSettings(dialogue_context=1500, dialogue_rollover_at=2910, dialogue_max_primer_tokens=16)
    assert DialogueSettings(dialogue_context=1500, dialogue_rollover_at=1459, dialogue_max_primer_tokens=16)


@pytest.mark.parametrize(
    ("at", "why"),
    [
        (17, "must exceed the primer bound of 17 frames"),  # 16 primer tokens + the acoustic delay of 1
        (60, "at most 58"),  # the context is 100 frames: 60 + 17 + 25 of slack would pass it
    ],
)
def test_a_threshold_the_model_cannot_honour_stops_the_worker_at_start(
    bus: Bus, moshi_dir: Path, moshi_model: MoshiModel, at: int, why: str
) -> None:
    settings = settings_for(moshi_dir, dialogue_rollover_at=at, dialogue_max_primer_tokens=16)
    assert moshi_model.lm.context == 100 and max(moshi_model.lm.delays) == 1
    with pytest.raises(ValueError, match=why):
        DialogueWorker(bus, settings, moshi_model)


def test_rows_kept_for_rollovers_leave_a_row_to_place_and_need_rollovers(bus: Bus, moshi_dir: Path) -> None:
    with pytest.raises(ValidationError, match="must be under dialogue_slots"):
        DialogueSettings(dialogue_slots=2, dialogue_rollover_reserve=2)
    with pytest.raises(ValidationError, match="dialogue_rollover_at 0 turns them off"):
        DialogueSettings(dialogue_slots=2, dialogue_rollover_reserve=1, dialogue_rollover_at=0)
    settings = settings_for(moshi_dir, dialogue_slots=2, dialogue_rollover_reserve=1)
    model = load_moshi(settings)
    assert model.lm.context == 100  # under twice the default margin: rollover is off by default
    with pytest.raises(ValueError, match="this worker rolls none over"):
        DialogueWorker(bus, settings, model)


ROLLOVER_METRICS = ("chorus_context_rollovers_total", "chorus_context_rollover_seconds_count")


def rollovers_counted(kind: str) -> list[float]:
    """This process's rollover counter and the count of its switch-time histogram, for one kind."""
    return [REGISTRY.get_sample_value(name, {"kind": kind}) or 0.0 for name in ROLLOVER_METRICS]


def counted_since(kind: str, before: list[float]) -> list[float]:
    return [now - then for now, then in zip(rollovers_counted(kind), before, strict=True)]


class Ticks:
    """Which sessions got a frame (or a gap frame) in each of a worker's ticks: the worker's own batcher,
    its step wrapped to record what it returned."""

    def __init__(self, batcher: Batcher) -> None:
        self.ticks: list[dict[str, RowOutput]] = []
        step = batcher.step

        def recorded(audio: np.ndarray, **kwargs: Any) -> list[RowOutput]:
            outputs = step(audio, **kwargs)
            self.ticks.append({o.session_id: o for o in outputs})
            return outputs

        batcher.step = recorded  # type: ignore[method-assign]

    def of(self, sid: str) -> list[RowOutput]:
        return [tick[sid] for tick in self.ticks if sid in tick]


async def test_a_long_session_rolls_over_again_and_again_with_a_frame_every_tick_and_a_whole_transcript(
    bus: Bus, start_worker: StartWorker
) -> None:
    running = await start_worker(
        dialogue_slots=3, dialogue_rollover_at=30, dialogue_max_primer_tokens=16, dialogue_tick_ms=40
    )
    ticks = Ticks(running.worker.batcher)
    counted = rollovers_counted("free_slot")
    primer = "You are a calm and curious teacher."
    await open_session(bus, SessionStart(session_id="long", persona=PersonaSpec(primer=primer)))
    await open_session(bus, SessionStart(session_id="beside"))
    long, beside = DialogueReader(bus, "long"), DialogueReader(bus, "beside")
    took_over = await wait_until(lambda: [o for o in ticks.of("long") if o.rollover], "no rollover", 60)
    moved_to = took_over[0].row

    async def slot_shown() -> bool:
        session = await SessionStore(bus, 60).get("long")
        return session is not None and session.counters.get("dialogue_slot") == moved_to

    await wait_until(slot_shown, "the session detail kept the slot it was placed on", 5)  # moved again: 1.2 s
    rolled = 3
    await long.until(
        lambda r: len([e for e in r.events if e.name == EventName.CONTEXT_ROLLOVER]) >= rolled,
        60,
        "no rollovers",
    )
    for sid in ("long", "beside"):
        await bus.append_control(SessionStop(session_id=sid))
    for reader in (long, beside):
        await reader.until(lambda r: r.event(EventName.ENDED) is not None, 10, "no ended event")

    events = [e.data_as(ContextRollover) for e in long.events if e.name == EventName.CONTEXT_ROLLOVER]
    persona = len(running.worker.model.encode_text(primer))
    assert all(e.primer_tokens >= persona for e in events), "the persona primer is forced each time"
    for reader in (long, beside):
        rollovers = [
            e.data_as(ContextRollover) for e in reader.events if e.name == EventName.CONTEXT_ROLLOVER
        ]
        assert rollovers and all(e.kind == "free_slot" and e.gap_frames == 0 for e in rollovers)
        seqs = [e.seq for e in reader.entries]
        assert seqs == list(range(len(seqs))), "one seq counter across the rollovers, no gaps"
        outs = ticks.of(reader.sid)
        first = next(t for t, o in enumerate(outs) if o.pcm is not None)
        last = max(t for t, o in enumerate(outs) if o.pcm is not None)
        assert all(o.pcm is not None and not o.gap for o in outs[first:last]), "a frame every tick"
    session = await SessionStore(bus, 60).get("long")
    assert session is not None and session.counters["context_rollovers"] == len(events) >= rolled
    assert min(counted_since("free_slot", counted)) >= len(events), "counted and timed in the metrics"
    transcript = await SessionStore(bus, 60).transcript("long")
    spoken = "".join(f.text for f in long.frames)
    assert " ".join(u["text"] for u in transcript) == " ".join(spoken.split()), "every piece, in order"


async def test_a_full_worker_rolls_a_session_over_in_place_with_silence_for_the_gap(
    bus: Bus, start_worker: StartWorker
) -> None:
    running = await start_worker(
        dialogue_slots=1, dialogue_rollover_at=24, dialogue_max_primer_tokens=8, dialogue_tick_ms=40
    )
    counted = rollovers_counted("in_place")
    await open_session(bus, SessionStart(session_id="alone", persona=PersonaSpec(primer="You are a pirate.")))
    reader = DialogueReader(bus, "alone")
    await reader.until(
        lambda r: len([e for e in r.events if e.name == EventName.CONTEXT_ROLLOVER]) >= 2, 60, "no rollovers"
    )
    events = [e.data_as(ContextRollover) for e in reader.events if e.name == EventName.CONTEXT_ROLLOVER]
    bound = running.settings.dialogue_max_primer_tokens + running.worker.batcher.delay
    assert all(e.kind == "in_place" and 0 < e.gap_frames <= bound for e in events)
    seqs = [e.seq for e in reader.entries]
    assert seqs == list(range(len(seqs))), "the gap is frames of silence: the stream keeps its pace"
    silent = [f for f in reader.frames if not any(f.pcm)]
    assert len(silent) >= sum(e.gap_frames for e in events)
    assert min(counted_since("in_place", counted)) >= len(events), "counted and timed in the metrics"


async def ready_session(bus: Bus, sid: str) -> DialogueReader:
    """Open a session the worker places, and read its `:dlg` until it is ready."""
    await open_session(bus, SessionStart(session_id=sid))
    reader = DialogueReader(bus, sid)
    await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "never ready")
    return reader


async def test_a_rollover_leaves_the_free_slot_to_a_placement_under_way(
    bus: Bus, start_worker: StartWorker
) -> None:
    """A placement counts the free slots, takes the session, then joins a slot, with Redis round trips
    between: a rollover taking the slot meanwhile made the join fail with the session already taken here
    (its start retried after `claim_idle_ms`; claimed by another worker, dropped as owned here). Holding
    the worker's placement lock is such a placement, slowed down."""
    running = await start_worker(
        dialogue_slots=2, dialogue_rollover_at=24, dialogue_max_primer_tokens=8, dialogue_tick_ms=40
    )
    batcher = running.worker.batcher
    reader = await ready_session(bus, "due")
    async with running.worker._placing:
        await wait_until(lambda: any(s.age > 30 for s in batcher.slots), "the session never came due", 30)
        assert len(batcher.free_rows()) == 1, "the placement's slot was taken"
    await reader.until(lambda r: r.event(EventName.CONTEXT_ROLLOVER) is not None, 30, "no rollover after")
    rollover = reader.event(EventName.CONTEXT_ROLLOVER)
    assert rollover is not None and rollover.data_as(ContextRollover).kind == "free_slot"


async def test_a_rollover_waits_for_a_placement_only_until_its_last_call_then_goes_in_place(
    bus: Bus, start_worker: StartWorker
) -> None:
    """A placement can take long (an adapter's load, a failover seating many sessions): a due rollover
    waits for it at most until its last call (ROLLOVER_SLACK_FRAMES past the threshold), then goes in
    place, leaving the free row to the placement: a pause, where waiting on would let the old state's
    cache wrap."""
    # 60 steps: the lock is held long before the session comes due (~2 s at 40 ms a tick).
    running = await start_worker(
        dialogue_slots=2, dialogue_rollover_at=60, dialogue_max_primer_tokens=8, dialogue_tick_ms=40
    )
    batcher = running.worker.batcher
    reader = await ready_session(bus, "due")
    async with running.worker._placing:
        assert batcher.slots[running.worker.sessions["due"].row].age < 60, "came due before the lock"
        await reader.until(lambda r: r.event(EventName.CONTEXT_ROLLOVER) is not None, 30, "it waited on")
        assert len(batcher.free_rows()) == 1, "the placement's row was taken"
    rollover = reader.event(EventName.CONTEXT_ROLLOVER)
    assert rollover is not None
    data = rollover.data_as(ContextRollover)
    assert data.kind == "in_place" and data.frames == 60 + ROLLOVER_SLACK_FRAMES, data


async def start_reserving_worker(start_worker: StartWorker, *, slots: int) -> RunningWorker:
    """A worker keeping one row for rollovers, due every 24 steps, with an 8-token primer bound."""
    return await start_worker(
        dialogue_slots=slots,
        dialogue_rollover_reserve=1,
        dialogue_rollover_at=24,
        dialogue_max_primer_tokens=8,
        dialogue_tick_ms=40,
    )


async def test_a_row_kept_for_rollovers_is_left_free_by_placement_and_spares_a_full_worker_the_pause(
    bus: Bus, start_worker: StartWorker
) -> None:
    worker = (await start_reserving_worker(start_worker, slots=2)).worker
    assert worker.describe()["capacity"] == 1
    first = await ready_session(bus, "first")
    assert worker.describe()["free_slots"] == 0 and len(worker.batcher.free_rows()) == 1
    await open_session(bus, SessionStart(session_id="second"))
    second = DialogueReader(bus, "second")
    await first.until(
        lambda r: len([e for e in r.events if e.name == EventName.CONTEXT_ROLLOVER]) >= 2, 60, "no rollovers"
    )
    events = [e.data_as(ContextRollover) for e in first.events if e.name == EventName.CONTEXT_ROLLOVER]
    assert all(e.kind == "free_slot" and e.gap_frames == 0 for e in events), "rolled over on the kept row"
    await second.poll()
    assert second.event(EventName.READY) is None and "second" not in worker.sessions, "placed on the kept row"
    await bus.append_control(SessionStop(session_id="first"))
    await second.until(lambda r: r.event(EventName.READY) is not None, 30, "never placed once a row freed")


async def test_sessions_joining_together_roll_over_apart_each_on_the_kept_row(
    bus: Bus, start_worker: StartWorker
) -> None:
    """Five sessions placed at once (a failover, a burst) with one row kept: coming due together, the row
    would prime one at a time (9 steps each) and the fourth and fifth would reach their last call (25
    steps) and pause in place, every time. Their first rollovers are spaced (`rollover_head_start`), so
    each finds the kept row free."""
    worker = (
        await start_worker(
            dialogue_slots=6,
            dialogue_rollover_reserve=1,
            dialogue_rollover_at=60,
            dialogue_max_primer_tokens=8,
            dialogue_prime_ahead=False,  # a token a step: the priming time the spacing plans for
            dialogue_tick_ms=20,
        )
    ).worker
    sids = [f"burst-{i}" for i in range(5)]
    for sid in sids:
        await open_session(bus, SessionStart(session_id=sid))
    readers = [DialogueReader(bus, sid) for sid in sids]
    for reader in readers:
        await reader.until(lambda r: r.event(EventName.CONTEXT_ROLLOVER) is not None, 60, "no rollover")
    kinds = [r.event(EventName.CONTEXT_ROLLOVER).data_as(ContextRollover) for r in readers]  # type: ignore[union-attr]
    # Placed within a few ticks, they would come due within a few ticks; spaced, none pauses.
    assert all(k.kind == "free_slot" and k.gap_frames == 0 for k in kinds), kinds
    assert worker.batcher.seated_sessions() == 5


async def test_a_failover_takes_no_more_sessions_than_the_capacity_and_leaves_the_kept_row(
    bus: Bus, start_worker: StartWorker, moshi_model: MoshiModel
) -> None:
    """A dead worker's sessions are taken over up to the capacity (the free rows less those kept for
    rollovers), as placement counts them: the rest wait for a worker with room."""
    store = SessionStore(bus, 600)
    model = moshi_model.name
    ghost = SessionOwnership(  # as the worker's own (`DialogueWorker.ownership`), for a worker id never seen
        bus,
        store,
        service="dialogue",
        group=placement_group(model),
        worker_id="ghost",
        field="dialogue_owner",
        token_of=lambda worker_id: f"{model}/{worker_id}",
    )
    sids = ["orphan-a", "orphan-b", "orphan-c"]
    for sid in sids:
        await open_session(bus, SessionStart(session_id=sid))
        assert await ghost.take(sid) is TakeOutcome.TAKEN  # its owner has no presence: dead
    worker = (await start_reserving_worker(start_worker, slots=3)).worker
    await wait_until(lambda: len(worker.sessions) == 2, "the dead worker's sessions were not taken over", 30)
    await asyncio.sleep(5 * worker.settings.failover_poll_s)  # polls that find a free row, the kept one
    batcher = worker.batcher
    assert len(worker.sessions) == 2 and batcher.seated_sessions() == 2
    assert len(batcher.free_rows()) + batcher.fresh_rows() == 1, "the kept row went to a session"
    (left,) = [sid for sid in sids if sid not in worker.sessions]
    info = await store.get(left)
    assert info is not None and info.owners.get("dialogue_owner") == f"{model}/ghost", "left to its owner"


async def test_a_rollover_takes_a_kept_row_while_a_placement_is_under_way_and_placement_counts_it_once(
    bus: Bus, start_worker: StartWorker
) -> None:
    """A placement never counts the rows kept for rollovers, so a rollover may take one while a placement
    holds the lock (without a reserve it waits:
    test_a_rollover_leaves_the_free_slot_to_a_placement_under_way); and while its fresh state holds that
    row, the worker still offers placement what its capacity leaves (the kept row is not held back
    twice)."""
    worker = (await start_reserving_worker(start_worker, slots=3)).worker
    batcher = worker.batcher
    reader = await ready_session(bus, "due")
    async with worker._placing:
        rows = await wait_until(
            lambda: (batcher.fresh_rows(), worker.free_slots()) if batcher.fresh_rows() else None,
            "the rollover waited for the placement",
            30,
        )
        assert rows == (1, 1), "one fresh row; capacity 2 less the one session: one seat to offer"
        await reader.until(lambda r: r.event(EventName.CONTEXT_ROLLOVER) is not None, 30, "never took over")
    rollover = reader.event(EventName.CONTEXT_ROLLOVER)
    assert rollover is not None and rollover.data_as(ContextRollover).kind == "free_slot"


@pytest.mark.parametrize(("slots", "reserve"), [(3, 0), (4, 1)])
async def test_a_placement_that_begins_while_a_rollover_reads_its_transcript_keeps_its_row(
    bus: Bus, start_worker: StartWorker, slots: int, reserve: int
) -> None:
    """A due rollover reads the session's transcript (a Redis round trip) before it takes a row; a start
    placed meanwhile has counted the free rows. Every rollover due on that tick must leave the placement
    its row: its join would fail with the session already taken here."""
    running = await start_worker(
        dialogue_slots=slots,
        dialogue_rollover_reserve=reserve,
        dialogue_rollover_at=60,
        dialogue_max_primer_tokens=8,
        dialogue_tick_ms=40,
    )
    worker = running.worker
    for sid in ("a", "b"):
        await ready_session(bus, sid)
    assert worker.free_slots() == 1
    joins: list[int | Exception] = []
    join = worker.batcher.join

    def recorded_join(*args: Any, **kwargs: Any) -> int:
        try:
            row = join(*args, **kwargs)
        except Exception as exc:
            joins.append(exc)
            raise
        joins.append(row)
        return row

    read = worker._spoken_lately
    placed_during_read = False

    async def read_with_a_placement_under_way(session: Any, history: int) -> str:
        nonlocal placed_during_read
        if not placed_during_read:
            placed_during_read = True
            await open_session(bus, SessionStart(session_id="third"))
            await wait_until(worker._placing.locked, "no placement began", 10)
        return await read(session, history)

    worker.batcher.join = recorded_join  # type: ignore[method-assign]
    worker._spoken_lately = read_with_a_placement_under_way  # type: ignore[method-assign]
    async with worker._table:  # both sessions come due on the same tick
        live = [s for s in worker.batcher.slots if s.phase is Phase.LIVE]
        for s in live:
            s.age, s.head_start = max(slot.age for slot in live), 0
    await wait_until(lambda: joins, "the placement never joined", 30)
    assert all(isinstance(j, int) for j in joins), f"a rollover took the placement's row: {joins}"
    await DialogueReader(bus, "third").until(
        lambda r: r.event(EventName.READY) is not None, 30, "never ready"
    )
