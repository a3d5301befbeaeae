"""Voice states: computed once per profile and model version, cached on disk and (bounded) in memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from services.tts.engine import Engine
from services.tts.voice_states import VoiceStates, state_from_bytes, state_to_bytes
from shared.errors import NotFound
from shared.storage import LocalStorage
from shared.voice_profiles import CLIP_FILE, VoiceProfileStore
from tests.support.tts import SPEECH, SPEECH2, add_profile


def same_state(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m]) for m in a
    )


@pytest.fixture
def store(tmp_path: Path) -> VoiceProfileStore:
    return VoiceProfileStore(LocalStorage(tmp_path / "data"))


async def test_a_voice_state_is_computed_once_even_when_asked_concurrently(
    tts_engine: Engine, store: VoiceProfileStore
) -> None:
    profile = await add_profile(store, SPEECH)
    voices = VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15)
    states = await asyncio.gather(*(voices.get(profile.id) for _ in range(3)))
    assert voices.computed == 1
    assert states[0] is states[1] is states[2]
    assert await voices.get(profile.id) is states[0]
    assert voices.computed == 1


async def test_another_worker_or_a_restart_loads_the_state_from_disk(
    tts_engine: Engine, store: VoiceProfileStore
) -> None:
    profile = await add_profile(store, SPEECH)
    first = VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15)
    state = await first.get(profile.id)
    assert await store.states(profile.id) == [tts_engine.version]

    second = VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15)
    assert same_state(await second.get(profile.id), state)
    assert second.computed == 0


async def test_different_clips_give_different_voice_states(
    tts_engine: Engine, store: VoiceProfileStore
) -> None:
    a, b = await add_profile(store, SPEECH), await add_profile(store, SPEECH2)
    voices = VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15)
    assert not same_state(await voices.get(a.id), await voices.get(b.id))


async def test_memory_is_bounded_and_evicted_states_come_back_from_disk(
    tts_engine: Engine, store: VoiceProfileStore
) -> None:
    a, b = await add_profile(store, SPEECH), await add_profile(store, SPEECH2)
    voices = VoiceStates(tts_engine, store, capacity=1, prompt_max_s=15)
    await voices.get(a.id)
    await voices.get(b.id)
    assert a.id not in voices and b.id in voices
    await voices.get(a.id)
    assert voices.computed == 2, "the evicted state was reloaded, not recomputed"


async def test_a_deleted_profile_has_no_voice_state(tts_engine: Engine, store: VoiceProfileStore) -> None:
    profile = await add_profile(store, SPEECH)
    voices = VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15)
    await voices.get(profile.id)
    await store.delete(profile.id)
    assert voices.forget(profile.id)
    assert await store.states(profile.id) == []
    with pytest.raises(NotFound):
        await voices.get(profile.id)


async def test_states_round_trip_through_safetensors(tts_engine: Engine, store: VoiceProfileStore) -> None:
    profile = await add_profile(store, SPEECH)
    state = await VoiceStates(tts_engine, store, capacity=1, prompt_max_s=15).get(profile.id)
    assert same_state(state_from_bytes(state_to_bytes(state)), state)


@pytest.mark.parametrize("damage", [b"", b"\xff" * 64], ids=["empty", "garbage"])
async def test_a_damaged_cached_state_is_computed_again_from_the_clip(
    tts_engine: Engine, store: VoiceProfileStore, damage: bytes
) -> None:
    """A state file damaged on the volume broke its profile for good: every phrase failed to load it (a
    traceback each), and nothing ever computed it again. It is made again from the clip, and cached."""
    profile = await add_profile(store, SPEECH)
    state = await VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15).get(profile.id)
    await store.save_state(profile.id, tts_engine.version, damage)
    restarted = VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15)
    assert same_state(await restarted.get(profile.id), state)
    assert restarted.computed == 1
    cached = await store.load_state(profile.id, tts_engine.version)
    assert cached is not None and same_state(state_from_bytes(cached), state)


async def test_a_damaged_clip_makes_its_profile_unusable_with_a_reason(
    tts_engine: Engine, store: VoiceProfileStore
) -> None:
    """Not an internal error per phrase (and a bare 500 for its preview): the profile cannot be used,
    and the caller is told to upload it again."""
    profile = await add_profile(store, SPEECH)
    await store.storage.put(f"voices/{profile.id}/{CLIP_FILE}", b"RIFF\x00\x10\x00\x00WAVEfmt ")
    with pytest.raises(NotFound, match="its stored clip is damaged"):
        await VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15).get(profile.id)
