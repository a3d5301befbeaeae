"""The bus against a real redis-server (started by tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import DataError

from shared.audio import silence_frame
from shared.bus import (
    Bus,
    Entry,
    Fence,
    GroupConsumer,
    Handled,
    Lane,
    SessionKeyTimes,
    SessionWrites,
    SharedReader,
    SharedWriter,
    tail,
)
from shared.messages import (
    CONTROL,
    DIALOGUE,
    INPUT,
    ControlMessage,
    DialogueFrame,
    SessionStart,
    SessionStop,
    UserAudio,
)
from shared.streams import StreamNames
from tests.support.waiting import wait_until


def start(sid: str) -> SessionStart:
    return SessionStart(session_id=sid)


@contextlib.asynccontextmanager
async def running(consumer: GroupConsumer[ControlMessage]) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def reading_clients(redis_url: str, name: str | None = None) -> int:
    """How many clients of the server (named `name`, if given) are blocked in XREAD now (seen from a
    client of its own)."""
    observer = Redis.from_url(redis_url)
    try:
        return sum(
            1
            for client in await observer.client_list()
            if client.get("cmd") == "xread" and name in (None, client.get("name"))
        )
    finally:
        await observer.aclose()


def collector(into: list[str]) -> Callable[[ControlMessage, Entry], Awaitable[None]]:
    async def handle(message: ControlMessage, _: Entry) -> None:
        into.append(message.session_id)

    return handle


async def test_each_group_gets_every_entry_and_consumers_of_a_group_share_them(
    bus: Bus, names: StreamNames
) -> None:
    seen_a1: list[str] = []
    seen_a2: list[str] = []
    seen_b: list[str] = []
    stream = names.control
    consumers = [
        GroupConsumer(bus, stream, "A", "a1", CONTROL, collector(seen_a1), block_ms=50),
        GroupConsumer(bus, stream, "A", "a2", CONTROL, collector(seen_a2), block_ms=50),
        GroupConsumer(bus, stream, "B", "b1", CONTROL, collector(seen_b), block_ms=50),
    ]
    for c in consumers:
        await bus.ensure_group(stream, c.group)
    sids = [f"s{i}" for i in range(40)]
    for sid in sids:
        await bus.append_control(start(sid))
    async with contextlib.AsyncExitStack() as stack:
        for c in consumers:
            await stack.enter_async_context(running(c))

        async def all_seen() -> bool:
            return len(seen_a1) + len(seen_a2) == len(sids) and len(seen_b) == len(sids)

        await wait_until(all_seen, "both groups to consume everything")
    assert sorted(seen_a1 + seen_a2) == sorted(sids), "group A got each entry exactly once"
    assert sorted(seen_b) == sorted(sids), "group B independently got each entry exactly once"
    assert await bus.redis.xpending(stream, "A") == {"pending": 0, "min": None, "max": None, "consumers": []}


async def test_a_dead_consumers_entries_are_claimed_by_another(bus: Bus, names: StreamNames) -> None:
    stream = names.control
    await bus.ensure_group(stream, "dialogue")
    await bus.append_control(start("orphan"))
    # A consumer reads the entry and dies before acking: it stays pending under its name.
    taken = await bus.read_group(stream, "dialogue", "dead-worker", count=10, block_ms=100)
    assert [e.entry_id for e in taken]
    seen: list[str] = []
    survivor = GroupConsumer(
        bus, stream, "dialogue", "survivor", CONTROL, collector(seen), claim_idle_ms=300, block_ms=50
    )
    async with running(survivor):
        await wait_until(lambda: len(seen) == 1, "the survivor to claim the orphan")
    assert seen == ["orphan"]
    pending = await bus.redis.xpending(stream, "dialogue")
    assert pending["pending"] == 0


async def test_an_entry_a_handler_took_on_is_not_claimed_back_until_it_is_acked_or_let_go(
    bus: Bus, names: StreamNames
) -> None:
    """`Handled.TAKEN`: the handler acks it itself later. Its own consumer's claim rounds used to hand it
    back to the handler meanwhile, once per round (a start passed on for its adapter, re-appended after a
    delay longer than the claim bound, multiplied: 57 copies of one start in 2 s)."""
    stream = names.control
    await bus.ensure_group(stream, "dialogue")
    handled: list[Entry] = []

    async def take(message: ControlMessage, entry: Entry) -> Handled:
        handled.append(entry)
        return Handled.TAKEN

    consumer = GroupConsumer(bus, stream, "dialogue", "w1", CONTROL, take, claim_idle_ms=100, block_ms=50)
    await bus.append_control(start("kept"))
    async with running(consumer):
        await wait_until(lambda: len(handled) == 1, "the entry handled")
        await asyncio.sleep(0.5)  # five claim bounds: its own consumer's claim rounds leave it be
        assert len(handled) == 1
        assert (await bus.redis.xpending(stream, "dialogue"))["pending"] == 1
        await consumer.ack(handled[0])
        await bus.append_control(start("let-go"))
        await wait_until(lambda: len(handled) == 2, "the second entry handled")
        consumer.let_go(handled[1])  # given up on: claimed again, by any consumer
        await wait_until(lambda: len(handled) == 3, "the entry let go, claimed again")
        assert handled[2].entry_id == handled[1].entry_id
        await consumer.ack(handled[2])
    assert (await bus.redis.xpending(stream, "dialogue"))["pending"] == 0


async def test_a_fenced_write_lands_only_while_the_writer_owns_the_session(
    bus: Bus, names: StreamNames
) -> None:
    await bus.redis.hset(names.session("mine"), mapping={"state": "active", "dialogue_owner": "w1"})
    await bus.redis.hset(names.session("moved"), mapping={"state": "active", "dialogue_owner": "w2"})
    fence = Fence("dialogue_owner", "w1")
    frame = {
        sid: [(names.session_dialogue(sid), DialogueFrame(session_id=sid, seq=0, pcm=silence_frame()))]
        for sid in ("mine", "moved", "gone")
    }
    fenced_off = await bus.append_sessions(frame, fence)
    assert fenced_off == {"moved", "gone"}, "a session owned by another worker (or by nobody) is refused"
    assert await bus.redis.xlen(names.session_dialogue("mine")) == 1
    assert not await bus.redis.exists(names.session_dialogue("moved"), names.session_dialogue("gone"))
    assert not await bus.append_sessions({"moved": frame["moved"]}), "unfenced writes (the gateway) land"


async def test_session_streams_live_on_a_ttl_that_shortens_once_the_session_ended(
    redis_url: str, names: StreamNames
) -> None:
    times = SessionKeyTimes(ttl_s=600, linger_s=5)
    bus = await Bus.connect(redis_url, names, key_times=times)
    try:
        sid, stream = "s", names.session_output("s")
        message = DialogueFrame(session_id=sid, pcm=silence_frame())
        await bus.redis.hset(names.session(sid), "state", "active")
        await bus.append_session(sid, [(stream, message)])
        assert 590 < await bus.redis.ttl(stream) <= 600, "a live session's stream never outlives the TTL"
        await bus.redis.hset(names.session(sid), "state", "ended")
        await bus.append_session(sid, [(stream, message)])  # a late write after the end
        assert 0 < await bus.redis.ttl(stream) <= 5, "written after the end: deleted soon, never kept"
    finally:
        await bus.close()


async def test_maxlen_bounds_every_stream(bus: Bus, names: StreamNames) -> None:
    stream = names.session_dialogue("long")
    for seq in range(2000):
        await bus.append(stream, DialogueFrame(session_id="long", seq=seq, pcm=silence_frame()), maxlen=100)
    length = await bus.redis.xlen(stream)
    assert 100 <= length < 300, f"approximate trimming keeps about 100 entries, got {length}"
    newest = DIALOGUE.decode((await bus.range(stream, "-", "+"))[-1].fields)
    assert newest.seq == 1999, "trimming drops the oldest entries, never the newest"


async def test_a_finished_sessions_streams_go_first_and_its_state_later(
    redis_url: str, names: StreamNames
) -> None:
    bus = await Bus.connect(redis_url, names, key_times=SessionKeyTimes(ttl_s=60, linger_s=1))
    sid = "done"
    try:
        await bus.append(names.session_dialogue(sid), DialogueFrame(session_id=sid, pcm=silence_frame()))
        await bus.append(names.session_output(sid), DialogueFrame(session_id=sid, pcm=silence_frame()))
        await bus.redis.hset(names.session(sid), mapping={"state": "ended"})
        await bus.redis.set(names.session_lease(sid), b"1")
        await bus.expire_session(sid)
        for key in (names.session_dialogue(sid), names.session_output(sid)):
            assert 0 < await bus.redis.ttl(key) <= 1, "the audio streams (most of the memory) go soon"
        assert 50 < await bus.redis.ttl(names.session(sid)) <= 60, "the hash stays for the session TTL"
        assert not await bus.redis.exists(names.session_lease(sid))

        async def streams_gone() -> bool:
            return not await bus.redis.exists(*names.session_streams(sid))

        await wait_until(streams_gone, "the session's streams to be deleted", timeout_s=5)
    finally:
        await bus.close()


async def test_a_malformed_entry_is_logged_dead_lettered_and_acked_not_retried(
    bus: Bus, names: StreamNames, caplog: pytest.LogCaptureFixture
) -> None:
    stream = names.control
    await bus.ensure_group(stream, "router")
    await bus.redis.xadd(stream, {b"type": b"start", b"session_id": b"../../etc/passwd"})
    await bus.redis.xadd(stream, {b"garbage": b"\xff"})
    await bus.append_control(start("good"))
    seen: list[str] = []
    consumer = GroupConsumer(
        bus, stream, "router", "r1", CONTROL, collector(seen), claim_idle_ms=200, block_ms=50
    )
    with caplog.at_level(logging.WARNING, logger="shared.bus"):
        async with running(consumer):
            await wait_until(lambda: seen == ["good"], "the good entry")
            await asyncio.sleep(0.6)  # several claim rounds: nothing comes back
    assert seen == ["good"]
    reasons = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(reasons) == 2
    assert any("session_id" in r for r in reasons) and any("unknown entry type" in r for r in reasons)
    assert (await bus.redis.xpending(stream, "router"))["pending"] == 0
    dead = await bus.range(names.dead_letter)
    assert len(dead) == 2 and all(b"reason" in e.fields for e in dead)


async def test_a_failing_handler_is_retried_then_dead_lettered(bus: Bus, names: StreamNames) -> None:
    stream = names.control
    attempts: list[str] = []

    async def flaky(message: ControlMessage, _: Entry) -> None:
        attempts.append(message.session_id)
        raise RuntimeError("worker bug")

    await bus.ensure_group(stream, "tts")
    await bus.append_control(start("poison"))
    consumer = GroupConsumer(
        bus, stream, "tts", "t1", CONTROL, flaky, claim_idle_ms=100, max_deliveries=3, block_ms=50
    )
    async with running(consumer):

        async def dead_lettered() -> bool:
            return bool(await bus.range(names.dead_letter))

        await wait_until(dead_lettered, "the poison entry to be dead-lettered")
    assert len(attempts) == 3, "tried max_deliveries times, then given up"
    assert (await bus.redis.xpending(stream, "tts"))["pending"] == 0


async def test_an_entry_its_handler_cannot_take_yet_stays_pending_and_comes_back_without_a_traceback(
    bus: Bus, names: StreamNames, caplog: pytest.LogCaptureFixture
) -> None:
    stream = names.control
    answers = [Handled.RETRY_LATER, Handled.RETRY_LATER, Handled.DONE]
    attempts: list[str] = []

    async def no_slot_yet(message: ControlMessage, _: Entry) -> Handled:
        attempts.append(message.session_id)
        return answers[len(attempts) - 1]

    await bus.ensure_group(stream, "dialogue")
    await bus.append_control(start("waiting"))
    consumer = GroupConsumer(
        bus, stream, "dialogue", "d1", CONTROL, no_slot_yet, claim_idle_ms=100, max_deliveries=5, block_ms=50
    )
    with caplog.at_level(logging.INFO, logger="shared.bus"):
        async with running(consumer):
            await wait_until(lambda: len(attempts) == 3, "the third delivery")

            async def acked() -> bool:
                return (await bus.redis.xpending(stream, "dialogue"))["pending"] == 0

            await wait_until(acked, "the entry to be acked once handled")
    assert attempts == ["waiting"] * 3
    assert not await bus.range(names.dead_letter)
    retried = [r for r in caplog.records if "left pending for retry" in r.getMessage()]
    assert len(retried) == 2 and not any(r.exc_info for r in caplog.records)


async def test_tail_yields_only_new_entries_in_order(bus: Bus, names: StreamNames, redis_url: str) -> None:
    stream = names.control
    await bus.append_control(start("old"))
    received: list[str] = []
    stop = asyncio.Event()

    async def reader() -> None:
        async for message, _ in tail(bus, stream, CONTROL, block_ms=50, stop=stop):
            received.append(message.session_id)
            if len(received) == 3:
                stop.set()

    task = asyncio.create_task(reader())
    # Entries appended before the reader resolved '$' would be (rightly) skipped: append once it is
    # blocked reading, which Redis shows as a client waiting in XREAD.
    await wait_until(lambda: reading_clients(redis_url), "the reader to block in XREAD", 10)
    for sid in ("a", "b", "c"):
        await bus.append_control(start(sid))
    await asyncio.wait_for(task, 5)
    assert received == ["a", "b", "c"]


async def test_connect_fails_fast_with_a_clear_reason_when_redis_is_down() -> None:
    from chorus.devtools.redis_server import free_port
    from shared.errors import ServiceUnavailable

    with pytest.raises(ServiceUnavailable, match="cannot reach Redis"):
        await Bus.connect(f"redis://127.0.0.1:{free_port()}/0", StreamNames(), timeout_s=1)


async def test_append_many_writes_entries_in_order_in_one_round_trip(bus: Bus, names: StreamNames) -> None:
    frames = [DialogueFrame(session_id="s", seq=i, pcm=silence_frame()) for i in range(3)]
    stop = SessionStop(session_id="s")
    await bus.append_many([(names.session_dialogue("s"), f) for f in frames] + [(names.control, stop)])
    written = [DIALOGUE.decode(e.fields) for e in await bus.range(names.session_dialogue("s"))]
    assert [f.seq for f in written] == [0, 1, 2]
    assert [CONTROL.decode(e.fields) for e in await bus.range(names.control)] == [stop]


async def test_a_shared_reader_answers_each_session_with_its_own_entries_from_one_blocking_read(
    bus: Bus, names: StreamNames, redis_url: str
) -> None:
    sessions = [f"s{i}" for i in range(5)]
    # Its own named connections, so the server's client list shows which blocked reads are its.
    own = Bus(Redis.from_url(redis_url, client_name="shared-reader"), names)
    reader = SharedReader(own, block_ms=1000)
    stop = asyncio.Event()
    running_reader = asyncio.create_task(reader.run(stop))
    try:
        reads = {sid: asyncio.create_task(reader.read(names.session_output(sid), "0-0")) for sid in sessions}
        await wait_until(lambda: reading_clients(redis_url, "shared-reader"), "the shared read to block", 10)
        assert await reading_clients(redis_url, "shared-reader") == 1  # one XREAD covers every session
        frames = {sid: DialogueFrame(session_id=sid, seq=7, pcm=silence_frame()) for sid in sessions}
        await bus.append_sessions({sid: [(names.session_output(sid), f)] for sid, f in frames.items()})
        for sid, read in reads.items():
            entries = await asyncio.wait_for(read, 5)
            assert [DIALOGUE.decode(e.fields) for e in entries] == [frames[sid]]
        # Nothing new: a read comes back empty once the block ran out, so its caller can look around.
        assert await asyncio.wait_for(reader.read(names.session_output("s0"), entries[-1].entry_id), 5) == []
    finally:
        stop.set()
        await asyncio.wait_for(running_reader, 5)
        await own.close()


async def test_a_read_when_woken_waits_for_a_wake_stream_then_reads_every_stream(
    bus: Bus, names: StreamNames
) -> None:
    user, dialogue = names.session_input("s"), names.session_dialogue("s")
    said = UserAudio(session_id="s", seq=0, pcm=silence_frame())
    await bus.append_many([(user, said)])
    cursors = {user: "0-0", dialogue: "0-0"}
    read = asyncio.create_task(bus.read_when_woken({dialogue: "0-0"}, cursors, block_ms=10_000))
    await asyncio.sleep(0.3)
    assert not read.done()  # user audio does not wake it
    tick = DialogueFrame(session_id="s", seq=0, pcm=silence_frame())
    await bus.append_many([(dialogue, tick)])
    entries = await asyncio.wait_for(read, 5)
    assert [e.stream for e in entries] == [user, dialogue]
    assert (INPUT.decode(entries[0].fields), DIALOGUE.decode(entries[1].fields)) == (said, tick)
    # No wake-up within the block: what is new elsewhere is read all the same.
    later = UserAudio(session_id="s", seq=1, pcm=silence_frame())
    await bus.append_many([(user, later)])
    cursors = {e.stream: e.entry_id for e in entries}
    again = await bus.read_when_woken({dialogue: cursors[dialogue]}, cursors, block_ms=100)
    assert [INPUT.decode(e.fields) for e in again] == [later]


class CountingBus(Bus):
    """A real bus that also notes which sessions each `append_sessions` round trip carried."""

    def __init__(self, redis: Redis, names: StreamNames) -> None:
        super().__init__(redis, names)
        self.round_trips: list[set[str]] = []

    async def append_sessions(
        self, writes: SessionWrites, fence: Fence | None = None, *, lane: Lane | None = None
    ) -> set[str]:
        self.round_trips.append(set(writes))
        return await super().append_sessions(writes, fence, lane=lane)


async def test_a_shared_writer_sends_the_appends_made_while_a_write_is_in_flight_in_one_round_trip(
    names: StreamNames, redis_url: str
) -> None:
    counting = CountingBus(Redis.from_url(redis_url), names)
    writer = SharedWriter(counting)

    def frame(sid: str, seq: int) -> list[tuple[str, UserAudio]]:
        return [(names.session_input(sid), UserAudio(session_id=sid, seq=seq, pcm=silence_frame()))]

    try:
        first = asyncio.create_task(writer.append("a", frame("a", 0)))
        await asyncio.sleep(0)  # its write is in flight now
        # Frames of other sessions (and a's next one) arrive meanwhile, unsynchronized.
        later = [writer.append(sid, frame(sid, seq)) for sid, seq in (("b", 0), ("a", 1), ("c", 0), ("b", 1))]
        assert await asyncio.gather(first, *later) == [True] * 5
        assert counting.round_trips == [{"a"}, {"a", "b", "c"}]
        for sid, seqs in (("a", [0, 1]), ("b", [0, 1]), ("c", [0])):
            written = [INPUT.decode(e.fields) for e in await counting.range(names.session_input(sid))]
            assert [m.seq for m in written] == seqs  # each session's frames in order
    finally:
        await counting.close()


async def test_a_lingering_shared_writer_sends_appends_made_within_its_linger_in_one_round_trip(
    names: StreamNames, redis_url: str
) -> None:
    counting = CountingBus(Redis.from_url(redis_url), names)
    writer = SharedWriter(counting, linger_s=0.2)
    try:
        first = asyncio.create_task(
            writer.append(
                "a", [(names.session_input("a"), UserAudio(session_id="a", seq=0, pcm=silence_frame()))]
            )
        )
        await asyncio.sleep(0)  # no write is in flight: without a linger, this one would be under way
        second = writer.append(
            "b", [(names.session_input("b"), UserAudio(session_id="b", seq=0, pcm=silence_frame()))]
        )
        assert await asyncio.gather(first, second) == [True, True]
        assert counting.round_trips == [{"a", "b"}]
    finally:
        await counting.close()


async def test_what_a_shared_write_raised_reaches_every_append_it_carried(
    bus: Bus, names: StreamNames
) -> None:
    await bus.redis.set(names.session_input("broken"), "not a stream")
    writer = SharedWriter(bus)
    appends = [
        writer.append(
            sid, [(names.session_input(sid), UserAudio(session_id=sid, seq=0, pcm=silence_frame()))]
        )
        for sid in ("ok", "broken")
    ]
    results = await asyncio.gather(*appends, return_exceptions=True)
    assert all("WRONGTYPE" in str(result) for result in results), results
    # The writer goes on: the next append is a round trip of its own.
    ok = [(names.session_input("ok"), UserAudio(session_id="ok", seq=1, pcm=silence_frame()))]
    assert await writer.append("ok", ok)


async def test_a_writer_renews_its_streams_ttl_a_few_times_per_ttl_not_on_every_frame(
    redis_url: str, names: StreamNames
) -> None:
    bus = await Bus.connect(redis_url, names, key_times=SessionKeyTimes(ttl_s=4, linger_s=1))
    sid, stream = "s", names.session_input("s")

    async def write() -> None:
        await bus.append_session(sid, [(stream, UserAudio(session_id=sid, pcm=silence_frame()))])

    try:
        await bus.redis.hset(names.session(sid), "state", "active")
        await write()
        assert 0 < await bus.redis.pttl(stream) <= 4000, "a new stream gets its TTL at once"
        await bus.redis.pexpire(stream, 100_000)
        await write()
        assert await bus.redis.pttl(stream) > 4000, "renewed a few times per TTL, not on every frame"
        await bus.redis.delete(stream)  # lapsed meanwhile: the next write makes it anew, on its TTL
        await write()
        assert 0 < await bus.redis.pttl(stream) <= 4000
        await bus.redis.pexpire(stream, 100_000)
        await asyncio.sleep(1.1)  # a quarter of the TTL later
        await write()
        assert 0 < await bus.redis.pttl(stream) <= 4000, "renewed once due"
    finally:
        await bus.close()


async def test_a_lane_acts_as_the_pool_through_a_dropped_connection_a_lost_script_and_a_cancel(
    bus: Bus, names: StreamNames
) -> None:
    lane = bus.lane()
    user, dialogue = names.session_input("s"), names.session_dialogue("s")
    said = [UserAudio(session_id="s", seq=seq, pcm=silence_frame()) for seq in range(3)]
    cursors = {user: "0-0", dialogue: "0-0"}
    try:
        assert await bus.append_sessions({"s": [(user, said[0])]}, lane=lane) == set()
        assert await bus.read(cursors, lane=lane) == await bus.read(cursors)
        assert await bus.append_sessions(
            {"s": [(user, said[0])]}, Fence("router_worker", "r"), lane=lane
        ) == {"s"}, "fenced off: nobody owns the session"
        # Redis drops every other client (as a restart does), then forgets its scripts: the lane goes on.
        await bus.redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await bus.redis.script_flush()
        assert await bus.append_sessions({"s": [(user, said[1])]}, lane=lane) == set()
        # A blocking read cancelled mid-wait leaves no reply behind on the lane.
        blocked = asyncio.create_task(bus.read_when_woken({dialogue: "$"}, cursors, block_ms=5000, lane=lane))
        await asyncio.sleep(0.1)
        blocked.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await blocked
        await bus.append_sessions({"s": [(user, said[2])]}, lane=lane)
        entries = await bus.read_when_woken({user: "0-0"}, cursors, block_ms=100, lane=lane)
        assert [INPUT.decode(e.fields) for e in entries] == said
        assert entries == await bus.read_when_woken({user: "0-0"}, cursors, block_ms=100)
    finally:
        await lane.close()


async def test_a_lane_refuses_a_second_task_while_a_call_is_in_flight(bus: Bus, names: StreamNames) -> None:
    """Two tasks reading one connection can each take the other's reply without an error: the second call
    is refused before it sends anything, and the first gets its own reply."""
    lane = bus.lane()
    user, dialogue = names.session_input("s"), names.session_dialogue("s")
    said = UserAudio(session_id="s", seq=0, pcm=silence_frame())
    try:
        await bus.append_sessions({"s": [(user, said)]})
        reading = bus.read_when_woken({dialogue: "$"}, {user: "0-0"}, block_ms=200, lane=lane)
        blocked = asyncio.create_task(reading)
        await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="one task at a time"):
            await lane.execute(("ECHO", "mine"))
        assert [INPUT.decode(e.fields) for e in await blocked] == [said]
        assert await lane.execute(("ECHO", "mine"), ("PING",)) == [b"mine", b"PONG"]
    finally:
        await lane.close()


async def test_a_lane_sends_arguments_as_the_pool_does_or_refuses_them(bus: Bus) -> None:
    """Never an argument's repr sent as data."""
    lane = bus.lane()
    try:
        sent = (b"b", "s\u00e9", 7, 1.5, bytearray(b"ba"), memoryview(b"mv"))
        assert await lane.execute(*(("ECHO", arg) for arg in sent)) == [
            await bus.redis.echo(arg) for arg in sent
        ]
        for refused in (True, None, object()):
            with pytest.raises(DataError):
                await lane.execute(("ECHO", refused))
        assert await lane.execute(("PING",)) == [b"PONG"]
    finally:
        await lane.close()
