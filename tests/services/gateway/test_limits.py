"""Gateway limits: body size (413), REST requests per minute per key (429 + Retry-After), whom an
auth-failure budget belongs to (socket limits: test_socket_limits.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.gateway.limits import client_network
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
