"""The dialogue worker through Redis (in-process, real redis-server, real model classes): placement,
frames on :dlg, priming, silence filling for a slow client, stop, and a full worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY

from shared.audio import FRAME_BYTES, float_to_pcm16
from shared.bus import Bus
from shared.errors import NoCapacity
from shared.messages import (
    EventName,
    Failure,
    PersonaSpec,
    Placement,
    SessionEvent,
    SessionStart,
    SessionStop,
    UserAudio,
)
from shared.presence import list_workers
from shared.sessions import SessionStore
from tests.services.dialogue.conftest import DialogueReader, RunningWorker
from tests.support.sessions import open_session
from tests.support.waiting import wait_until

StartWorker = Callable[..., Awaitable[RunningWorker]]


def voice_frame(seq: int) -> bytes:
    rng = np.random.default_rng(seq)
    return float_to_pcm16(rng.standard_normal(1920) * 0.3)


async def talk(bus: Bus, sid: str, seqs: range) -> None:
    for seq in seqs:
        frame = UserAudio(session_id=sid, seq=seq, pcm=voice_frame(seq))
        await bus.append(bus.names.session_input(sid), frame)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_started_session_gets_ready_then_one_frame_per_tick(
    bus: Bus, start_worker: StartWorker
) -> None:
    running = await start_worker()
    await open_session(bus, SessionStart(session_id="s1"))
    reader = DialogueReader(bus, "s1")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready event")
    await talk(bus, "s1", range(0, 30))
    await reader.until(lambda r: len(r.frames) >= 8, 20, "frames did not follow")

    ready = reader.event(EventName.READY)
    assert ready is not None and ready.data_as(Placement).worker == running.settings.worker_id
    seqs = [e.seq for e in sorted(reader.events + reader.frames, key=lambda e: e.seq)]
    assert seqs == list(range(len(seqs))), "one seq counter for the whole stream, no gaps"
    assert all(len(f.pcm) == FRAME_BYTES for f in reader.frames)
    session = await SessionStore(bus, 60).get("s1")
    assert session is not None
    assert session.state == "active" and session.workers["dialogue_worker"] == running.settings.worker_id

    await bus.append_control(SessionStop(session_id="s1"))
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 10, "no ended event")
    transcript = await SessionStore(bus, 60).transcript("s1")
    spoken = "".join(f.text for f in reader.frames)
    assert " ".join(u["text"] for u in transcript) == " ".join(spoken.split()), "every piece, in order"
    assert all(u["speaker"] == "assistant" for u in transcript)


async def test_a_persona_is_primed_before_the_session_is_ready(bus: Bus, start_worker: StartWorker) -> None:
    running = await start_worker()
    primer = "You are a pirate captain. Speak like one."
    await open_session(bus, SessionStart(session_id="pirate", persona=PersonaSpec(primer=primer)))
    reader = DialogueReader(bus, "pirate")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "no ready event")
    ready = reader.event(EventName.READY)
    assert ready is not None
    assert ready.data_as(Placement).primer_tokens == len(running.worker.model.encode_text(primer)) > 5
    before_ready = reader.entries[: reader.entries.index(ready)]
    assert not before_ready, "nothing is published while the primer is forced"


async def test_a_slow_client_is_filled_with_silence_and_its_late_frames_dropped(
    bus: Bus, start_worker: StartWorker
) -> None:
    await start_worker(dialogue_jitter_frames=0)
    filled = counter("chorus_frames_silence_filled_total")
    late = counter("chorus_frames_dropped_total", service="dialogue", reason="late")
    await open_session(bus, SessionStart(session_id="slow"))
    reader = DialogueReader(bus, "slow")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready event")
    await talk(bus, "slow", range(0, 1))
    # The client then stalls: frames keep coming out, one per tick, on silence.
    await reader.until(lambda r: len(r.frames) >= 6, 20, "the tick waited for the slow client")
    assert counter("chorus_frames_silence_filled_total") > filled
    await talk(bus, "slow", range(1, 3))  # their ticks are long gone

    async def dropped() -> bool:
        return counter("chorus_frames_dropped_total", service="dialogue", reason="late") >= late + 2

    await wait_until(dropped, "late frames were not dropped and counted", 10)


async def test_a_stop_ends_the_session_and_frees_its_slot(bus: Bus, start_worker: StartWorker) -> None:
    running = await start_worker(dialogue_slots=1)
    await open_session(bus, SessionStart(session_id="brief"))
    reader = DialogueReader(bus, "brief")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready event")
    await bus.append_control(SessionStop(session_id="brief", reason="client_closed"))
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 10, "no ended event")

    for _ in range(3):  # a few more ticks' worth of reads: `ended` stays the last entry
        await reader.poll()
    last = reader.entries[-1]
    assert isinstance(last, SessionEvent) and last.name == EventName.ENDED and last.detail == "client_closed"
    assert running.worker.batcher.free_rows() == [0]
    group = running.worker.consumer
    assert (await bus.redis.xpending(bus.names.control, group.group))["pending"] == 0, "start released"
    assert await bus.redis.ttl(bus.names.session_dialogue("brief")) > 0, "its keys now expire"


async def test_a_full_worker_leaves_further_starts_for_others(bus: Bus, start_worker: StartWorker) -> None:
    running = await start_worker(dialogue_slots=1)
    await open_session(bus, SessionStart(session_id="first"))
    first = DialogueReader(bus, "first")
    await first.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready")
    await open_session(bus, SessionStart(session_id="second"))

    async def full_fleet_visible() -> bool:  # what the gateway checks before it sends a start
        workers = await list_workers(bus, "dialogue")
        return sum(w.free_slots for w in workers) == 0

    await wait_until(full_fleet_visible, "presence never showed the worker full", 10)
    second = DialogueReader(bus, "second")
    # Let the worker run a couple of its placement rounds (it polls every 0.5 s while full).
    await first.until(lambda r: len(r.frames) >= 20, 20, "the first session stopped")
    await second.poll()
    assert not second.events, "a full worker must not take a start"
    group = running.worker.consumer.group
    second_start = (await bus.range(bus.names.control))[-1].entry_id
    assert not await _delivered(bus, group, second_start), "the second start waits in the group, unread"

    # The gateway gave up on `second` (no slot in time) and ended it; when a slot frees, it is skipped.
    await SessionStore(bus, 60).finalize("second", "no_capacity")
    await bus.append_control(SessionStop(session_id="first"))
    await wait_until(lambda: _delivered(bus, group, second_start), "the second start was never read", 15)
    await wait_until(lambda: _pending_is(bus, group, 0), "the second start was not acked", 15)
    await second.poll()
    assert second.event(EventName.READY) is None
    assert running.worker.batcher.free_rows() == [0]


async def _pending_is(bus: Bus, group: str, count: int) -> bool:
    pending = await bus.redis.xpending(bus.names.control, group)
    return bool(pending["pending"] == count)


async def _delivered(bus: Bus, group: str, entry_id: str) -> bool:
    """The group has read up to `entry_id`."""
    info = next(g for g in await bus.redis.xinfo_groups(bus.names.control) if g["name"].decode() == group)
    last = info["last-delivered-id"].decode()
    return tuple(map(int, last.split("-"))) >= tuple(map(int, entry_id.split("-")))


async def test_a_session_whose_lease_lapsed_is_ended_for_everyone_and_its_slot_freed(
    bus: Bus, start_worker: StartWorker
) -> None:
    running = await start_worker(dialogue_slots=1, session_check_s=0.2)
    store = SessionStore(bus, 60)
    await store.register("alice", "orphan", limit=4)
    # Its gateway renews the lease... until it dies: nobody renews this one past a second.
    await open_session(bus, SessionStart(session_id="orphan", owner="alice"), lease_s=1.0)
    reader = DialogueReader(bus, "orphan")
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 20, "the lapsed session never ended")

    ended = reader.event(EventName.ENDED)
    assert ended is not None and ended.detail == "lease_expired"
    info = await store.get("orphan")
    assert info is not None
    assert info.state == "ended" and info.end_reason == "lease_expired"
    assert running.worker.batcher.free_rows() == [0], "the slot is free again"
    assert await store.live_session_ids("alice") == [], "the key's session budget is back"
    end = running.settings.data_dir / "transcripts" / "orphan" / "end.json"
    await wait_until(lambda: _exists(end), "the transcript's end was not recorded", 5)


async def test_a_worker_that_lost_its_session_while_paused_stops_publishing_for_it(
    bus: Bus, start_worker: StartWorker
) -> None:
    running = await start_worker(dialogue_slots=1)
    await open_session(bus, SessionStart(session_id="moved"))
    reader = DialogueReader(bus, "moved")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready event")
    await talk(bus, "moved", range(0, 10))
    await reader.until(lambda r: len(r.frames) >= 3, 20, "frames did not flow")
    # Another worker took it over (what failover does while this one is paused): the fence moves.
    await SessionStore(bus, 60).update("moved", dialogue_owner="moshiko/someone-else")
    written = len(reader.entries)
    await wait_until(lambda: _slot_free(running), "the worker kept the session's slot", 10)
    await talk(bus, "moved", range(10, 20))
    for _ in range(5):
        await reader.poll()
    assert len(reader.entries) <= written + 1, "at most the tick in flight; nothing after the fence"
    assert reader.event(EventName.ENDED) is None, "it is not this worker's to end"


async def test_a_session_redis_lost_keeps_its_last_words_in_the_transcript(
    bus: Bus, start_worker: StartWorker
) -> None:
    """A Redis restarted without its data loses the session hash: the worker lets the session go (nobody
    takes it over). The utterance it was in the middle of was dropped with it, words the client heard
    and its transcript never had; it is recorded now."""
    running = await start_worker(dialogue_slots=1, session_check_s=0.2)
    await open_session(bus, SessionStart(session_id="lost"))
    reader = DialogueReader(bus, "lost")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready event")
    await talk(bus, "lost", range(0, 30))
    await reader.until(lambda r: len("".join(f.text for f in r.frames).split()) >= 3, 20, "no words")
    await bus.redis.delete(bus.names.session("lost"))  # what a restart without persistence does
    await wait_until(lambda: _slot_free(running), "the worker kept the lost session's slot", 10)
    await reader.poll()  # every frame written before the hash went (the fence refuses those after)
    heard = "".join("".join(f.text for f in reader.frames).split())
    log = running.settings.data_dir / "transcripts" / "lost" / "utterances.jsonl"

    async def recorded() -> str:
        if not await _exists(log):
            return ""
        lines = (await asyncio.to_thread(log.read_text)).splitlines()
        return "".join("".join(json.loads(line)["text"] for line in lines).split())

    await wait_until(lambda: _startswith(recorded(), heard), "the transcript to hold every word heard", 5)


async def _startswith(text: Awaitable[str], prefix: str) -> bool:
    return (await text).startswith(prefix)


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


async def _slot_free(running: RunningWorker) -> bool:
    return running.worker.batcher.free_rows() == [0]


async def test_a_session_stopped_while_it_speaks_ends_after_its_last_frame(
    bus: Bus, start_worker: StartWorker
) -> None:
    """A tick's frames are written while the next tick steps: `ended` still comes after all of them, and
    the stream's order is the seq order."""
    await start_worker(dialogue_slots=2)
    await open_session(bus, SessionStart(session_id="talker"))
    reader = DialogueReader(bus, "talker")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready event")
    await talk(bus, "talker", range(0, 40))
    await reader.until(lambda r: len(r.frames) >= 4, 20, "frames did not flow")
    await bus.append_control(SessionStop(session_id="talker", reason="client_closed"))
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 10, "no ended event")
    for _ in range(3):
        await reader.poll()

    seqs = [e.seq for e in reader.entries]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "stream order is seq order"
    last = reader.entries[-1]
    assert isinstance(last, SessionEvent) and last.name == EventName.ENDED


async def test_a_placed_session_that_finds_no_free_row_is_refused_and_the_worker_serves_on(
    bus: Bus, start_worker: StartWorker
) -> None:
    """Placement, failover and rollovers never count the same free row (tests/services/dialogue/
    test_rollover.py); should a join still find none, that session is refused with `no_capacity` and the
    worker's loops go on: the next session is placed."""
    running = await start_worker()
    batcher = running.worker.batcher
    join = batcher.join

    def full_once(*args: object, **kwargs: object) -> int:
        batcher.join = join  # type: ignore[method-assign]
        raise NoCapacity(f"all {batcher.batch_size} slots are busy")

    batcher.join = full_once  # type: ignore[method-assign]
    await open_session(bus, SessionStart(session_id="unlucky"))
    unlucky = DialogueReader(bus, "unlucky")
    await unlucky.until(lambda r: r.event(EventName.ENDED) is not None, 20, "never refused")
    error = unlucky.event(EventName.ERROR)
    assert error is not None and error.data_as(Failure).code == "no_capacity"
    await open_session(bus, SessionStart(session_id="next"))
    await DialogueReader(bus, "next").until(lambda r: r.event(EventName.READY) is not None, 30, "not placed")
    assert not running.stop.is_set() and "unlucky" not in running.worker.sessions
    own = running.worker.ownership
    owned = bus.names.owned(own.group, running.settings.worker_id)
    assert not await bus.redis.sismember(owned, "unlucky"), "released: no worker would ever take it over"
