"""Silero VAD through onnxruntime: speech is told from silence, noise and tones, whole or frame by frame."""

from __future__ import annotations

import numpy as np
import pytest

from shared.audio import FRAME_SAMPLES, SAMPLE_RATE
from shared.vad import VAD_RATE, WINDOW, SpeechDetector, load_speech_detector, silero_model_path
from tests.support.tts import SPEECH, read_clip


@pytest.fixture(scope="module")
def detector() -> SpeechDetector:
    return load_speech_detector()


def speech_seconds(detector: SpeechDetector, samples: np.ndarray) -> float:
    """How long the 32 ms windows the detector calls speech (probability >= 0.5) last."""
    return int(np.count_nonzero(detector.probabilities(samples) >= 0.5)) * WINDOW / VAD_RATE


def test_the_model_comes_from_the_installed_package_without_importing_it() -> None:
    import sys

    path = silero_model_path()
    assert path.name == "silero_vad.onnx" and path.is_file()
    assert "silero_vad" not in sys.modules, "importing it would import torch"


def test_recorded_speech_is_mostly_speech(detector: SpeechDetector) -> None:
    clip = read_clip(SPEECH)
    assert speech_seconds(detector, clip) > 0.6 * len(clip) / SAMPLE_RATE


@pytest.mark.parametrize("kind", ["silence", "noise", "tone"])
def test_non_speech_has_no_speech(detector: SpeechDetector, kind: str) -> None:
    t = np.arange(SAMPLE_RATE * 4) / SAMPLE_RATE
    signal = {
        "silence": np.zeros_like(t),
        "noise": 0.1 * np.random.default_rng(0).standard_normal(len(t)),
        "tone": 0.3 * np.sin(2 * np.pi * 220 * t),
    }[kind].astype(np.float32)
    assert speech_seconds(detector, signal) < 0.2


def test_the_stream_api_takes_80ms_frames_and_agrees_with_the_whole_clip(detector: SpeechDetector) -> None:
    clip = read_clip(SPEECH)
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([silence, clip, silence])
    stream = detector.stream()
    per_frame = [
        stream.push(audio[i : i + FRAME_SAMPLES]) for i in range(0, len(audio) - FRAME_SAMPLES, FRAME_SAMPLES)
    ]
    lead = len(silence) // FRAME_SAMPLES
    assert max(per_frame[: lead - 1]) < 0.5, "the leading second of silence"
    assert np.mean(np.array(per_frame[lead:-lead]) > 0.5) > 0.6, "the speech"
    stream.reset()
    assert stream.push(silence[:FRAME_SAMPLES]) < 0.5


def test_with_a_quiet_gate_quiet_frames_score_zero_without_the_model_and_speech_is_still_heard() -> None:
    gated = load_speech_detector(quiet_dbfs=-55.0)
    clip = read_clip(SPEECH)
    room = (0.0005 * np.random.default_rng(0).standard_normal(SAMPLE_RATE)).astype(np.float32)  # -66 dBFS
    stream = gated.stream()
    quiet = [
        stream.push(room[i : i + FRAME_SAMPLES]) for i in range(0, len(room) - FRAME_SAMPLES, FRAME_SAMPLES)
    ]
    assert quiet == [0.0] * len(quiet)
    assert not stream._state.any() and not len(stream._pending), "the model never ran on room noise"
    heard = [
        stream.push(clip[i : i + FRAME_SAMPLES]) for i in range(0, len(clip) - FRAME_SAMPLES, FRAME_SAMPLES)
    ]
    assert np.mean(np.array(heard) > 0.5) > 0.6, "the speech, as without the gate"


def test_scoring_many_streams_together_gives_what_each_would_alone(detector: SpeechDetector) -> None:
    clip = read_clip(SPEECH)
    frames = [clip[i : i + FRAME_SAMPLES] for i in range(0, len(clip) - FRAME_SAMPLES, FRAME_SAMPLES)]
    talks = [frames, frames[7:], [f * 0.5 for f in frames[3:]]]  # three sessions, out of step
    alone = []
    for talk in talks:
        stream = detector.stream()
        alone.append([stream.push(f) for f in talk])
    together = [detector.stream() for _ in talks]
    scored: list[list[float]] = [[] for _ in talks]
    for k in range(0, len(frames), 2):  # two frames per session per call, as a router round may read
        batch = [(i, f) for i, talk in enumerate(talks) for f in talk[k : k + 2]]
        for (i, _), p in zip(batch, detector.score([(together[i], f) for i, f in batch]), strict=True):
            scored[i].append(p)
    for one, other in zip(alone, scored, strict=True):
        assert np.allclose(one, other, atol=1e-5)
