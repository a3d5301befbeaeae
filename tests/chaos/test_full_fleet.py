"""A full fleet refuses new sessions with a reason, and serves them again once a slot is free."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

import pytest

from shared.audio import float_to_pcm16
from tests.chaos.harness import Call, Observer
from tests.support.audio import speech_like
from tests.support.clients import RealtimeClient
from tests.support.stack import ChorusStack
from tests.support.waiting import wait_until

pytestmark = pytest.mark.chaos

MakeStack = Callable[..., ChorusStack]
Observe = Callable[[ChorusStack], Awaitable[Observer]]

PLACEMENT_WAIT_S = 1.0


async def append(client: RealtimeClient, seconds: float) -> None:
    pcm = float_to_pcm16(speech_like(seconds))
    await client.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


async def test_a_realtime_socket_refused_for_capacity_gets_a_session_with_its_next_audio(
    make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack(CHORUS_DIALOGUE_SLOTS="1", CHORUS_PLACEMENT_WAIT_S=str(PLACEMENT_WAIT_S))
    stack.start_services("router", "tts", "dialogue")
    observer = await observe(stack)
    busy = await Call.open(stack.ws_url, voice="moshiko")  # the only slot

    realtime = await RealtimeClient.open(stack.ws_url)
    await append(realtime, 0.5)
    refused = await realtime.wait_for("error", timeout_s=PLACEMENT_WAIT_S + 10)
    assert refused["error"]["code"] == "no_capacity", refused

    await busy.hang_up()

    async def slot_free() -> bool:
        free, capacity = await observer.dialogue_slots()
        return free == capacity

    await wait_until(slot_free, "the slot free again", 5)
    await append(realtime, 0.5)  # "the socket stays open, the next audio tries again"
    await realtime.wait_for("chorus.event", timeout_s=PLACEMENT_WAIT_S + 10, name="ready")
    assert [e["error"]["code"] for e in realtime.of_type("error")] == ["no_capacity"]
    await realtime.ws.close()
