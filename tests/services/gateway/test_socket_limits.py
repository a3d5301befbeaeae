"""Per-socket limits that need no running stack: the bounded send queue (stale audio dropped in O(1), a
bound on everything else that closes the socket) and `SocketLimits` (message size and rate, one
rate-limit error a second, input audio paced in seconds of audio)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gateway.limits import SocketLimits
from services.gateway.protocols.send_queue import SendQueue
from services.gateway.settings import GatewaySettings
from shared.errors import ClientNotReading, PayloadTooLarge, RateLimited


def queue(max_audio: int = 3, max_messages: int = 8, max_bytes: int = 1000) -> SendQueue[str]:
    return SendQueue(max_audio, max_messages, max_bytes, len)


async def test_a_slow_reader_loses_the_oldest_audio_never_text() -> None:
    q = queue()
    q.put("text-1", droppable=False)
    for i in range(5):
        q.put(f"audio-{i}", droppable=True)
    q.put("text-2", droppable=False)
    assert len(q) == 5
    assert q.take_drop_report() == 2
    assert q.take_drop_report() == 0, "each drop is reported once"
    assert [await q.get() for _ in range(5)] == ["text-1", "audio-2", "audio-3", "audio-4", "text-2"]
    assert await q.drained(0.1)


async def test_dropping_stale_audio_does_not_scan_what_else_is_queued() -> None:
    """Audio and everything else wait in separate deques: a drop is a `popleft`, however many messages
    wait. (Before: every `put` scanned the whole queue for audio to drop.)"""
    q = queue(max_audio=64, max_messages=100_000, max_bytes=10**9)
    for i in range(50_000):
        q.put(f"error-{i}", droppable=False)
    started = time.perf_counter()
    for i in range(100_000):
        q.put(f"audio-{i}", droppable=True)
    elapsed_s = time.perf_counter() - started
    print(f"\n100,000 audio puts with 50,000 messages queued: {elapsed_s * 1000:.0f} ms")
    assert q.dropped == 100_000 - 64
    assert elapsed_s < 5  # generous (shared machine); a scan per put would take minutes


@pytest.mark.parametrize(("max_messages", "max_bytes", "size"), [(4, 10_000, 10), (100, 100, 40)])
async def test_a_reader_that_stops_reading_closes_the_queue_with_a_reason(
    max_messages: int, max_bytes: int, size: int
) -> None:
    q = queue(max_messages=max_messages, max_bytes=max_bytes)
    with pytest.raises(ClientNotReading) as raised:
        for _ in range(200):
            q.put("x" * size, droppable=False)
    assert "does not read" in raised.value.detail
    assert len(q) <= max_messages
    with pytest.raises(ClientNotReading):
        q.put("late", droppable=True)
    with pytest.raises(ClientNotReading):
        await q.get()  # the sender stops too
    assert not await q.drained(0.1)


def settings(**values: float) -> GatewaySettings:
    return GatewaySettings(**values)  # type: ignore[arg-type]


async def test_oversized_messages_are_refused_with_a_reason() -> None:
    limits = SocketLimits(settings(ws_max_message_bytes=1024), "realtime")
    refusal = await limits.check({"bytes": b"x" * 2048})
    assert refusal is not None and refusal.tell
    assert isinstance(refusal.error, PayloadTooLarge) and "2048 bytes" in refusal.error.detail
    assert await limits.check({"text": "ok"}) is None


async def test_past_the_rate_messages_are_dropped_with_one_error_a_second() -> None:
    limits = SocketLimits(settings(ws_messages_per_second=5.0), "realtime")
    results = [await limits.check({"text": "ok"}) for _ in range(30)]
    assert results[:10] == [None] * 10  # the burst: 2 s worth
    refusals = [r for r in results if r is not None]
    assert all(isinstance(r.error, RateLimited) and "per second" in r.error.detail for r in refusals)
    assert [r.tell for r in refusals] == [True] + [False] * (len(refusals) - 1)
    await asyncio.sleep(1.05)
    told = [r.tell for r in [await limits.check({"text": "ok"}) for _ in range(20)] if r is not None]
    assert told.count(True) == 1


async def test_input_audio_is_paced_in_seconds_of_audio() -> None:
    limits = SocketLimits(settings(ws_audio_pace=1.0, ws_audio_burst_s=0.2), "moshi")
    started = time.monotonic()
    assert await limits.pace_audio(0.2) is None  # the burst, at once
    assert time.monotonic() - started < 0.1
    assert await limits.pace_audio(0.1) is None  # then at the pace: 0.1 s of audio waits ~0.1 s
    assert time.monotonic() - started >= 0.08


async def test_a_message_with_more_audio_than_the_burst_is_refused_with_a_reason() -> None:
    limits = SocketLimits(settings(ws_audio_pace=1.5, ws_audio_burst_s=2.0), "realtime")
    refused = await limits.pace_audio(3.0)
    assert isinstance(refused, PayloadTooLarge)
    assert "3.00 s of audio" in refused.detail and "2 s" in refused.detail
