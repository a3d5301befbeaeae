"""User speech detection on a session's input frames, for barge-in and speech_started/stopped events.

Two small pieces: a `SpeechDetector` opens one `SpeechStream` per session, which scores each 80 ms frame
(probability of speech; stateful, as silero-vad's recurrent state is), and `SpeechEdges` turns those
scores into started/stopped edges with hysteresis, so a click does not start speech and a breath does not
end it.

The router is given its detector (`worker.py` builds it from CHORUS_ROUTER_VAD): silero-vad
(`shared.vad.SpeechDetector`, onnxruntime; frames below CHORUS_ROUTER_VAD_GATE_DBFS score 0 without the
model) unless the setting selects `EnergyGate`, a loudness gate fine for synthetic audio and poor with
noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from shared.audio import FloatAudio, rms_dbfs


class SpeechStream(Protocol):
    def push(self, frame: FloatAudio) -> float:
        """Probability in [0, 1] that this 80 ms frame (24 kHz) is user speech."""
        ...


S = TypeVar("S", bound=SpeechStream)


class SpeechDetector(Protocol[S]):
    def stream(self) -> S:
        """A fresh stream for one session (one session's audio never leaks into another's state)."""
        ...

    def score(self, frames: Sequence[tuple[S, FloatAudio]]) -> list[float]:
        """Many sessions' frames at once (a stream may come more than once, in order): each one's
        probability, as its stream's `push` would give it (a model scores them in batches)."""
        ...


class EnergyGate:
    """Maps a frame's RMS level linearly from `floor_dbfs` (0) to `ceiling_dbfs` (1). Stateless: it is its
    own stream."""

    def __init__(self, floor_dbfs: float = -45.0, ceiling_dbfs: float = -25.0) -> None:
        if ceiling_dbfs <= floor_dbfs:
            raise ValueError("the energy ceiling must be above its floor")
        self.floor_dbfs = floor_dbfs
        self.ceiling_dbfs = ceiling_dbfs

    def stream(self) -> EnergyGate:
        return self

    def push(self, frame: FloatAudio) -> float:
        ratio = (rms_dbfs(frame) - self.floor_dbfs) / (self.ceiling_dbfs - self.floor_dbfs)
        return min(1.0, max(0.0, ratio))

    def score(self, frames: Sequence[tuple[EnergyGate, FloatAudio]]) -> list[float]:
        return [stream.push(frame) for stream, frame in frames]


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
