"""`CHORUS_TTS_CONFIG`: a published Pocket TTS config by name, or a local YAML file; voice states are
keyed by the model, so a state computed for one model is never used with another."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.tts.engine import Engine
from services.tts.pocket_config import resolve
from services.tts.voice_states import VoiceStates
from shared.errors import ModelLoadError
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfileStore
from tests.support.tts import SPEECH, add_profile, tts_settings


def test_a_published_config_is_chosen_by_name_and_an_unknown_name_lists_the_valid_ones() -> None:
    small, default = resolve(None, "english_2m_2026-10"), resolve(None, "english")
    assert small.published and (small.language, default.language) == ("english", "english")
    assert small.version().startswith("english_2m_2026-10-") and default.version().startswith("english-")
    assert small.version() != default.version()
    assert resolve(None, "french").language == "french"
    with pytest.raises(
        ModelLoadError, match="not a published Pocket TTS config: use one of .*english_7m_2026-10"
    ):
        resolve(None, "english_3m")
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve(None, "/nowhere/config.yaml")


async def test_a_local_config_file_loads_and_its_voice_states_are_its_own(
    tts_checkpoint: Path, tts_engine: Engine, tmp_path: Path
) -> None:
    config = resolve(tts_checkpoint, "unused").config  # its file references made absolute
    config["default_temperature"] = 0.5  # another model, as far as its states are concerned
    file = tmp_path / "models" / "warmer.yaml"
    file.parent.mkdir()
    file.write_text(yaml.safe_dump(config), encoding="utf-8")
    engine = await Engine.load(
        tts_settings(None, tmp_path, "redis://unused", "unused:", tts_config=str(file))
    )
    try:
        assert engine.version.startswith("warmer-") and engine.version != tts_engine.version
        store = VoiceProfileStore(LocalStorage(tmp_path / "data"))
        profile = await add_profile(store, SPEECH)
        await VoiceStates(tts_engine, store, capacity=4, prompt_max_s=15).get(profile.id)
        other = VoiceStates(engine, store, capacity=4, prompt_max_s=15)
        await other.get(profile.id)
        assert other.computed == 1, "the other model's cached state was not used"
        assert sorted(await store.states(profile.id)) == sorted([tts_engine.version, engine.version])
    finally:
        engine.close()
