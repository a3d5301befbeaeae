"""Audio the tests speak: recorded clips from tests/fixtures/audio, and a synthetic speech-like signal."""

from __future__ import annotations

import numpy as np

from tests.support.paths import FIXTURE_AUDIO

SPEECH_WAV = FIXTURE_AUDIO / "speech.wav"
SPEECH2_FLAC = FIXTURE_AUDIO / "speech2.flac"


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, modulated signal (a stand-in when no recorded speech fixture is needed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24_000)) / 24_000
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 24_000) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
