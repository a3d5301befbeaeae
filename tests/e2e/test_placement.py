"""Placement on a full fleet: a new conversation waits for a slot (CHORUS_PLACEMENT_WAIT_S, 3 s in this
stack) instead of being refused at once, and is refused with a reason only after the wait."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.e2e.conftest import DIALOGUE_SLOTS
from tests.support.audio import speech_like
from tests.support.clients import MoshiClient
from tests.support.stack import ChorusStack

PLACEMENT_WAIT_S = 3.0  # the stack's CHORUS_PLACEMENT_WAIT_S


@contextlib.asynccontextmanager
async def every_slot_taken(stack: ChorusStack) -> AsyncIterator[list[MoshiClient]]:
    clients = list(await asyncio.gather(*(MoshiClient.open(stack.ws_url) for _ in range(DIALOGUE_SLOTS))))
    try:
        yield clients
    finally:
        await asyncio.gather(*(client.close() for client in clients))


async def test_a_new_conversation_waits_for_a_slot_and_gets_the_next_one_that_frees(
    stack: ChorusStack,
) -> None:
    async with every_slot_taken(stack) as clients:
        waiting = asyncio.create_task(MoshiClient.open(stack.ws_url))
        await asyncio.sleep(1.0)
        assert not waiting.done(), "a full fleet queues the new conversation, it does not refuse it"
        freed_at = time.monotonic()
        closing = asyncio.create_task(clients.pop().close())
        late = await asyncio.wait_for(waiting, 30)
        placed_after = time.monotonic() - freed_at
        await late.send_audio(speech_like(0.5))
        await late.drain(0.5)
        await late.close()
        await closing
    print(f"placed {placed_after:.2f} s after a slot freed")
    assert late.audio, "the waiting conversation was served"


async def test_a_full_fleet_refuses_a_new_conversation_only_after_the_placement_wait(
    stack: ChorusStack,
) -> None:
    async with every_slot_taken(stack):
        asked = time.monotonic()
        with pytest.raises(ConnectionRefusedError, match="free slot within"):
            await MoshiClient.open(stack.ws_url)
        waited = time.monotonic() - asked
    assert waited >= PLACEMENT_WAIT_S, f"refused after {waited:.1f} s, before the placement wait"
