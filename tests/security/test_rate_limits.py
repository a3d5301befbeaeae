"""Limits after auth, on a real gateway process: the REST rate counts authenticated owners, and missing or
unknown keys are counted per client IP and answered 429 once over a small budget, so random keys can
neither be sprayed nor dodge the limit."""

from __future__ import annotations

import json
import secrets
import socket
from collections import Counter

import httpx
from websockets.asyncio.client import connect

from tests.security.conftest import StartGateway

ALICE, BOB = "key-alice", "key-bob"


def get(url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/v1/personas", headers=headers, timeout=10)


def test_random_keys_are_counted_per_client_ip_then_refused(start_gateway: StartGateway) -> None:
    budget = 5
    gateway = start_gateway(CHORUS_API_KEYS=f"{ALICE},{BOB}", CHORUS_AUTH_FAILURES_PER_MINUTE=str(budget))
    sprayed = [get(gateway.url, secrets.token_hex(8)).status_code for _ in range(budget)]
    assert sprayed == [401] * budget
    refused = get(gateway.url, secrets.token_hex(8))
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert get(gateway.url, None).status_code == 429, "a missing key counts too"
    # A valid key from the same address is never held back by the failures of others behind it.
    assert get(gateway.url, ALICE).status_code == 200
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'chorus_limit_rejections_total{limit="auth_failures"} 2.0' in metrics


async def test_websocket_key_guessing_counts_against_the_same_budget(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=ALICE, CHORUS_AUTH_FAILURES_PER_MINUTE="2")
    refusals = []
    for path in ("/v1/realtime", "/v1/realtime", "/v1/realtime", "/api/chat"):
        headers = {"Authorization": f"Bearer {secrets.token_hex(8)}"}
        async with connect(f"{gateway.ws_url}{path}", additional_headers=headers) as ws:
            first = await ws.recv()
            await ws.wait_closed()
        code = json.loads(first)["error"]["code"] if isinstance(first, str) else first[1:].decode()
        refusals.append((code, ws.close_code, ws.close_reason))
    # Over budget is "try again later" (1013), as every retryable refusal; a wrong key is final (1008).
    assert refusals == [
        ("unauthorized", 1008, "unauthorized"),
        ("unauthorized", 1008, "unauthorized"),
        ("rate_limited", 1013, "rate_limited"),
        (
            "more than 2 requests with a missing or unknown API key from your address per minute",
            1013,
            "rate_limited",
        ),
    ]
    assert get(gateway.url, "guess").status_code == 429, "REST and WebSockets share the budget"


def test_the_request_rate_counts_authenticated_owners(start_gateway: StartGateway) -> None:
    limit = 5
    gateway = start_gateway(
        CHORUS_API_KEYS=f"{ALICE},{BOB}",
        CHORUS_REQUESTS_PER_MINUTE=str(limit),
        CHORUS_AUTH_FAILURES_PER_MINUTE="1000",
    )
    # Unknown keys no longer open buckets of their own: they never reach the owners' counters.
    assert [get(gateway.url, secrets.token_hex(8)).status_code for _ in range(limit + 1)] == [401] * (
        limit + 1
    )
    assert [get(gateway.url, ALICE).status_code for _ in range(limit)] == [200] * limit
    refused = get(gateway.url, ALICE)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert get(gateway.url, BOB).status_code == 200, "each owner has a budget of its own"
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200, "probes are never limited"


def test_a_burst_of_requests_waits_for_redis_connections_instead_of_failing(
    start_gateway: StartGateway,
) -> None:
    """300 requests at once, each counted in Redis: the pool (100 connections) ran out and the rest were
    refused 503 at once, so one client's burst failed other clients' requests. Now they wait for one."""
    gateway = start_gateway()
    request = b"GET /v1/personas HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    clients = [socket.create_connection(("127.0.0.1", gateway.port), timeout=30) for _ in range(300)]
    try:
        for client in clients:
            client.sendall(request)
        statuses = Counter()
        for client in clients:
            received = b""
            while chunk := client.recv(65536):
                received += chunk
            statuses[int(received.split()[1])] += 1
    finally:
        for client in clients:
            client.close()
    assert statuses == {200: 300}, statuses
