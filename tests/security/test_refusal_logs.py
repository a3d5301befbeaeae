"""A refused WebSocket is the gateway doing its job, not an error: however a client is turned away (a
foreign Host or Origin, an unknown key or client secret, its key's session limit) and however soon it
leaves, the gateway's log gets no ERROR line and no traceback, so nobody can fill it with alarms from
outside; and every refusal is counted in the metrics, so an operator sees it."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.security.conftest import GatewayProcess, StartGateway, upgrade_request
from tests.support.audio import speech_like
from tests.support.clients import RealtimeClient

KEY = "sk-refusal-logs-0123456789"
SOCKETS = ["/api/chat", "/v1/realtime"]
ATTEMPTS = 10


def send_and_leave(gateway: GatewayProcess, request: bytes, *, reset: bool) -> None:
    """Send an upgrade request and leave at once: a FIN, or a reset (SO_LINGER 0)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sendall(request)


def send_and_read(gateway: GatewayProcess, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        conn.sendall(request)
        return conn.recv(65536)


def test_refused_websockets_leave_no_error_in_the_log(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEY, CHORUS_AUTH_FAILURES_PER_MINUTE="10000")
    refusals = {
        "foreign origin": lambda path: upgrade_request(path, origin="http://evil.example"),
        "foreign host": lambda path: upgrade_request(path, host="rebind.attacker.example"),
        "unknown key": lambda path: upgrade_request(f"{path}?api_key=wrong"),
        "unknown client secret": lambda path: upgrade_request(f"{path}?client_secret=ek_unknown"),
    }
    for path in SOCKETS:
        for build in refusals.values():
            assert send_and_read(gateway, build(path)).split(b" ")[1] in (b"101", b"403", b"421")
            for attempt in range(ATTEMPTS):
                send_and_leave(gateway, build(path), reset=attempt % 2 == 1)
    time.sleep(1)  # the last handlers finish

    log = gateway.log_text()
    assert gateway.process.poll() is None
    errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    assert errors == [], "\n".join(errors[:10])
    each = len(SOCKETS) * (1 + ATTEMPTS)
    limits = counters(gateway, "chorus_limit_rejections_total", "limit")
    assert (limits["origin"], limits["host"]) == (each, each)
    # Every unknown credential is a socket refused at open; a client that left first may not be told.
    assert counters(gateway, "chorus_sessions_rejected_total", "reason") == {"unauthorized": 2 * each}


def counters(gateway: GatewayProcess, name: str, label: str) -> dict[str, float]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def test_a_socket_past_its_keys_session_limit_is_refused_and_counted(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(
        CHORUS_API_KEYS=KEY, CHORUS_MAX_SESSIONS_PER_KEY="1", CHORUS_PLACEMENT_WAIT_S="20"
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    async with connect(f"{gateway.ws_url}/api/chat", additional_headers=headers, open_timeout=10):
        await asyncio.sleep(0.5)  # the first session waits for a dialogue slot, counted as live
        async with connect(f"{gateway.ws_url}/api/chat", additional_headers=headers, open_timeout=10) as ws:
            refused = await asyncio.wait_for(ws.recv(), 10)
            await ws.wait_closed()
    assert isinstance(refused, bytes) and refused[0] == 0x05
    assert refused[1:].decode() == "this API key already has 1 live sessions"
    assert ws.close_code == 1013 and ws.close_reason == "rate_limited"
    assert counters(gateway, "chorus_sessions_rejected_total", "reason") == {"per_key_limit": 1}


async def test_a_realtime_socket_past_its_keys_session_limit_is_told_once_a_second_not_per_message(
    start_gateway: StartGateway,
) -> None:
    """A Realtime socket keeps its socket when its start is refused, and the next audio tries again: over
    the key's session limit every append was a new start, refused and counted, and an `error` (12 a
    second at the audio's pace). A refusal that may pass is now tried again, and told, once a second."""
    gateway = start_gateway(
        CHORUS_API_KEYS=KEY, CHORUS_MAX_SESSIONS_PER_KEY="1", CHORUS_PLACEMENT_WAIT_S="20"
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    async with connect(f"{gateway.ws_url}/api/chat", additional_headers=headers, open_timeout=10):
        await asyncio.sleep(0.5)  # the first session waits for a dialogue slot, counted as live
        ws = await connect(f"{gateway.ws_url}/v1/realtime", additional_headers=headers, open_timeout=10)
        client = RealtimeClient(ws)
        await client.wait_for("session.created")
        began = time.monotonic()
        await client.append(speech_like(2.4))  # 30 appends, at the audio's pace
        await client.drain(0.3)
        seconds = time.monotonic() - began
        await client.ws.close()
    errors = client.of_type("error")
    assert errors and {e["error"]["code"] for e in errors} == {"rate_limited"}, errors
    assert len(errors) <= seconds + 1, (len(errors), seconds)
    rejected = counters(gateway, "chorus_sessions_rejected_total", "reason")["per_key_limit"]
    assert rejected == len(errors), "one start a second, each told"
