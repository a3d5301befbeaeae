"""A WebSocket upgrade too large for the handshake parser, against a real gateway process: its request
line or a header line over 8 KiB, or over 128 headers. The parser refuses it before it is a request, and
uvicorn used to log the 414 or 431 as sent without writing it, leaving the connection open until the
client left: a client with a long `?text_prompt=` hung in its handshake, and anyone could hold sockets.
Now the client reads the status and the gateway's end of the stream at once, and nothing is logged as an
error."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.security.conftest import GatewayProcess, StartGateway, upgrade_request

# ~2000 characters of a persona prompt, ~18 KB once percent-encoded: what a Moshi client may send.
LONG_PROMPT = urllib.parse.quote("こんにちは、私はあなたの親切なアシスタントです。" * 80)
CLOSED_WITHIN_S = 3.0  # generous: the answer is written at once


def with_headers(path: str, headers: bytes) -> bytes:
    return upgrade_request(path).removesuffix(b"\r\n") + headers + b"\r\n"


OVERSIZED = {
    "request line": (upgrade_request(f"/api/chat?text_prompt={LONG_PROMPT}"), 414),
    "header line": (with_headers("/api/chat", b"X-Big: " + b"a" * 9000 + b"\r\n"), 431),
    "headers": (with_headers("/v1/realtime", b"".join(b"X-%d: a\r\n" % i for i in range(130))), 431),
}


def read_until_closed(gateway: GatewayProcess, request: bytes) -> tuple[bytes, float]:
    """Send the request, keep our end open, and read until the gateway ends the stream: what it sent,
    and how long after the request it ended it (the socket times out if it never does)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=CLOSED_WITHIN_S) as conn:
        conn.sendall(request)
        sent = time.monotonic()
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received, time.monotonic() - sent


@pytest.mark.parametrize("too_long", OVERSIZED)
def test_an_oversized_upgrade_is_answered_and_closed(start_gateway: StartGateway, too_long: str) -> None:
    gateway = start_gateway()
    request, status = OVERSIZED[too_long]
    for _ in range(3):  # neither the first nor a later one is left open
        response, closed_after_s = read_until_closed(gateway, request)
        assert response.startswith(f"HTTP/1.1 {status} ".encode()), response[:200]
        assert closed_after_s < CLOSED_WITHIN_S

    # The gateway still serves, over HTTP and WebSockets, and logged no alarm.
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200
    assert read_until_closed(gateway, upgrade_request("/v1/realtime", origin="http://evil.example"))[
        0
    ].startswith(b"HTTP/1.1 403 ")
    errors = [line for line in gateway.log_text().splitlines() if " ERROR " in line or "Traceback" in line]
    assert errors == [], "\n".join(errors)
    counted = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'chorus_sessions_rejected_total{reason="malformed_upgrade"} 3.0' in counted, (
        "counted, not only logged"
    )


@pytest.mark.parametrize(
    "body",
    [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"],
    ids=["content-length", "transfer-encoding"],
)
def test_an_upgrade_with_a_body_is_refused_with_a_problem(start_gateway: StartGateway, body: bytes) -> None:
    """The handshake parser refuses an upgrade carrying a body and answers nothing: the client got a bare
    close. It now reads a 400 problem naming why, then the end of the stream."""
    gateway = start_gateway()
    payload = b"hello" if body.startswith(b"Content-Length") else b"5\r\nhello\r\n0\r\n\r\n"
    response, closed_after_s = read_until_closed(gateway, with_headers("/v1/realtime", body) + payload)
    head, _, problem = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), response[:300]
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(problem)["code"] == "invalid_request"
    assert closed_after_s < CLOSED_WITHIN_S
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200
    counted = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'chorus_sessions_rejected_total{reason="malformed_upgrade"} 1.0' in counted


def test_an_upgrade_over_http_1_0_is_refused_with_a_problem(start_gateway: StartGateway) -> None:
    """RFC 6455 asks for HTTP/1.1; uvicorn wrote an HTTP/1.0 upgrade out again as 1.1 and it was taken.
    Now it is a 400 problem and the end of the stream; plain HTTP/1.0 requests are still served."""
    gateway = start_gateway()
    request = upgrade_request("/v1/realtime").replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    response, closed_after_s = read_until_closed(gateway, request)
    head, _, problem = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), response[:300]
    assert json.loads(problem)["detail"] == "a WebSocket upgrade needs HTTP/1.1"
    assert closed_after_s < CLOSED_WITHIN_S
    plain, _ = read_until_closed(gateway, b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert plain.startswith(b"HTTP/1.1 200 "), plain[:200]
    counted = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'chorus_sessions_rejected_total{reason="malformed_upgrade"} 1.0' in counted


async def test_a_client_with_a_long_prompt_is_told_instead_of_hanging(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{gateway.ws_url}/api/chat?text_prompt={LONG_PROMPT}", open_timeout=10):
            pass
    assert refused.value.response.status_code == 414
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshiko", open_timeout=10) as ws:
        assert '"session.created"' in str(await ws.recv())
