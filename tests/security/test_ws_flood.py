"""A client that floods its socket and never reads what it is sent, against a real gateway process.

Before: 80,000 tiny realtime messages sent without reading froze `/healthz` for 17.9 s (errors queued
without bound, every `put` scanned the whole queue, and every rate-limited message was answered with
another queued error). Now: messages past the rate are dropped with at most one `rate_limited` error a
second, the receive loop lets other tasks run between messages, and a client that does not read what it
is sent is closed with 1008 and the reason once its socket's send queue is full. Since: the dropped
messages are read at most ten times as fast as the rate, so a flood costs the gateway little CPU (one
read as fast as it came cost a core).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from websockets.asyncio.client import connect

from tests.security.conftest import StartGateway
from tests.security.health_probe import HealthProbe
from tests.security.ws_fuzz import NonReadingClient, flood_without_reading, read_until_quiet

FLOOD_MESSAGES = 6_000
QUIET_S = 2.0  # no message for this long: the gateway has handled the whole flood
RATE = 100  # CHORUS_WS_MESSAGES_PER_SECOND's default: 200 served at once, then 1,000 dropped at once


async def test_a_flood_of_tiny_messages_does_not_hold_up_other_requests(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    async with HealthProbe(gateway.url) as probe:
        await asyncio.sleep(0.3)
        started = time.monotonic()
        ws = await flood_without_reading(gateway.ws_url, FLOOD_MESSAGES)
        events = await read_until_quiet(ws, QUIET_S)
        handled_s = time.monotonic() - started - QUIET_S
        # The socket still works: the tokens are back after the quiet, and its next event is answered.
        await ws.send(json.dumps({"type": "session.update", "event_id": "after", "session": {}}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
        await ws.close()
    figures = probe.result.summary()
    codes = [e["error"]["code"] for e in events if e["type"] == "error"]  # type: ignore[index]
    print(
        f"\n{FLOOD_MESSAGES} messages handled in {handled_s:.1f} s; errors told {len(codes)} "
        f"({codes.count('rate_limited')} rate_limited); gateway RSS {gateway.rss_mb():.0f} MB"
    )
    print(f"/healthz meanwhile: {figures}")
    assert answer["type"] == "session.updated"
    # Past the bursts (2 s of the rate served, 1 s of ten times it dropped), read no faster than the rate
    # served plus ten times it dropped: the rest waited in TCP, costing nothing.
    assert handled_s >= (FLOOD_MESSAGES - 2 * RATE - 10 * RATE) / (11 * RATE) - 0.2
    assert codes.count("rate_limited") <= handled_s + 2  # at most one a second (+ the edges)
    assert set(codes) <= {"rate_limited", "invalid_json"}
    assert await _metric(gateway.url, 'chorus_ws_errors_suppressed_total{protocol="realtime"}') > 0
    assert probe.result.failures == {}
    assert probe.result.p99_ms < 1000  # generous: the machine is shared; the figure is printed above


async def test_large_and_tiny_messages_are_parsed_whole_and_in_order(start_gateway: StartGateway) -> None:
    """The gateway parses a large read a slice at a time (so a flood cannot hold the event loop):
    messages spanning slices, and many in one slice, still arrive whole and in order."""
    gateway = start_gateway()
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshiko", max_size=1 << 24) as ws:
        await ws.recv()  # session.created
        padding = "x" * 50_000
        for i in range(150):
            event = {"type": "no.such.event", "event_id": f"evt_{i}"}
            if i % 3 == 0:
                event["padding"] = padding  # three slices' worth
            await ws.send(json.dumps(event))
        errors = [json.loads(await asyncio.wait_for(ws.recv(), 10))["error"] for _ in range(150)]
    assert [e["event_id"] for e in errors] == [f"evt_{i}" for i in range(150)]
    assert {e["code"] for e in errors} == {"unsupported_event"}


async def test_a_client_that_never_reads_is_closed_with_1008_and_the_reason(
    start_gateway: StartGateway,
) -> None:
    # A message rate high enough that the flood below is read at once (the rate limit is another test's).
    gateway = start_gateway(
        CHORUS_WS_SEND_QUEUE_MESSAGES="16",
        CHORUS_WS_SEND_QUEUE_BYTES=str(64 * 1024),
        CHORUS_WS_MESSAGES_PER_SECOND="10000",
    )
    # What the server sends backs up in the kernel's buffers (megabytes on loopback), then in the
    # socket's send queue, whose bound closes the socket.
    client = NonReadingClient(f"{gateway.ws_url}/v1/realtime?model=moshiko")
    await client.open()
    # Each echoes a session.updated carrying its 2000-character instructions (2.3 KB); none is read.
    update = json.dumps({"type": "session.update", "session": {"instructions": "x" * 2000}})
    sent = 0
    gave_up = 0.0
    deadline = time.monotonic() + 60
    while not gave_up:
        assert time.monotonic() < deadline, f"the gateway still serves a client that read nothing of {sent}"
        try:
            for _ in range(500):
                await asyncio.wait_for(client.send_text(update), 5)
                sent += 1
        except TimeoutError:
            pass  # the server stopped reading us: expected once it gave up on us
        gave_up = await _metric(gateway.url, 'chorus_limit_rejections_total{limit="ws_send_queue"}')
    received, close = await client.read_to_close()
    client.close()
    print(f"\nsent {sent} updates, then read {received} events and the close {close}")
    assert close is not None
    assert (close.code, close.reason) == (1008, "client_not_reading")
    assert gateway.process.poll() is None
    assert await _metric(gateway.url, 'chorus_limit_rejections_total{limit="ws_send_queue"}') == 1
    assert "client_not_reading" in gateway.log_text()


async def _metric(url: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
