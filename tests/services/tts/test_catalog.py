"""Catalog voices (Pocket TTS's ready voice states) and a worker without the gated voice-cloning weights:
the catalog speaks either way; clips cannot become voices without the cloning weights, and say why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.tts.engine import Engine
from services.tts.settings import TtsSettings
from services.tts.voice_states import VoiceStates
from shared.bus import Bus
from shared.errors import CloningUnavailable, NotFound
from shared.messages import ClonedAudio, EventName, Failure
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfileStore
from tests.services.tts.test_worker import Dialogue, frames_of, phrases_done, start_session
from tests.support.tts import (
    SPEECH,
    add_profile,
    events,
    read_clip,
    running_worker,
    tts_entries,
    tts_settings,
)
from tests.support.waiting import wait_until


def catalog_loads() -> float:
    return REGISTRY.get_sample_value("chorus_tts_voice_states_total", {"source": "catalog"}) or 0.0


@pytest.fixture
def settings(tts_checkpoint: Path, tmp_path: Path, redis_url: str, key_prefix: str) -> TtsSettings:
    return tts_settings(tts_checkpoint, tmp_path / "data", redis_url, key_prefix, tts_pause_frames=3)


async def test_sessions_speak_in_a_catalog_voice_whose_state_is_loaded_once(
    bus: Bus, settings: TtsSettings, tts_engine: Engine
) -> None:
    loads = catalog_loads()
    async with running_worker(bus, settings, tts_engine) as worker:
        for sid in ("s-1", "s-2"):
            await start_session(bus, sid, "catalog:alba")
            await Dialogue(bus, sid).say(" Hello", " there", ".", "")
        outputs = [await wait_until(lambda s=sid: phrases_done(bus, s, 1), sid) for sid in ("s-1", "s-2")]
        fields = worker.describe()
        assert worker.s.voices.computed == 0, "no clip was encoded"
    assert catalog_loads() == loads + 1, "one load for both sessions"
    for entries in outputs:
        frames = frames_of(entries)
        assert [f.text for f in frames if f.text] == ["Hello there."]
        assert any(np.frombuffer(f.pcm, "<i2").any() for f in frames)
    listing = json.loads(str(fields["catalog"]))
    assert {"alba", "marius", "javert", "fantine"} <= set(listing["voices"]) and len(listing["voices"]) == 27
    assert (listing["language"], listing["source"], fields["voice_cloning"]) == ("english", "local", 1)


async def test_an_unknown_catalog_voice_is_refused_with_the_valid_names(
    bus: Bus, settings: TtsSettings, tts_engine: Engine
) -> None:
    voices = VoiceStates(
        tts_engine, VoiceProfileStore(LocalStorage(settings.data_dir)), capacity=4, prompt_max_s=15
    )
    with pytest.raises(NotFound, match="no catalog voice 'nobody': use one of alba, anna"):
        await voices.catalog("nobody")
    async with running_worker(bus, settings, tts_engine):
        await start_session(bus, "s-x", "catalog:nobody")
        entries = await wait_until(lambda: _with_error(bus, "s-x"), "the refusal")
    (error,) = events(entries, EventName.ERROR)
    assert error.data_as(Failure).code == "not_found" and "nobody" in error.detail


async def _with_error(bus: Bus, sid: str) -> list[object] | None:
    entries = await tts_entries(bus, sid)
    return entries if events(entries, EventName.ERROR) else None


async def test_without_the_cloning_weights_the_catalog_speaks_and_clips_are_refused_with_the_reason(
    bus: Bus, gated_checkpoint: Path, gated_engine: Engine, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    assert not gated_engine.can_clone
    with pytest.raises(CloningUnavailable, match="HF_TOKEN"):
        await gated_engine.voice_state(read_clip(SPEECH))
    settings = tts_settings(gated_checkpoint, tmp_path / "data", redis_url, key_prefix, tts_pause_frames=3)
    profile = await add_profile(VoiceProfileStore(LocalStorage(settings.data_dir)), SPEECH)
    async with running_worker(bus, settings, gated_engine) as worker:
        assert worker.describe()["voice_cloning"] == 0
        await start_session(bus, "s-cloned", profile.voice)
        await start_session(bus, "s-catalog", "catalog:marius")
        await Dialogue(bus, "s-catalog").say(" Fine", " thanks", ".", "")
        catalog = await wait_until(lambda: phrases_done(bus, "s-catalog", 1), "the catalog voice")
        cloned = await wait_until(lambda: _with_error(bus, "s-cloned"), "the refusal")
    assert any(isinstance(e, ClonedAudio) for e in catalog)
    (error,) = events(cloned, EventName.ERROR)
    assert error.data_as(Failure).code == "cloning_unavailable"
    assert "huggingface.co/kyutai/pocket-tts" in error.detail and "hf auth login" in error.detail
