"""User speech detection: the energy fallback detector and the start/stop hysteresis."""

from __future__ import annotations

import numpy as np

from services.router.speech import EnergyFallbackDetector, SpeechEdges
from shared.audio import FRAME_SAMPLES, silence_frame

TONE = (np.sin(np.arange(FRAME_SAMPLES) / 3) * 12000).astype("<i2").tobytes()
HISS = (np.random.default_rng(0).normal(0, 30, FRAME_SAMPLES)).astype("<i2").tobytes()


def test_the_energy_fallback_scores_loud_frames_as_speech_and_quiet_ones_not() -> None:
    detector = EnergyFallbackDetector()
    assert detector.speech_probability(TONE) == 1.0
    assert detector.speech_probability(HISS) == 0.0
    assert detector.speech_probability(silence_frame()) == 0.0


def test_speech_starts_after_enough_speech_frames_and_stops_after_enough_silence() -> None:
    edges = SpeechEdges(threshold=0.5, start_frames=2, stop_frames=3)
    scores = [0.9, 0.1, 0.9, 0.9, 0.2, 0.9, 0.1, 0.1, 0.1, 0.1]
    assert [edges.push(p) for p in scores] == [None, None, None, True, None, None, None, None, False, None]
