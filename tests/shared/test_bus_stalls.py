"""The bus while Redis stalls: its process paused (SIGSTOP), as a hung or partitioned server looks to its
clients (connections open, no answer until the socket timeout). Each test pauses a redis-server of its
own, and always continues it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest

from chorus.devtools.redis_server import EmbeddedRedis
from shared.audio import silence_frame
from shared.bus import Bus, SharedReader, SharedWriter
from shared.messages import INPUT, UserAudio
from shared.retry import is_retryable
from shared.streams import StreamNames
from tests.support.waiting import seconds_until

SOCKET_TIMEOUT_S = 1.0  # a stalled command fails after this (the product's default is 5 s)
MAX_WAIT_S = 0.25


@pytest.fixture
async def stalling_bus(own_redis: EmbeddedRedis, names: StreamNames) -> AsyncIterator[Bus]:
    bus = await Bus.connect(
        own_redis.url, names, timeout_s=SOCKET_TIMEOUT_S, socket_timeout_s=SOCKET_TIMEOUT_S
    )
    try:
        yield bus
    finally:
        await bus.close()


@contextlib.contextmanager
def paused(redis: EmbeddedRedis) -> Iterator[None]:
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.process.pid, signal.SIGCONT)


class Talker:
    """Sessions appending their user audio through one writer, each frame numbered in order."""

    def __init__(self, writer: SharedWriter, names: StreamNames) -> None:
        self.writer = writer
        self.names = names
        self.said: dict[str, int] = {}  # per session, how many frames it said (the next frame's seq)

    async def say(self, sid: str) -> tuple[bool | Exception, float]:
        """One frame of `sid`: what its append answered (or raised), and how long that took."""
        seq = self.said.get(sid, 0)
        self.said[sid] = seq + 1
        frame = UserAudio(session_id=sid, seq=seq, pcm=silence_frame())
        began = time.monotonic()
        try:
            result: bool | Exception = await self.writer.append(sid, [(self.names.session_input(sid), frame)])
        except Exception as exc:
            result = exc
        return result, time.monotonic() - began

    async def written(self, sid: str) -> bool:
        """Whether one more frame of `sid` was written."""
        result, _ = await self.say(sid)
        return result is True


async def test_a_shared_writer_drops_live_appends_at_once_while_redis_stalls_and_recovers_in_order(
    own_redis: EmbeddedRedis, stalling_bus: Bus, names: StreamNames
) -> None:
    """Live audio is dropped, not delivered late: no append waits out the socket timeout behind a
    stalled write (so a session's receive loop keeps reading its socket), each is answered with a
    retryable error (counted as dropped by the gateway), and once Redis is back the writer writes again,
    each session's frames in order."""
    talker = Talker(SharedWriter(stalling_bus, max_wait_s=MAX_WAIT_S), names)
    assert (await talker.say("a"))[0] is True
    outcomes: list[tuple[bool | Exception, float]] = []
    with paused(own_redis):
        before = dict(talker.said)
        stalled_until = time.monotonic() + 2.5 * SOCKET_TIMEOUT_S  # several stalled writes in a row
        while time.monotonic() < stalled_until:
            # Two sessions' frames, unsynchronized: one starts a write, the other waits for it.
            outcomes += await asyncio.gather(talker.say("a"), talker.say("b"))
            await asyncio.sleep(0.08)
        during = {sid: range(before.get(sid, 0), said) for sid, said in talker.said.items()}
    assert all(isinstance(result, Exception) and is_retryable(result) for result, _ in outcomes), outcomes
    # Bounded by `max_wait_s`, not the socket timeout (four times longer): compared with the latter, so a
    # loaded machine's slow turns of the loop do not fail it.
    slowest = max(took for _, took in outcomes)
    assert slowest < SOCKET_TIMEOUT_S, f"an append waited {slowest:.2f} s while Redis stalled"

    await seconds_until(lambda: talker.written("a"), "a write once Redis is back", 3 * SOCKET_TIMEOUT_S)
    after = await asyncio.gather(*(talker.say(sid) for sid in ("a", "b", "a", "a", "b")))
    assert [result for result, _ in after] == [True] * 5
    for sid in ("a", "b"):
        seqs = [INPUT.decode(e.fields).seq for e in await stalling_bus.range(names.session_input(sid))]
        assert seqs == sorted(set(seqs)), f"{sid}'s frames out of order: {seqs}"
        assert seqs[-1] == talker.said[sid] - 1, "the frames said after the stall are written"
        # Dropped, not delivered late: only a stalled write's own frames (one per write here, each
        # stalled for the socket timeout) may land once Redis runs again.
        late = [seq for seq in seqs if seq in during[sid]]
        assert len(during[sid]) > 10 and len(late) <= 4, (
            f"{sid} said {during[sid]} while Redis stalled: {seqs}"
        )


async def _raises_retryable(call: Awaitable[object]) -> bool:
    """Whether `call` raised a retryable error; the error itself is let go (with its traceback, the frames
    and futures it holds), so the garbage collector can judge what nobody retrieved."""
    try:
        await call
    except Exception as exc:
        return is_retryable(exc)
    return False


async def test_a_reader_that_left_through_its_own_look_is_not_answered_by_a_later_round(
    own_redis: EmbeddedRedis, stalling_bus: Bus, names: StreamNames
) -> None:
    """A reader that asks while the shared read is in flight looks on its own; when Redis stalls, that
    look fails after a round that covers it began. The round's failure must not be set on the future of
    a reader that is gone (asyncio logs it as an ERROR: 'Future exception was never retrieved')."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    reader, stop = SharedReader(stalling_bus), asyncio.Event()
    running = asyncio.create_task(reader.run(stop))

    async def tail_quietly(stream: str) -> None:  # keeps a round in flight
        while not stop.is_set():
            with contextlib.suppress(Exception):
                await reader.read(stream, "0-0")

    tailing = asyncio.create_task(tail_quietly(names.session_output("a")))
    try:
        await stalling_bus.ping()  # a pooled connection for the look of its own
        await asyncio.sleep(0.1)
        with paused(own_redis):
            await asyncio.sleep(0.5)  # the round in flight is stalled now
            # Fails after the socket timeout; meanwhile the stalled round failed and the next one began.
            assert await _raises_retryable(reader.read(names.session_output("b"), "0-0"))
            await asyncio.sleep(SOCKET_TIMEOUT_S + 0.5)  # the round that covered it fails too
        stop.set()
        await asyncio.wait_for(asyncio.gather(running, tailing), 3 * SOCKET_TIMEOUT_S)
        gc.collect()
        assert not [c for c in unhandled if "never retrieved" in c.get("message", "")], unhandled
    finally:
        stop.set()
        for task in (running, tailing):
            task.cancel()
        loop.set_exception_handler(previous)


async def test_a_write_that_landed_while_the_event_loop_was_busy_is_not_given_up_on(
    stalling_bus: Bus, names: StreamNames
) -> None:
    """The loop held past `max_wait_s` (a long synchronous call) while Redis answered at once: the timer
    fires late, and the write, answered meanwhile, is not taken for a stalled one (its frames dropped)."""
    talker = Talker(SharedWriter(stalling_bus, max_wait_s=MAX_WAIT_S), names)
    assert (await talker.say("a"))[0] is True  # connected
    pending = asyncio.ensure_future(talker.say("a"))
    # Turn by turn (no event to wait on: the writer sets no flag for tests) until the write is sent, its
    # answer not read yet.
    while talker.writer._since is None:  # noqa: ASYNC110
        await asyncio.sleep(0)
    hold_the_event_loop(MAX_WAIT_S + 0.2)  # Redis answers meanwhile
    result, _ = await pending
    assert result is True, result


def hold_the_event_loop(seconds: float) -> None:
    """What a long synchronous call does to every task of the loop."""
    time.sleep(seconds)
