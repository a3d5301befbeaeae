"""User speech detection: silero-vad per frame, the energy fallback detector, the start/stop hysteresis."""

from __future__ import annotations

import numpy as np
import soundfile

from services.router.settings import RouterSettings
from services.router.speech import EnergyFallbackDetector, SileroDetector, SpeechEdges, detector_factory
from shared.audio import FRAME_SAMPLES, SAMPLE_RATE, float_to_pcm16, resample, silence_frame, to_mono
from tests.support.audio import SPEECH_WAV

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


def test_the_router_hears_user_speech_with_silero_vad_frame_by_frame() -> None:
    make = detector_factory(RouterSettings(_env_file=None))  # type: ignore[call-arg]
    detector = make()
    assert isinstance(detector, SileroDetector), "the real VAD, not the energy fallback"
    samples, rate = soundfile.read(SPEECH_WAV, dtype="float32", always_2d=True)
    speech = resample(to_mono(samples), rate, SAMPLE_RATE)[: 3 * SAMPLE_RATE]
    frames = [float_to_pcm16(speech[i : i + FRAME_SAMPLES]) for i in range(0, len(speech), FRAME_SAMPLES)]
    heard = [detector.speech_probability(f) for f in frames if len(f) == FRAME_SAMPLES * 2]
    assert max(heard) > 0.8, "espeak speech is speech"

    fresh = make()  # one state per session: another session's audio does not leak into it
    quiet = [fresh.speech_probability(frame) for frame in [silence_frame()] * 10 + [TONE] * 10]
    assert max(quiet) < 0.5, "silence and a steady tone are not speech"
