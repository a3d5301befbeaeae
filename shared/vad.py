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
from collections import deque
from collections.abc import Sequence
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

    def score(self, frames: Sequence[tuple[VadStream, FloatAudio]]) -> list[float]:
        """Many streams' 80 ms frames at once (a stream may come more than once, in order): what `push`
        would answer for each, with one batched model call per round of windows for all the streams
        together instead of one call per window and stream (the model's per-call cost dominates a
        32 ms window)."""
        windows = [stream._cut(frame) for stream, frame in frames]
        queues: dict[VadStream, deque[tuple[int, Array]]] = {}
        for i, ((stream, _), cut) in enumerate(zip(frames, windows, strict=True)):
            for window in cut or ():
                queues.setdefault(stream, deque()).append((i, window))
        best: dict[int, float] = {}
        while queues:
            batch = [(stream, *queue.popleft()) for stream, queue in queues.items()]
            for i, p in zip(*self._run_batch(batch), strict=True):
                best[i] = max(best.get(i, 0.0), p)
            queues = {stream: queue for stream, queue in queues.items() if queue}
        scores = []
        for i, ((stream, _), cut) in enumerate(zip(frames, windows, strict=True)):
            if cut is None:  # quiet: no model
                stream.probability = 0.0
            elif i in best:
                stream.probability = best[i]
            scores.append(stream.probability)
        return scores

    def _run_batch(self, batch: list[tuple[VadStream, int, Array]]) -> tuple[list[int], list[float]]:
        """One window of each stream in `batch` through the model in one call; updates their context and
        recurrent state. Returns the frame index and probability of each window."""
        x = np.stack([np.concatenate([stream._context, window]) for stream, _, window in batch])
        state = np.concatenate([stream._state for stream, _, _ in batch], axis=1)
        probabilities, state = self._session.run(None, {"input": x, "state": state, "sr": self._rate})
        for b, (stream, _, _) in enumerate(batch):
            stream._context, stream._state = x[b, -CONTEXT:], state[:, b : b + 1]
        return [i for _, i, _ in batch], [float(p) for p in probabilities[:, 0]]


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
        return self._detector.score([(self, frame)])[0]

    def _cut(self, frame: FloatAudio) -> list[Array] | None:
        """The 512-sample windows at 16 kHz this frame completes (the rest waits for the next one); None
        for a frame below the detector's `quiet_dbfs`, which the model never sees."""
        quiet = self._detector.quiet_dbfs
        if quiet is not None and rms_dbfs(frame) < quiet:
            return None
        converted = self._resampler.resample_chunk(np.asarray(frame, dtype=np.float32))
        pending = np.concatenate([self._pending, converted])
        count = len(pending) // WINDOW
        self._pending = pending[count * WINDOW :]
        return [pending[k * WINDOW : (k + 1) * WINDOW] for k in range(count)]


_lock = threading.Lock()


@lru_cache(maxsize=4)
def _cached(model_path: Path | None, quiet_dbfs: float | None) -> SpeechDetector:
    return SpeechDetector(model_path, quiet_dbfs=quiet_dbfs)


def load_speech_detector(model_path: Path | None = None, quiet_dbfs: float | None = None) -> SpeechDetector:
    """A process-wide detector per model file and quiet gate (loading takes ~50 ms; sessions are
    thread-safe)."""
    with _lock:
        return _cached(model_path, quiet_dbfs)
