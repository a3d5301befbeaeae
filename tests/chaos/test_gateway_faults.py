"""A gateway that dies with live sessions: nobody renews their leases any more, so the workers end them
within the lease time and every slot, set and transcript is left as if the clients had hung up."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable

import pytest

from tests.chaos.conftest import LEASE_S, SESSION_CHECK_S, SLOTS
from tests.chaos.harness import Call, Observer
from tests.support.stack import ChorusStack
from tests.support.waiting import seconds_until, wait_until

pytestmark = pytest.mark.chaos

MakeStack = Callable[..., ChorusStack]
Observe = Callable[[ChorusStack], Awaitable[Observer]]

ALLOWANCE_S = 2.0  # a busy 2-core machine


@pytest.mark.chaos_smoke
async def test_sessions_of_a_killed_gateway_end_within_the_lease_and_free_every_slot(
    make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack()
    stack.start_services("router", "tts", "dialogue")
    observer = await observe(stack)
    calls = [await Call.open(stack.ws_url, voice="moshiko") for _ in range(SLOTS)]
    for call in calls:
        await wait_until(lambda call=call: call.audio_flowing(0, 10), "audio before the kill", 15)
    assert await observer.dialogue_slots() == (0, SLOTS)

    stack.send_signal("gateway", signal.SIGKILL)
    bound = LEASE_S + SESSION_CHECK_S + ALLOWANCE_S

    async def all_slots_free() -> bool:
        free, capacity = await observer.dialogue_slots()
        return free == capacity == SLOTS

    took = await seconds_until(all_slots_free, "every dialogue slot free again", bound)
    print(f"gateway SIGKILL: every slot free again after {took:.2f} s (lease {LEASE_S:g} s)")

    for call in calls:
        info = await observer.session(call.session_id)
        assert (info["state"], info["end_reason"]) == ("ended", "lease_expired"), info
    assert await observer.live_sessions_of("") == set(), "the key's live-session set is empty"
    transcripts = stack.workdir / "data" / "transcripts"

    async def ends_recorded() -> bool:
        return all((transcripts / c.session_id / "end.json").exists() for c in calls)

    await wait_until(ends_recorded, "end.json written for every session", 2)
    for call in calls:
        end = json.loads((transcripts / call.session_id / "end.json").read_text())
        assert end["reason"] == "lease_expired"
        assert (transcripts / call.session_id / "meta.json").exists()
    await asyncio.gather(*(call.finished(5) for call in calls))
    assert all(call.closed_at is not None for call in calls), "the dead gateway's sockets are closed"
