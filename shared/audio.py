"""The one home of Chorus's audio format: 24 kHz mono, 80 ms frames of 1920 samples, PCM16 LE on the wire."""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import soxr
import sphn

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920
FRAME_SEC = FRAME_SAMPLES / SAMPLE_RATE  # 0.08 s, Mimi's 12.5 Hz frame rate
FRAME_BYTES = FRAME_SAMPLES * 2  # PCM16

FloatAudio = npt.NDArray[np.float32]


def pcm16_to_float(pcm: bytes) -> FloatAudio:
    """Little-endian PCM16 bytes -> float32 in [-1, 1)."""
    if len(pcm) % 2:
        raise ValueError(f"PCM16 needs an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: npt.ArrayLike) -> bytes:
    """float audio in [-1, 1] -> little-endian PCM16 bytes (clipped, not wrapped)."""
    arr = np.asarray(samples, dtype=np.float32).reshape(-1)
    return (np.clip(arr, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()


def silence_frame() -> bytes:
    return bytes(FRAME_BYTES)


def resample(samples: FloatAudio, from_rate: int, to_rate: int = SAMPLE_RATE) -> FloatAudio:
    """High-quality resampling (soxr); mono float32 in, mono float32 out."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    return np.asarray(soxr.resample(samples, from_rate, to_rate), dtype=np.float32)


def to_mono(samples: npt.NDArray[np.floating]) -> FloatAudio:
    """[frames] or [frames, channels] -> [frames], averaging channels."""
    if samples.ndim == 1:
        return np.asarray(samples, dtype=np.float32)
    return np.asarray(samples.mean(axis=1), dtype=np.float32)


class FrameSplitter:
    """Accumulates arbitrary-length audio and hands out whole 80 ms frames; keeps the remainder."""

    def __init__(self, frame_samples: int = FRAME_SAMPLES) -> None:
        self.frame_samples = frame_samples
        self._pending: FloatAudio = np.zeros(0, dtype=np.float32)

    def push(self, samples: FloatAudio) -> Iterator[FloatAudio]:
        self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        while len(self._pending) >= self.frame_samples:
            frame, self._pending = (
                self._pending[: self.frame_samples],
                self._pending[self.frame_samples :],
            )
            yield frame

    def flush(self) -> FloatAudio | None:
        """The remainder padded with silence to one frame, or None when nothing is pending."""
        if not len(self._pending):
            return None
        frame = np.zeros(self.frame_samples, dtype=np.float32)
        frame[: len(self._pending)] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        return frame

    def clear(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)


class OpusEncoder:
    """PCM -> Ogg/Opus pages, exactly as Moshi's server produces them (sphn.OpusStreamWriter)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._writer = sphn.OpusStreamWriter(sample_rate)

    def encode(self, samples: FloatAudio) -> bytes:
        return bytes(self._writer.append_pcm(samples.astype(np.float32, copy=False)))


class OpusDecoder:
    """Ogg/Opus pages -> PCM (sphn.OpusStreamReader); returns what is decodable so far."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._reader = sphn.OpusStreamReader(sample_rate)

    def decode(self, data: bytes) -> FloatAudio:
        return np.asarray(self._reader.append_bytes(data), dtype=np.float32)


def rms_dbfs(samples: FloatAudio) -> float:
    """Loudness as RMS in dBFS (-inf for digital silence)."""
    if not len(samples):
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * float(np.log10(rms)) if rms > 0 else float("-inf")


def pcm16_to_wav(pcm: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono PCM16 LE bytes -> a WAV file's bytes."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return out.getvalue()


def wav_to_pcm16(data: bytes) -> tuple[bytes, int]:
    """A mono PCM16 WAV file's bytes (as `pcm16_to_wav` writes them) -> (PCM16 bytes, sample rate)."""
    with wave.open(io.BytesIO(data), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError("expected a mono 16-bit WAV")
        return wav.readframes(wav.getnframes()), wav.getframerate()
