"""The moment `chorus up` says it is ready, it is: clients that connect on that line all get a session."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from tests.support.chorus_up import ChorusUp
from tests.support.clients import MoshiClient

pytestmark = pytest.mark.chaos

CLIENTS = 4


async def test_four_clients_connecting_on_the_ready_line_all_get_a_handshake(
    tmp_path: Path, checkpoints: Path
) -> None:
    up = ChorusUp(tmp_path, checkpoints, {"CHORUS_DIALOGUE_SLOTS": str(CLIENTS)})
    try:
        ready_line = f"chorus is ready: http://127.0.0.1:{up.ports['gateway']} "
        up.wait_for_line(re.escape(ready_line), 120)
        ready_at = time.monotonic()
        ws_url = f"ws://127.0.0.1:{up.ports['gateway']}"
        opened = await asyncio.gather(
            *(MoshiClient.open(ws_url, voice="moshiko") for _ in range(CLIENTS)), return_exceptions=True
        )
        took = time.monotonic() - ready_at
        refused = [repr(o) for o in opened if isinstance(o, BaseException)]
        print(f"{CLIENTS - len(refused)} of {CLIENTS} handshakes, {took:.2f} s after the ready line")
        assert not refused, f"refused right after 'chorus is ready': {refused}"
        clients = [o for o in opened if isinstance(o, MoshiClient)]
        assert len({c.session_id for c in clients}) == CLIENTS
        await asyncio.gather(*(c.ws.close() for c in clients))
        assert up.stop() == 0
    finally:
        up.kill()
