"""Voice activity detection with Silero VAD, run as ONNX (no torch): is there speech in this audio?

The `silero-vad` package ships its model files; we only read its ONNX file, located without importing
the package (its `__init__` imports torch, which the gateway and router images do not carry). Those
images install it with `pip install --no-deps silero-vad`; `model_path` points elsewhere if needed.

Silero works on 16 kHz audio in windows of 512 samples (32 ms), each fed with the last 64 samples of
the previous one, and carries a recurrent state. Two ways in:
- `SpeechDetector.probabilities(samples)`: a whole clip (an uploaded voice) at 24 kHz;
- `SpeechDetector.stream()` -> `VadStream.push(frame)`: one 80 ms frame at 24 kHz at a time (barge-in),
  the speech probability of the newest audio. With `quiet_dbfs`, a frame quieter than that scores 0
  without running the model: a user is silent for much of a conversation, and a loudness check costs
  microseconds where the model costs a fraction of a millisecond per frame. The model then sees the loud
  frames only (its recurrent state carries over a quiet gap as over a pause in speech).
"""

from __future__ import annotations

import importlib.util
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

from shared.audio import SAMPLE_RATE, FloatAudio, resample, rms_dbfs
from shared.errors import ModelLoadError

VAD_RATE = 16_000
WINDOW = 512  # samples at 16 kHz: 32 ms
CONTEXT = 64  # samples of the previous window Silero expects in front of each one
STATE_SHAPE = (2, 1, 128)
ONNX_FILE = "silero_vad.onnx"

Array = npt.NDArray[np.float32]


def silero_model_path() -> Path:
    """The ONNX file inside the installed silero-vad package, found without importing it."""
    spec = importlib.util.find_spec("silero_vad")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "data" / ONNX_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        "the silero-vad package (its ONNX model) is not installed: pip install --no-deps silero-vad"
    )


class SpeechDetector:
    """One ONNX session, shared by any number of streams (onnxruntime's `run` is thread-safe)."""

    def __init__(self, model_path: Path | None = None, *, quiet_dbfs: float | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # A 32 ms window is tiny: more threads only add contention with the services' own work.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = model_path or silero_model_path()
        try:
            self._session: Any = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"cannot load the VAD model {path}: {exc}") from exc
        self._rate = np.array(VAD_RATE, dtype=np.int64)
        self.quiet_dbfs = quiet_dbfs  # streams score quieter frames 0 without the model

    def _run(self, window: Array, context: Array, state: Array) -> tuple[float, Array, Array]:
        """One 512-sample window -> (speech probability, next context, next state)."""
        x = np.concatenate([context, window])[None, :]
        probability, state = self._session.run(None, {"input": x, "state": state, "sr": self._rate})
        return float(probability[0, 0]), x[0, -CONTEXT:], state

    def probabilities(self, samples: FloatAudio, sample_rate: int = SAMPLE_RATE) -> FloatAudio:
        """Speech probability of every 32 ms window of a whole clip."""
        audio = resample(samples, sample_rate, VAD_RATE)
        context: Array = np.zeros(CONTEXT, dtype=np.float32)
        state: Array = np.zeros(STATE_SHAPE, dtype=np.float32)
        out = np.zeros(len(audio) // WINDOW, dtype=np.float32)
        for i in range(len(out)):
            out[i], context, state = self._run(audio[i * WINDOW : (i + 1) * WINDOW], context, state)
        return out

    def stream(self) -> VadStream:
        return VadStream(self)


class VadStream:
    """Per-stream state: feed 80 ms frames at 24 kHz, get the speech probability of the newest audio."""

    def __init__(self, detector: SpeechDetector) -> None:
        self._detector = detector
        self.reset()

    def reset(self) -> None:
        self._resampler = soxr.ResampleStream(SAMPLE_RATE, VAD_RATE, 1, dtype="float32")
        self._pending: Array = np.zeros(0, dtype=np.float32)
        self._context: Array = np.zeros(CONTEXT, dtype=np.float32)
        self._state: Array = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.probability = 0.0

    def push(self, frame: FloatAudio) -> float:
        """The highest probability among the windows this frame completed (80 ms holds 2-3 of them);
        the previous value when it completed none (the resampler's first few milliseconds); 0 for a frame
        below the detector's `quiet_dbfs`."""
        quiet = self._detector.quiet_dbfs
        if quiet is not None and rms_dbfs(frame) < quiet:
            self.probability = 0.0
            return 0.0
        converted = self._resampler.resample_chunk(np.asarray(frame, dtype=np.float32))
        self._pending = np.concatenate([self._pending, converted])
        best: float | None = None
        while len(self._pending) >= WINDOW:
            window, self._pending = self._pending[:WINDOW], self._pending[WINDOW:]
            p, self._context, self._state = self._detector._run(window, self._context, self._state)
            best = p if best is None else max(best, p)
        if best is not None:
            self.probability = best
        return self.probability


_lock = threading.Lock()


@lru_cache(maxsize=4)
def _cached(model_path: Path | None, quiet_dbfs: float | None) -> SpeechDetector:
    return SpeechDetector(model_path, quiet_dbfs=quiet_dbfs)


def load_speech_detector(model_path: Path | None = None, quiet_dbfs: float | None = None) -> SpeechDetector:
    """A process-wide detector per model file and quiet gate (loading takes ~50 ms; sessions are
    thread-safe)."""
    with _lock:
        return _cached(model_path, quiet_dbfs)
