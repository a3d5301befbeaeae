"""Workers that die (SIGKILL) or freeze (SIGSTOP) mid-session: a live worker of the same service takes
the session over once the dead one's presence expired, and the client keeps hearing audio."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from shared.messages import ClonedAudio, DialogueFrame, OutputAudio, SessionEvent
from tests.chaos.conftest import SLOTS
from tests.chaos.harness import Call, Observer, instance_of, start_services, strictly_increasing, wait_until
from tests.e2e.conftest import SPEECH_WAV
from tests.e2e.helpers import upload_voice
from tests.e2e.stack import ChorusStack

pytestmark = pytest.mark.chaos

FAILOVER_TARGET_S = 2.0  # the target on default settings
# Generous for a shared 2-core machine, yet well under anything but presence-driven failover could do
# (the old claim-idle path alone waited 5 s before it even started priming).
FAILOVER_BOUND_S = 5.0

MakeStack = Callable[..., ChorusStack]
Observe = Callable[[ChorusStack], Awaitable[Observer]]


def other(stack: ChorusStack, service: str, than: str) -> str:
    """The instance of `service` that is not `than`."""
    (survivor,) = [n for n in stack.processes if n.split("-")[0] == service and n != than]
    return survivor


async def kill_owner(stack: ChorusStack, observer: Observer, call: Call, field: str) -> tuple[str, float]:
    """SIGKILL the worker the session hash names in `field`; returns its instance and when."""
    victim = instance_of(stack, (await observer.session(call.session_id))[field])
    stack.send_signal(victim, signal.SIGKILL)
    return victim, time.monotonic()


async def audio_again(call: Call, since: float, seconds: float = 2.0, timeout_s: float = 20) -> float:
    """Wait until the client heard `seconds` of audio after `since`; the longest gap since then."""
    frames = round(seconds / 0.08)
    await wait_until(lambda: call.audio_flowing(since, frames), timeout_s, "audio after the fault")
    return call.longest_audio_gap(since)


def source_runs(sources: list[str]) -> list[str]:
    """["cloned", "cloned", "native", "cloned"] -> ["cloned", "native", "cloned"]."""
    return [s for i, s in enumerate(sources) if i == 0 or s != sources[i - 1]]


def event_names(entries: list[object]) -> list[str]:
    return [e.name for e in entries if isinstance(e, SessionEvent)]


@pytest.mark.chaos_smoke
async def test_a_dialogue_worker_killed_mid_session_is_replaced_within_seconds(
    make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack()
    start_services(stack, "router", "tts", "dialogue", "dialogue-2")
    observer = await observe(stack)
    call = await Call.open(stack.ws_url, voice="moshiko")
    await wait_until(lambda: call.audio_flowing(0, 15), 15, "audio before the kill")

    victim, killed_at = await kill_owner(stack, observer, call, "dialogue_worker")
    gap = await audio_again(call, killed_at)
    print(f"dialogue worker SIGKILL: the client heard nothing for {gap:.2f} s (target {FAILOVER_TARGET_S} s)")

    survivor = stack.worker_id(other(stack, "dialogue", victim))
    info = await observer.session(call.session_id)
    assert info["dialogue_worker"] == survivor and info["dialogue_owner"].endswith(f"/{survivor}")
    assert gap < FAILOVER_BOUND_S, f"failover took {gap:.2f} s"
    assert event_names(await observer.output(call.session_id)).count("resumed") == 1
    assert not call.errors, call.errors
    await call.hang_up()


async def test_a_router_killed_mid_session_is_replaced_and_audio_flows_again(
    make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack()
    start_services(stack, "router", "router-2", "tts", "dialogue")
    observer = await observe(stack)
    call = await Call.open(stack.ws_url, voice="moshiko")
    await wait_until(lambda: call.audio_flowing(0, 15), 15, "audio before the kill")

    victim, killed_at = await kill_owner(stack, observer, call, "router_worker")
    gap = await audio_again(call, killed_at)
    print(f"router SIGKILL: the client heard nothing for {gap:.2f} s")

    info = await observer.session(call.session_id)
    assert info["router_worker"] == stack.worker_id(other(stack, "router", victim))
    assert gap < FAILOVER_BOUND_S, f"failover took {gap:.2f} s"
    out = await observer.output(call.session_id)
    assert strictly_increasing([e.seq for e in out]), "the new router continues :out's numbering"
    assert not call.errors, call.errors
    await call.hang_up()


async def test_a_tts_worker_killed_in_a_cloned_session_falls_back_to_native_then_clones_again(
    make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack()
    start_services(stack, "router", "tts", "tts-2", "dialogue")
    observer = await observe(stack)
    voice_id = await upload_voice(stack.url, str(SPEECH_WAV))
    call = await Call.open(stack.ws_url, voice=f"profile:{voice_id}", voice_mode="cloned")

    async def speaking_cloned() -> bool:
        tts = await observer.tts(call.session_id)
        return any(isinstance(e, ClonedAudio) and np.frombuffer(e.pcm, "<i2").any() for e in tts)

    await wait_until(speaking_cloned, 30, "cloned speech before the kill")
    heard_before = len(await observer.output(call.session_id))
    victim, killed_at = await kill_owner(stack, observer, call, "tts_worker")
    survivor = stack.worker_id(other(stack, "tts", victim))

    async def cloned_again() -> list[str]:
        out = (await observer.output(call.session_id))[heard_before:]
        runs = source_runs([e.source for e in out if isinstance(e, OutputAudio)])
        return runs if runs[-2:] == ["native", "cloned"] else []

    runs, took = await wait_until(cloned_again, 30, "native fallback, then cloned audio again")
    assert runs == ["cloned", "native", "cloned"], "one fallback, one recovery"
    gap = call.longest_audio_gap(killed_at)
    print(f"tts SIGKILL: cloned again after {took:.2f} s; longest silence at the client {gap:.2f} s")

    out = (await observer.output(call.session_id))[heard_before:]
    switches = [
        e.data.get("reason") for e in out if isinstance(e, SessionEvent) and e.name == "voice_changed"
    ]
    assert switches[:1] == ["tts_down"] and "tts_recovered" in switches, switches
    assert (await observer.session(call.session_id))["tts_worker"] == survivor
    assert "resumed" in event_names(await observer.tts(call.session_id))
    assert gap < FAILOVER_BOUND_S, "native audio fills in while the TTS is down"
    assert not call.errors, call.errors
    await call.hang_up()


async def test_a_paused_dialogue_worker_loses_its_session_and_cannot_publish_for_it_after(
    make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack()
    start_services(stack, "router", "tts", "dialogue", "dialogue-2")
    observer = await observe(stack)
    call = await Call.open(stack.ws_url, voice="moshiko")
    await wait_until(lambda: call.audio_flowing(0, 15), 15, "audio before the pause")

    paused = instance_of(stack, (await observer.session(call.session_id))["dialogue_worker"])
    paused_id, survivor = stack.worker_id(paused), stack.worker_id(other(stack, "dialogue", paused))
    stack.send_signal(paused, signal.SIGSTOP)
    paused_at = time.monotonic()
    gap = await audio_again(call, paused_at)
    print(f"dialogue worker SIGSTOP: the client heard nothing for {gap:.2f} s")
    assert (await observer.session(call.session_id))["dialogue_worker"] == survivor

    await asyncio.sleep(max(0.0, paused_at + 10 - time.monotonic()))
    stack.send_signal(paused, signal.SIGCONT)
    continued_at = time.monotonic()

    async def slots_free_again() -> bool:
        fields = await observer.worker_fields("dialogue", paused_id)
        return fields.get("free_slots") == str(SLOTS)

    _, took = await wait_until(slots_free_again, 10, "the paused worker frees its slot")
    print(f"the continued worker showed its slot free after {took:.2f} s")
    await wait_until(lambda: call.audio_flowing(continued_at, 25), 10, "audio after SIGCONT")

    dialogue = await observer.dialogue(call.session_id)
    seqs = [e.seq for e in dialogue]
    assert strictly_increasing(seqs), f"a duplicate or stale entry on :dlg: {seqs}"
    assert event_names(dialogue).count("resumed") == 1
    resumed = next(i for i, e in enumerate(dialogue) if isinstance(e, SessionEvent) and e.name == "resumed")
    assert dialogue[resumed].data["worker"] == survivor
    assert any(isinstance(e, DialogueFrame) for e in dialogue[resumed:])
    out = await observer.output(call.session_id)
    assert strictly_increasing([e.seq for e in out]), "the client got no duplicate frame"
    assert sum(isinstance(e, OutputAudio) for e in out) > 0
    info = await observer.session(call.session_id)
    assert info["dialogue_worker"] == survivor and info["dialogue_owner"].endswith(f"/{survivor}")
    assert stack.processes[paused].poll() is None, "the paused worker lives on"
    assert not call.errors, call.errors
    await call.hang_up()
