"""User speech detection: silero-vad per frame, the energy gate, the start/stop hysteresis, and which
detector the router starts with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from services.router.settings import RouterSettings
from services.router.speech import EnergyGate, SpeechEdges
from services.router.worker import speech_detector
from shared.audio import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    float_to_pcm16,
    pcm16_to_float,
    resample,
    silence_frame,
    to_mono,
)
from shared.errors import ModelLoadError
from shared.vad import SpeechDetector
from tests.support.audio import SPEECH_WAV

TONE = pcm16_to_float((np.sin(np.arange(FRAME_SAMPLES) / 3) * 12000).astype("<i2").tobytes())
HISS = pcm16_to_float((np.random.default_rng(0).normal(0, 30, FRAME_SAMPLES)).astype("<i2").tobytes())
SILENCE = pcm16_to_float(silence_frame())


def router_settings(**overrides: Any) -> RouterSettings:
    return RouterSettings(_env_file=None, **overrides)  # type: ignore[call-arg]


def test_the_energy_gate_scores_loud_frames_as_speech_and_quiet_ones_not() -> None:
    stream = EnergyGate().stream()
    assert stream.push(TONE) == 1.0
    assert stream.push(HISS) == 0.0
    assert stream.push(SILENCE) == 0.0


def test_speech_starts_after_enough_speech_frames_and_stops_after_enough_silence() -> None:
    edges = SpeechEdges(threshold=0.5, start_frames=2, stop_frames=3)
    scores = [0.9, 0.1, 0.9, 0.9, 0.2, 0.9, 0.1, 0.1, 0.1, 0.1]
    assert [edges.push(p) for p in scores] == [None, None, None, True, None, None, None, None, False, None]


def test_the_router_hears_user_speech_with_silero_vad_frame_by_frame() -> None:
    detector = speech_detector(router_settings())
    assert isinstance(detector, SpeechDetector), "the real VAD by default, not the energy gate"
    samples, rate = soundfile.read(SPEECH_WAV, dtype="float32", always_2d=True)
    speech = resample(to_mono(samples), rate, SAMPLE_RATE)[: 3 * SAMPLE_RATE]
    # As the router hears them: PCM16 frames off the input stream.
    pcm = [float_to_pcm16(speech[i : i + FRAME_SAMPLES]) for i in range(0, len(speech), FRAME_SAMPLES)]
    frames = [pcm16_to_float(p) for p in pcm]
    stream = detector.stream()
    heard = [stream.push(f) for f in frames if len(f) == FRAME_SAMPLES]
    assert max(heard) > 0.8, "espeak speech is speech"

    fresh = detector.stream()  # one state per session: another session's audio does not leak into it
    quiet = [fresh.push(frame) for frame in [SILENCE] * 10 + [TONE] * 10]
    assert max(quiet) < 0.5, "silence and a steady tone are not speech"


def test_the_energy_gate_is_used_only_when_the_setting_selects_it() -> None:
    gate = speech_detector(router_settings(router_vad="energy", router_energy_floor_dbfs=-50.0))
    assert isinstance(gate, EnergyGate) and gate.floor_dbfs == -50.0


def test_a_vad_model_that_cannot_load_stops_the_router_instead_of_falling_back(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load the VAD model"):
        speech_detector(router_settings(vad_model_path=tmp_path / "missing.onnx"))
