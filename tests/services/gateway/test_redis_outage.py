"""REST while Redis is away: every `/v1` answer is a retryable `503` problem with `Retry-After`, never a
500; `/healthz` stays up, `/readyz` says Redis is missing; and everything works again once Redis is back.

The gateway runs in-process (lifespan entered) against a redis-server this test owns, stops and restarts.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from chorus.devtools.redis_server import EmbeddedRedis
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfileStore
from tests.services.gateway.app_client import gateway_client
from tests.support.tts import SPEECH, add_profile

ROUTES = [
    ("GET", "/v1/voices"),
    ("GET", "/v1/personas"),
    ("GET", "/v1/sessions"),
    ("POST", "/v1/voices/x/preview"),
]


async def call(client: httpx.AsyncClient, method: str, path: str) -> httpx.Response:
    return await client.request(method, path, json={"text": "Hello."} if method == "POST" else None)


def assert_unavailable(response: httpx.Response) -> None:
    where = f"{response.request.method} {response.request.url.path}"
    assert response.status_code == 503, f"{where}: {response.status_code} {response.text}"
    assert response.headers["content-type"] == "application/problem+json", where
    problem = response.json()
    assert (problem["code"], problem["retryable"]) == ("service_unavailable", True), where
    assert int(response.headers["retry-after"]) > 0, where


async def test_every_v1_route_answers_503_while_redis_is_away_and_works_again_once_it_is_back(
    key_prefix: str, tmp_path: Path
) -> None:
    redis = EmbeddedRedis().start()
    try:
        async with gateway_client(redis.url, key_prefix, tmp_path) as client:
            for method, path in ROUTES:
                assert (await call(client, method, path)).status_code < 500

            redis.stop()
            for method, path in ROUTES:
                assert_unavailable(await call(client, method, path))
            assert (await client.get("/healthz")).status_code == 200
            readyz = await client.get("/readyz")
            assert readyz.status_code == 503
            assert readyz.json() == {"ready": False, "redis": False}

            redis = EmbeddedRedis(port=redis.port, password=redis.password).start()
            started = time.monotonic()
            for method, path in ROUTES:
                while (response := await call(client, method, path)).status_code == 503:
                    assert time.monotonic() - started < 5, f"{method} {path} still 503: {response.text}"
                    await asyncio.sleep(0.1)
                assert response.status_code < 500, f"{method} {path}: {response.text}"
    finally:
        redis.stop()


async def test_routes_that_need_redis_answer_503_themselves_when_no_rate_limit_counts_first(
    key_prefix: str, tmp_path: Path
) -> None:
    """With the rate limit off nothing touches Redis before the route: the routes' own Redis calls
    (the session set, the TTS worker scan) are mapped; routes served from disk keep working."""
    profile = await add_profile(VoiceProfileStore(LocalStorage(tmp_path)), SPEECH)
    redis = EmbeddedRedis().start()
    try:
        async with gateway_client(redis.url, key_prefix, tmp_path, requests_per_minute=0) as client:
            redis.stop()
            assert_unavailable(await client.get("/v1/sessions"))
            assert_unavailable(await call(client, "POST", f"/v1/voices/{profile.id}/preview"))
            assert (await client.get("/v1/voices")).status_code == 200
            assert (await client.get("/v1/personas")).status_code == 200
    finally:
        redis.stop()


async def test_redis_out_of_memory_is_a_503_too(key_prefix: str, tmp_path: Path) -> None:
    """`OOM command not allowed` (maxmemory reached, noeviction) means "not now", not a bug."""
    with EmbeddedRedis() as redis:
        admin = aioredis.Redis.from_url(redis.url)
        async with gateway_client(redis.url, key_prefix, tmp_path) as client:
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)
            try:
                assert_unavailable(await client.get("/v1/voices"))
            finally:
                await admin.config_set("maxmemory", 0)
            assert (await client.get("/v1/voices")).status_code == 200
        await admin.aclose()
