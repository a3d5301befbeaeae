"""Redis restarts without persistence mid-session (what `chorus up` does after it crashed): every live
session is lost. No service may exit over it, live clients must be told and let go, REST must say 503
while it is away, and new sessions must work again within seconds of it being back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from chorus.devtools.redis_server import EmbeddedRedis
from shared.bus import Bus
from shared.streams import StreamNames
from tests.chaos.conftest import LEASE_S, SESSION_CHECK_S
from tests.chaos.harness import Call, Observer
from tests.support.clients import MoshiClient
from tests.support.stack import ChorusStack
from tests.support.waiting import wait_until

pytestmark = pytest.mark.chaos

MakeStack = Callable[..., ChorusStack]
Observe = Callable[[ChorusStack], Awaitable[Observer]]

DOWN_S = 2.0  # shorter than the lease: the gateway waits the outage out, then finds the session gone
NEW_SESSION_TARGET_S = 5.0  # the promise, from Redis being back to a new session's handshake
ALLOWANCE_S = 2.0  # a busy 2-core machine


def fmt(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


def kill(redis: EmbeddedRedis) -> None:
    assert redis.process is not None
    redis.process.kill()
    redis.process.wait()


async def handshake_within(ws_url: str, timeout_s: float) -> tuple[MoshiClient, list[str]]:
    """Open new sessions until one gets its handshake, as a client would: that client, and every
    refusal's reason, in order. Each attempt is bounded (a hang is a failure, not a retry)."""
    deadline = time.monotonic() + timeout_s
    refusals: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(left):
                return await MoshiClient.open(ws_url, voice="moshiko"), refusals
        except ConnectionRefusedError as refused:  # the gateway said why (a protocol error message)
            refusals.append(str(refused))
            await asyncio.sleep(0.2)
        except TimeoutError:
            break
    raise AssertionError(f"no new session within {timeout_s:g} s; refusals: {refusals}")


async def test_a_redis_restart_loses_sessions_cleanly_and_new_sessions_work_within_seconds(
    own_redis: EmbeddedRedis, make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack(own_redis.url)
    stack.start_services("router", "tts", "dialogue")
    call = await Call.open(stack.ws_url, voice="moshiko")
    await wait_until(lambda: call.audio_flowing(0, 10), "audio before the restart", 15)

    kill(own_redis)
    await asyncio.sleep(DOWN_S)
    own_redis.start()
    back_at = time.monotonic()

    client, refusals = await handshake_within(stack.ws_url, NEW_SESSION_TARGET_S + ALLOWANCE_S)
    took = time.monotonic() - back_at
    await client.ws.close()
    print(f"redis restart: a new session had its handshake {took:.2f} s after Redis was back; {refusals=}")

    closed = await call.finished(LEASE_S + ALLOWANCE_S)
    assert closed, "the client of a lost session is let go, not left hanging"
    assert call.errors, "the client is told why its session ended (a protocol error message)"
    print(f"the live client was told {call.errors[-1]!r} and closed with code {call.close_code}")
    assert all(p.poll() is None for p in stack.processes.values()), {
        name: p.returncode for name, p in stack.processes.items()
    }
    assert took <= NEW_SESSION_TARGET_S + ALLOWANCE_S

    observer = await observe(stack)

    async def all_slots_free() -> bool:
        free, capacity = await observer.dialogue_slots()
        return free == capacity > 0

    # The lost session's slot, and the new session's once its client hung up.
    await wait_until(all_slots_free, "every dialogue slot free again", SESSION_CHECK_S + ALLOWANCE_S)


REST_WHILE_DOWN = [
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/sess_00000000000000000000"),
    ("GET", "/v1/voices"),
    ("GET", "/v1/personas"),
]


async def test_rest_answers_503_problem_json_while_redis_is_down(
    own_redis: EmbeddedRedis, make_stack: MakeStack
) -> None:
    stack = make_stack(own_redis.url)
    stack.start_services()  # the gateway alone: REST does not need a worker
    kill(own_redis)
    answers = {}
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        for method, path in REST_WHILE_DOWN:
            try:
                response = await http.request(method, path)
                answers[path] = (response.status_code, response.headers.get("content-type"))
            except httpx.TransportError as exc:  # the connection closed without an answer
                answers[path] = (0, type(exc).__name__)
    own_redis.start()
    print(f"REST while Redis is down: {answers}")
    assert all(answer == (503, "application/problem+json") for answer in answers.values()), answers


ROUNDS = 10


async def test_dropped_redis_connections_never_lose_a_new_session_or_its_slot(
    own_redis: EmbeddedRedis, make_stack: MakeStack, observe: Observe
) -> None:
    """Redis drops every client connection (a proxy or a managed Redis failing over, `CLIENT KILL`),
    keeping its data, just as a new session starts: the first write on each pooled connection fails.
    Each new session still gets its handshake, and its slot back once the client hangs up."""
    stack = make_stack(own_redis.url)
    stack.start_services("router", "tts", "dialogue")
    observer = await observe(stack)
    admin = await Bus.connect(own_redis.url, StreamNames(stack.key_prefix))
    took: list[float] = []
    try:
        for _ in range(ROUNDS):
            await admin.redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            dropped_at = time.monotonic()
            client, _ = await handshake_within(stack.ws_url, NEW_SESSION_TARGET_S + ALLOWANCE_S)
            took.append(time.monotonic() - dropped_at)
            await client.ws.close()

            async def all_slots_free() -> bool:
                try:
                    free, capacity = await observer.dialogue_slots()
                except RedisConnectionError:  # the observer's connection was dropped too
                    return False
                return free == capacity > 0

            await wait_until(all_slots_free, "the slot free again", SESSION_CHECK_S + ALLOWANCE_S)
    finally:
        await admin.close()
    print(f"connections dropped {ROUNDS} times: new sessions had their handshake after {fmt(took)} s")
