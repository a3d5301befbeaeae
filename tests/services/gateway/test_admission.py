"""New conversations are refused at once, with a reason, when admitting them would hurt the live ones:
Redis near its memory limit (every live session's writes would fail once it is full), or too many
conversations of this gateway already waiting for a slot. The real gateway runs in-process on its own
redis-server (the test changes its `maxmemory`) and is reached over a real WebSocket; no worker serves,
so an admitted conversation waits for its slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from chorus.devtools.redis_server import EmbeddedRedis
from services.gateway.admission import MEMORY_CHECK_S
from shared.bus import Bus
from tests.services.gateway.test_session_faults import ERROR, running_gateway
from tests.support.waiting import wait_until


async def refusal(ws_url: str) -> bytes:
    async with connect(f"{ws_url}/api/chat?voice=moshika") as ws:
        message = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(message, bytes)
        return message


@asynccontextmanager
async def waiting_for_a_slot(bus: Bus, ws_url: str) -> AsyncIterator[ClientConnection]:
    """An admitted conversation: its session exists and waits for a slot (no refusal comes)."""
    async with connect(f"{ws_url}/api/chat?voice=moshika") as ws:
        assert ws.response is not None
        sid = ws.response.headers["x-chorus-session-id"]

        async def opened() -> bool:
            return bool(await bus.redis.exists(bus.names.session(sid)))

        await wait_until(opened, "the session to be opened")
        yield ws


async def test_new_sessions_are_refused_above_the_share_of_redis_maxmemory(
    own_redis: EmbeddedRedis, key_prefix: str, tmp_path: Path
) -> None:
    async with running_gateway(own_redis.url, key_prefix, tmp_path, redis_max_memory_share=0.5) as gateway:
        bus: Bus = gateway.app.state.bus
        used = int((await bus.redis.info("memory"))["used_memory"])
        await bus.redis.config_set("maxmemory", str(int(used * 1.2)))  # ~83 % used: above the 50 % share
        message = await refusal(gateway.ws_url)
        assert message[0] == ERROR and b"of its memory limit" in message, message
        assert not await bus.redis.keys(f"{key_prefix}session:*"), "nothing was started"

        await bus.redis.config_set("maxmemory", str(used * 10))
        await asyncio.sleep(MEMORY_CHECK_S + 0.1)  # the gateway reads INFO again
        async with waiting_for_a_slot(bus, gateway.ws_url):
            pass


async def test_more_waiting_conversations_than_the_queue_holds_are_refused_at_once(
    own_redis: EmbeddedRedis, key_prefix: str, tmp_path: Path
) -> None:
    async with running_gateway(own_redis.url, key_prefix, tmp_path, placement_queue_max=1) as gateway:
        async with waiting_for_a_slot(gateway.app.state.bus, gateway.ws_url):
            message = await refusal(gateway.ws_url)
        assert message[0] == ERROR and b"already waiting for a slot" in message, message
