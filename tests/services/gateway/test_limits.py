"""Gateway limits: body size (413), REST requests per minute per key (429 + Retry-After), whom an
auth-failure budget belongs to (socket limits: test_socket_limits.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.types import Message, Receive, Scope, Send

from services.gateway.limits import BodySizeLimit, client_network
from shared import metrics
from tests.services.gateway.app_client import gateway_client

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


def rejections(limit: str) -> float:
    return metrics.LIMIT_REJECTIONS.labels(limit=limit)._value.get()


async def test_oversized_bodies_get_413(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    before = rejections("body_size")
    async with gateway_client(redis_url, key_prefix, tmp_path, max_body_bytes=1024) as client:
        big = {"name": "x", "primer": "y" * 5000}
        response = await client.post("/v1/personas", json=big)
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: bounded while streaming
            yield b'{"name": "x", "primer": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        streamed = await client.post(
            "/v1/personas", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
    assert rejections("body_size") == before + 2


async def test_requests_per_minute_are_limited_per_key(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with gateway_client(
        redis_url, key_prefix, tmp_path, api_keys="key-alice,key-bob", requests_per_minute=3
    ) as client:
        codes = [(await client.get("/v1/personas", headers=ALICE)).status_code for _ in range(4)]
        # A minute boundary can fall inside the loop; then the window restarts and all four pass.
        assert codes in ([200, 200, 200, 429], [200] * 4)
        if codes[-1] == 429:
            refused = await client.get("/v1/personas", headers=ALICE)
            assert refused.status_code == 429
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert (await client.get("/v1/personas", headers=BOB)).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # probes are never limited


@pytest.mark.parametrize(
    ("client", "counted_as"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same subscriber's /64
        ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4 through a dual-stack socket
        ("testclient", "testclient"),
    ],
)
def test_auth_failures_are_counted_per_ipv4_address_or_ipv6_64(client: str, counted_as: str) -> None:
    assert client_network(client) == counted_as


async def _body_then_wait(messages: list[Message], wait_s: float) -> Receive:
    """An ASGI `receive` giving `messages`, then the client's leaving after `wait_s`."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(wait_s)
        return {"type": "http.disconnect"}

    return receive


async def _answered(limit: BodySizeLimit, receive: Receive) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/personas", "headers": []}
    await limit(scope, receive, send)
    return sent


async def test_a_body_slower_than_its_bound_is_refused_and_the_app_told_the_client_left() -> None:
    told: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        told.append(message["type"])

    limit = BodySizeLimit(app, max_bytes=1024, timeout_s=0.2)
    sent = await _answered(limit, await _body_then_wait([{"type": "http.request", "more_body": True}], 5))
    assert sent[0]["status"] == 408 and b'"reason":"body_too_slow"' in sent[1]["body"]
    assert told == ["http.disconnect"]


async def test_a_wait_after_the_whole_body_has_no_deadline() -> None:
    """A streamed answer waits for the client to leave after the body: that is not a slow body."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the whole body
        assert (await receive())["type"] == "http.disconnect"  # past the body's bound
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    limit = BodySizeLimit(app, max_bytes=1024, timeout_s=0.2)
    sent = await _answered(limit, await _body_then_wait([{"type": "http.request", "body": b"{}"}], 0.5))
    assert sent[0]["status"] == 200
