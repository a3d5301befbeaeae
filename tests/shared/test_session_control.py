"""Per-session control streams (shared/ownership.py, `SessionControl`) against a real redis-server: a
worker reads the `update` / `stop` / `flush` of the sessions it owns, all of them and nothing else, from
the moment it took each one, across a Redis restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from chorus.devtools.redis_server import EmbeddedRedis
from shared.bus import Bus
from shared.messages import CONTROL, ControlMessage, SessionFlush, SessionStart, SessionStop, SessionUpdate
from shared.ownership import SessionOwnership, TakeOutcome
from shared.sessions import SessionStore
from shared.streams import StreamNames
from tests.support.sessions import open_session
from tests.support.waiting import wait_until


def ownership(bus: Bus, worker_id: str) -> SessionOwnership:
    return SessionOwnership(
        bus, SessionStore(bus, 60), service="tts", group="tts", worker_id=worker_id, field="tts_worker"
    )


@contextlib.asynccontextmanager
async def following(worker: SessionOwnership) -> AsyncIterator[list[ControlMessage]]:
    """The worker's control reader running; yields what it applied, in order."""
    applied: list[ControlMessage] = []

    async def apply(message: ControlMessage) -> None:
        applied.append(message)

    stop = asyncio.Event()
    task = asyncio.create_task(worker.follow_control(stop, apply))
    try:
        yield applied
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def of(applied: list[ControlMessage], sid: str) -> list[type]:
    return [type(m) for m in applied if m.session_id == sid]


async def send_all(bus: Bus, sid: str) -> None:
    await bus.append_control(SessionUpdate(session_id=sid, voice="moshika"))
    await bus.append_control(SessionFlush(session_id=sid))
    await bus.append_control(SessionStop(session_id=sid, reason="client_closed"))


ALL = [SessionUpdate, SessionFlush, SessionStop]


async def test_a_worker_gets_the_control_of_the_sessions_it_owns_and_nothing_of_the_others(bus: Bus) -> None:
    worker = ownership(bus, "w1")
    for sid in ("a", "b", "c"):
        await open_session(bus, sid)
    assert await worker.take("a") is TakeOutcome.TAKEN
    assert await worker.take("b") is TakeOutcome.TAKEN
    async with following(worker) as applied:
        # Another worker's session first: had its stream been read, the read that brought a's or b's
        # entries would have brought c's too (one XREAD returns every listed stream that has entries).
        await send_all(bus, "c")
        await send_all(bus, "a")
        await send_all(bus, "b")
        await wait_until(lambda: len(applied) >= 6, "a's and b's control")
    assert of(applied, "a") == ALL and of(applied, "b") == ALL, "each in the order sent"
    assert of(applied, "c") == [], "another session's control is never read"
    assert "a" in worker.stops and "b" in worker.stops and "c" not in worker.stops
    shared = [type(CONTROL.decode(e.fields)) for e in await bus.range(bus.names.control)]
    assert shared == [SessionStart] * 3, "the shared stream carries only placement"
    assert len(await bus.range(bus.names.session_control("c"))) == 3, "c's went to its own stream"


async def test_a_session_taken_later_is_read_from_its_take_on(bus: Bus) -> None:
    """What was sent before the take is in the session hash the worker serves (the gateway writes it
    first); everything sent after it is read, even before the reader's read in flight comes back."""
    worker = ownership(bus, "w1")
    await open_session(bus, "early")
    await worker.take("early")
    async with following(worker) as applied:
        await open_session(bus, "late")
        before = SessionUpdate(session_id="late", voice="moshiko")
        await bus.append_control(before)
        await asyncio.sleep(0.1)  # the reader is blocked on "early" alone
        assert await worker.take("late") is TakeOutcome.TAKEN
        await send_all(bus, "late")
        await wait_until(lambda: len(of(applied, "late")) == 3, "the late session's control")
    assert of(applied, "late") == ALL and before not in applied, "from the take on, not before it"


async def test_a_session_stopped_before_it_was_taken_is_never_taken(bus: Bus) -> None:
    worker = ownership(bus, "w1")
    await open_session(bus, "brief")
    await SessionStore(bus, 60).finalize("brief", "client_closed")  # marks it ended, then sends the stop
    assert await worker.take("brief") is TakeOutcome.ENDED


async def test_a_session_taken_over_is_read_from_its_takeover_on(bus: Bus) -> None:
    dead = ownership(bus, "dead")  # it never beats: its presence is gone
    await open_session(bus, "moved", voice="moshiko")
    await dead.take("moved")
    await SessionStore(bus, 60).update("moved", voice="moshika")  # as the gateway does: hash first,
    await bus.append_control(SessionUpdate(session_id="moved", voice="moshika"))  # then the update
    survivor = ownership(bus, "survivor")
    async with following(survivor) as applied:
        [takeover] = await survivor.take_over(10)
        assert takeover.start.voice == "moshika", "what was sent before is served from the hash"
        await bus.append_control(SessionFlush(session_id="moved"))
        await wait_until(lambda: len(applied) == 1, "the flush sent after the takeover")
    assert of(applied, "moved") == [SessionFlush], "not the update from before the takeover again"


async def test_the_reader_goes_on_after_a_redis_restart(names: StreamNames) -> None:
    redis = EmbeddedRedis().start()
    bus = await Bus.connect(redis.url, names, timeout_s=1, socket_timeout_s=1)
    try:
        worker = ownership(bus, "w1")
        await open_session(bus, "s1")
        await worker.take("s1")
        async with following(worker) as applied:
            await bus.append_control(SessionFlush(session_id="s1"))
            await wait_until(lambda: len(applied) == 1, "the flush before the restart")
            redis.stop()
            await asyncio.sleep(0.5)  # the reader's reads fail meanwhile; it waits Redis out
            redis = EmbeddedRedis(port=redis.port, password=redis.password).start()  # empty: no persistence

            async def sent_and_read() -> bool:
                with contextlib.suppress(Exception):  # until the bus reconnects
                    if not applied[1:]:
                        await bus.append_control(SessionStop(session_id="s1"))
                return any(isinstance(m, SessionStop) for m in applied)

            await wait_until(sent_and_read, "the stop after the restart", timeout_s=20)
        assert of(applied, "s1")[0] is SessionFlush and "s1" in worker.stops
    finally:
        await bus.close()
        redis.stop()
