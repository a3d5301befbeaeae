"""Per-message deflate, which clients offer by default: declined on `/api/chat` (Ogg/Opus does not
compress; deflating it only costs the gateway CPU), kept on `/v1/realtime` (base64 JSON compresses)."""

from __future__ import annotations

from websockets.asyncio.client import connect

from tests.support.stack import ChorusStack


async def offered_deflate_accepted(url: str) -> bool:
    async with connect(url, open_timeout=30) as ws:  # offers permessage-deflate
        assert ws.response is not None
        return "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")


async def test_moshi_protocol_declines_compression_and_realtime_keeps_it(stack: ChorusStack) -> None:
    assert not await offered_deflate_accepted(f"{stack.ws_url}/api/chat")
    assert await offered_deflate_accepted(f"{stack.ws_url}/v1/realtime")
