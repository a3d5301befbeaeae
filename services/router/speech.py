"""User speech detection on a session's input frames, for barge-in and speech_started/stopped events.

Two small pieces: a `SpeechDetector` scores one 80 ms frame (probability of speech; stateful per session,
as silero-vad's recurrent state is), and `SpeechEdges` turns those scores into started/stopped edges with
hysteresis, so a click does not start speech and a breath does not end it.

The real detector is silero-vad (`shared.vad`, onnxruntime). Where it cannot be imported the router falls
back to `EnergyFallbackDetector`, a loudness gate: fine for tests with synthetic audio, poor with noise.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from types import ModuleType
from typing import Protocol

import numpy as np

from services.router.settings import RouterSettings
from shared.audio import pcm16_to_float

log = logging.getLogger(__name__)


class SpeechDetector(Protocol):
    def speech_probability(self, pcm: bytes) -> float:
        """Probability in [0, 1] that this 80 ms PCM16 frame is user speech."""
        ...


class EnergyFallbackDetector:
    """Fallback only: maps the frame's RMS level linearly from `floor_dbfs` (0) to `ceiling_dbfs` (1)."""

    def __init__(self, floor_dbfs: float = -45.0, ceiling_dbfs: float = -25.0) -> None:
        if ceiling_dbfs <= floor_dbfs:
            raise ValueError("the energy ceiling must be above its floor")
        self.floor_dbfs = floor_dbfs
        self.ceiling_dbfs = ceiling_dbfs

    def speech_probability(self, pcm: bytes) -> float:
        samples = pcm16_to_float(pcm)
        rms = float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0
        level = 20 * math.log10(max(rms, 1e-9))
        ratio = (level - self.floor_dbfs) / (self.ceiling_dbfs - self.floor_dbfs)
        return min(1.0, max(0.0, ratio))


class SileroDetector:
    """Adapter over `shared.vad` (silero-vad on onnxruntime): one stateful stream per session."""

    def __init__(self, vad: ModuleType) -> None:
        self._stream = vad.load_speech_detector().stream()

    def speech_probability(self, pcm: bytes) -> float:
        return float(self._stream.push(pcm16_to_float(pcm)))


class SpeechEdges:
    """Hysteresis over per-frame probabilities: `start_frames` speech frames in a row start speech,
    `stop_frames` non-speech frames in a row stop it."""

    def __init__(self, threshold: float = 0.5, start_frames: int = 2, stop_frames: int = 6) -> None:
        self.threshold = threshold
        self.start_frames = start_frames
        self.stop_frames = stop_frames
        self.speaking = False
        self._run = 0  # consecutive frames disagreeing with `speaking`

    def push(self, probability: float) -> bool | None:
        """True when speech starts with this frame, False when it stops, None otherwise."""
        if (probability >= self.threshold) == self.speaking:
            self._run = 0
            return None
        self._run += 1
        if self._run < (self.stop_frames if self.speaking else self.start_frames):
            return None
        self.speaking = not self.speaking
        self._run = 0
        return self.speaking


def _import_vad() -> ModuleType | None:
    try:
        return importlib.import_module("shared.vad")
    except ImportError:
        return None


def detector_factory(settings: RouterSettings) -> Callable[[], SpeechDetector]:
    """What makes one session's detector: silero-vad when available, else the energy fallback."""
    vad = _import_vad()
    if vad is not None:
        try:
            vad.load_speech_detector()  # loads the ONNX model once; fails here if it is not installed
        except Exception:
            log.exception("silero-vad could not be loaded")
        else:
            return lambda: SileroDetector(vad)
    log.warning("shared.vad (silero-vad) is not available: detecting user speech by energy (fallback)")
    floor, ceiling = settings.router_energy_floor_dbfs, settings.router_energy_ceiling_dbfs
    return lambda: EnergyFallbackDetector(floor, ceiling)
