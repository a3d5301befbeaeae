"""Voice names, voice modes and ids: one set of rules (`shared.messages`), the same answer whether a model
field (pydantic, Rust regex) or Python code (`parse_voice`, `valid_id`) checks the value."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from shared.messages import (
    ProfileId,
    VoiceMode,
    VoiceName,
    catalog_name_of,
    catalog_voice,
    cloned_profile,
    cloned_voice,
    is_cloned_voice,
    native_voice_for,
    parse_voice,
    parse_voice_mode,
    profile_id_of,
    spoken_by_tts,
    valid_id,
)

ACCEPTED_VOICES = [
    "moshiko",
    "moshika",
    "profile:voice_1",
    "profile:A-b_9",
    "profile:" + "x" * 64,
    "catalog:alba",
    "catalog:bill_boerst",
    "catalog:" + "x" * 32,
]
REFUSED_VOICES = [
    "moshiko\n",
    "moshika\n",
    "profile:voice_1\n",
    "moshiko\r",
    " moshiko",
    "Moshiko",
    "profile:",
    "profile:../../etc",
    "profile:a/b",
    "profile:" + "x" * 65,
    "alloy",
    "",
    "catalog:",
    "catalog:Alba",
    "catalog:alba\n",
    "catalog:../alba",
    "catalog:" + "x" * 33,
]


class _Voiced(BaseModel):
    voice: VoiceName
    profile_id: ProfileId = "p"


@pytest.mark.parametrize("voice", ACCEPTED_VOICES)
def test_a_voice_name_is_accepted_alike_by_models_and_by_code(voice: str) -> None:
    assert parse_voice(voice) == voice
    assert _Voiced(voice=voice).voice == voice


@pytest.mark.parametrize("voice", REFUSED_VOICES)
def test_a_voice_name_is_refused_alike_by_models_and_by_code(voice: str) -> None:
    with pytest.raises(ValueError, match="unknown voice"):
        parse_voice(voice)
    with pytest.raises(ValidationError):
        _Voiced(voice=voice)


def test_a_refused_voice_says_what_is_accepted() -> None:
    with pytest.raises(ValueError) as refused:
        parse_voice("alloy")
    assert (
        str(refused.value)
        == "unknown voice 'alloy': use moshiko or moshika or profile:<id> or catalog:<name>"
    )


@pytest.mark.parametrize("profile_id", ["a", "voice_1", "A-b_9", "x" * 64])
def test_profile_ids_of_our_form_are_accepted(profile_id: str) -> None:
    assert valid_id(profile_id)
    assert _Voiced(voice="moshiko", profile_id=profile_id).profile_id == profile_id


@pytest.mark.parametrize("profile_id", ["", "voice_1\n", "x:transcript", "a/b", "..", "x" * 65])
def test_profile_ids_of_another_form_are_refused(profile_id: str) -> None:
    assert not valid_id(profile_id)
    with pytest.raises(ValidationError):
        _Voiced(voice="moshiko", profile_id=profile_id)


def test_a_cloned_voice_names_its_profile_and_a_native_one_none() -> None:
    assert cloned_voice("voice_1") == "profile:voice_1"
    assert is_cloned_voice("profile:voice_1") and profile_id_of("profile:voice_1") == "voice_1"
    for native in ("moshiko", "moshika"):
        assert not is_cloned_voice(native) and profile_id_of(native) is None


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "auto"), ("", "auto"), ("auto", "auto"), ("native", "native"), ("cloned", "cloned")],
)
def test_voice_modes_parse_with_auto_as_the_default(value: str | None, mode: str) -> None:
    assert parse_voice_mode(value) == mode


@pytest.mark.parametrize("value", ["Auto", "auto\n", "clone", "both"])
def test_unknown_voice_modes_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="voice_mode must be native, cloned or auto"):
        parse_voice_mode(value)


def test_a_session_without_a_voice_speaks_with_its_models_own() -> None:
    assert native_voice_for("moshika") == "moshika"
    assert native_voice_for("moshiko") == "moshiko"
    assert native_voice_for(None) == "moshiko"
    assert native_voice_for("gpt-realtime") == "moshiko"


@pytest.mark.parametrize(
    ("voice", "mode", "profile"),
    [
        ("profile:v1", "cloned", "v1"),
        ("profile:v1", "auto", "v1"),
        ("profile:v1", "native", None),
        ("moshiko", "cloned", None),
        ("moshika", "auto", None),
    ],
)
def test_a_session_clones_its_voices_profile_unless_its_mode_is_native(
    voice: str, mode: VoiceMode, profile: str | None
) -> None:
    assert cloned_profile(voice, mode) == profile


@pytest.mark.parametrize(
    ("voice", "mode", "spoken"),
    [
        ("catalog:alba", "auto", "catalog:alba"),
        ("catalog:alba", "cloned", "catalog:alba"),
        ("catalog:alba", "native", None),
        ("profile:v1", "auto", "profile:v1"),
        ("profile:v1", "native", None),
        ("moshiko", "cloned", None),
    ],
)
def test_the_tts_speaks_a_profile_or_catalog_voice_unless_the_mode_is_native(
    voice: str, mode: VoiceMode, spoken: str | None
) -> None:
    assert spoken_by_tts(voice, mode) == spoken
    assert catalog_name_of(voice) == (
        voice.removeprefix("catalog:") if voice.startswith("catalog:") else None
    )
    if catalog_name_of(voice) is not None:
        assert profile_id_of(voice) is None and catalog_voice("alba") == "catalog:alba"
