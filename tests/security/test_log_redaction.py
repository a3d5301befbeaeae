"""No secret or user text in the logs: the real gateway process's log, after requests that carry an API
key, a client secret and a primer in their query strings (uvicorn logs every WebSocket's path with its
query at INFO), holds the parameter names and none of the values."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.security.conftest import StartGateway

KEY = "sk-chorus-log-canary-7f3a"
PRIMER = "my-private-primer-canary"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_query_strings_are_redacted_from_every_log_line(
    start_gateway: StartGateway, log_format: str
) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEY, CHORUS_LOG_FORMAT=log_format, CHORUS_PLACEMENT_WAIT_S="0.5")
    query = f"api_key={KEY}&primer={PRIMER}"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as rest:
        assert (await rest.get(f"/v1/personas?{query}")).status_code == 200
        minted = await rest.post("/v1/realtime/client_secrets", headers={"Authorization": f"Bearer {KEY}"})
    secret = minted.json()["value"]
    # Accepted sockets: uvicorn logs `"WebSocket /path?query" [accepted]` at INFO.
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshiko&{query}", open_timeout=10) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
    async with connect(f"{gateway.ws_url}/v1/realtime?client_secret={secret}", open_timeout=10) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
    # JavaScript's encodeURIComponent leaves "'" as it is: a primer with an apostrophe arrives raw.
    async with connect(f"{gateway.ws_url}/v1/realtime?primer=don't-{PRIMER}&{query}", open_timeout=10) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
    async with connect(f"{gateway.ws_url}/api/chat?{query}", open_timeout=10) as ws:
        await ws.recv()  # no dialogue worker runs: refused with a reason once the placement wait is over
    # A refused upgrade: uvicorn logs the path and the status.
    with pytest.raises(InvalidStatus):
        async with connect(f"{gateway.ws_url}/v1/realtime?{query}", origin=Origin("http://evil.example")):
            pass
    os.killpg(gateway.process.pid, signal.SIGTERM)  # the log is complete once the process is gone
    gateway.process.wait(30)

    log = gateway.log_text()
    assert log.count("api_key=***") >= 4, "the lines that carried the query are there, redacted"
    assert "client_secret=***" in log
    for canary in (KEY, PRIMER, secret):
        assert canary not in log, canary
