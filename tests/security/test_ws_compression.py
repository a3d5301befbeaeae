"""`CHORUS_WS_COMPRESSION`: per-message deflate on `/v1/realtime` is the operator's choice (CPU against
bytes on the wire); off, the gateway declines a client's offer, and the socket works uncompressed."""

from __future__ import annotations

import json

from websockets.asyncio.client import connect

from tests.security.conftest import StartGateway


async def test_compression_off_declines_the_clients_deflate_offer(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_WS_COMPRESSION="false")
    async with connect(f"{gateway.ws_url}/v1/realtime", open_timeout=10) as ws:  # offers permessage-deflate
        assert ws.response is not None
        assert "permessage-deflate" not in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        created = json.loads(await ws.recv())
    assert created["type"] == "session.created"
