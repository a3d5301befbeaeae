"""A socket opened while Redis is away, against a real gateway process and a real redis-server stopped
under it: a handshake check that reads Redis (a catalog voice: the TTS workers' offer) failed raw. The
Realtime socket was dropped without a close frame, and /api/chat answered HTTP 500 with a traceback. Both
now tell the client the outage (`service_unavailable`, close 1013: try again later), as REST answers 503."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from websockets.asyncio.client import connect

from chorus.devtools.redis_server import EmbeddedRedis
from tests.security.conftest import launch_gateway, stop_gateway, wait_healthy


async def test_a_socket_opened_while_redis_is_away_is_told_so(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    gateway = launch_gateway(own_redis.url, tmp_path, "0", {}, wait=False)
    try:
        wait_healthy(gateway)
        own_redis.stop()
        for path in ("/v1/realtime?voice=catalog:alba", "/api/chat?voice=catalog:alba"):
            async with connect(f"{gateway.ws_url}{path}", open_timeout=10) as ws:
                said = await asyncio.wait_for(ws.recv(), 10)
                await asyncio.wait_for(ws.wait_closed(), 10)
            if isinstance(said, str):
                assert json.loads(said)["error"]["code"] == "service_unavailable", said
            else:
                assert said[0] == 5 and b"unavailable" in said, said
            assert (ws.close_code, ws.close_reason) == (1013, "service_unavailable"), path
        assert "Traceback" not in gateway.log_text()
    finally:
        stop_gateway(gateway)
