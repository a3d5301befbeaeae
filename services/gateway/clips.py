"""Reference clips for voice cloning: decode, check, normalise. CPU work: call it from a thread.

Decoding is libsndfile's (through `soundfile`): WAV, FLAC, OGG (Opus or Vorbis) and MP3, nothing
hand-written. A clip is refused with the measured value and the limit when it is too short, too long,
silent, clipped, or has too little speech (Silero VAD). An accepted clip is mixed to mono, resampled to
24 kHz, trimmed to its speech (with a margin) and normalised so its speech has the target RMS loudness.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soundfile

from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.audio import SAMPLE_RATE, FloatAudio, resample, rms_dbfs, to_mono
from shared.errors import ChorusError, PayloadTooLarge, Unprocessable, UnsupportedMedia
from shared.vad import VAD_RATE, WINDOW, SpeechDetector

# libsndfile's major formats we accept, and the name a user knows them by.
ACCEPTED_FORMATS = {"WAV": "WAV", "WAVEX": "WAV", "RF64": "WAV", "FLAC": "FLAC", "OGG": "OGG", "MP3": "MP3"}
ACCEPTED_TEXT = "WAV, FLAC, OGG (Opus or Vorbis) or MP3"
FULL_SCALE = 0.999  # a sample at or beyond this is at the converter's limit
PEAK_CEILING = 10 ** (-1 / 20)  # -1 dBFS: headroom left after normalising
SPEECH_MARGIN_S = 0.3  # kept around the first and last speech window
SILENCE_FLOOR_DBFS = -120.0  # digital silence is -inf dBFS; JSON has no -inf


@dataclass(frozen=True)
class ClipLimits:
    min_s: float
    max_s: float
    min_speech_s: float
    silence_dbfs: float
    max_clipped_ratio: float
    target_dbfs: float
    vad_threshold: float

    @classmethod
    def from_settings(cls, s: GatewaySettings) -> ClipLimits:
        return cls(
            min_s=s.voice_min_s,
            max_s=s.voice_max_s,
            min_speech_s=s.voice_min_speech_s,
            silence_dbfs=s.voice_silence_dbfs,
            max_clipped_ratio=s.voice_max_clipped_ratio,
            target_dbfs=s.voice_target_dbfs,
            vad_threshold=s.vad_threshold,
        )


@dataclass(frozen=True)
class PreparedClip:
    samples: FloatAudio  # mono, 24 kHz, normalised
    duration_s: float
    speech_s: float
    source_format: str
    source_rate: int


def rejected(error: ChorusError, reason: str) -> ChorusError:
    """Count a refused upload by reason; returns the error to raise."""
    metrics.UPLOAD_REJECTIONS.labels(reason=reason).inc()
    return error


def too_large(received: int, limit: int) -> ChorusError:
    return rejected(
        PayloadTooLarge(
            f"the upload is larger than the limit of {limit} bytes",
            reason="too_large",
            measured=received,
            limit=limit,
            unit="bytes",
        ),
        "too_large",
    )


def unusable(reason: str, detail: str, measured: float, limit: float, unit: str) -> ChorusError:
    return rejected(
        Unprocessable(detail, reason=reason, measured=round(measured, 4), limit=limit, unit=unit), reason
    )


def _unsupported(detail: str, reason: str, **extra: str) -> ChorusError:
    return rejected(UnsupportedMedia(detail, reason=reason, **extra), reason)


def _decode(data: bytes, max_s: float) -> tuple[FloatAudio, int, str]:
    """(samples [frames, channels] float32, sample rate, format name); never decodes more than max_s + 1 s."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        raise _unsupported(
            f"not an audio file this server can read; send {ACCEPTED_TEXT}", "not_audio"
        ) from exc
    if info.format not in ACCEPTED_FORMATS:
        raise _unsupported(
            f"{info.format_info} audio is not accepted; send {ACCEPTED_TEXT}",
            "unsupported_format",
            format=info.format,
        )
    if info.samplerate > 0 and info.frames / info.samplerate > max_s:
        raise _too_long(info.frames / info.samplerate, max_s)
    try:
        samples, rate = soundfile.read(
            io.BytesIO(data), dtype="float32", always_2d=True, frames=int((max_s + 1) * info.samplerate)
        )
    except (soundfile.SoundFileError, RuntimeError, ValueError) as exc:
        raise _unsupported("the audio could not be decoded (a damaged file?)", "undecodable") from exc
    return samples, int(rate), ACCEPTED_FORMATS[info.format]


def _too_long(seconds: float, limit: float) -> ChorusError:
    return unusable(
        "too_long", f"the clip is {seconds:.1f} s long; the maximum is {limit:g} s", seconds, limit, "s"
    )


def _check_length(seconds: float, limits: ClipLimits) -> None:
    if seconds > limits.max_s:
        raise _too_long(seconds, limits.max_s)
    if seconds < limits.min_s:
        raise unusable(
            "too_short",
            f"the clip is {seconds:.1f} s long; the minimum is {limits.min_s:g} s",
            seconds,
            limits.min_s,
            "s",
        )


def _check_clipping(samples: FloatAudio, limits: ClipLimits) -> None:
    ratio = float(np.count_nonzero(np.abs(samples) >= FULL_SCALE)) / max(1, samples.size)
    if ratio > limits.max_clipped_ratio:
        raise unusable(
            "clipped",
            f"{ratio:.2%} of the samples are at full scale (clipped); the limit is "
            f"{limits.max_clipped_ratio:.2%}: record at a lower level",
            ratio,
            limits.max_clipped_ratio,
            "ratio",
        )


def _check_loudness(mono: FloatAudio, limits: ClipLimits) -> None:
    level = max(rms_dbfs(mono), SILENCE_FLOOR_DBFS)
    if level < limits.silence_dbfs:
        raise unusable(
            "silent",
            f"the clip is silent ({level:.1f} dBFS RMS; at least {limits.silence_dbfs:g} dBFS is needed)",
            level,
            limits.silence_dbfs,
            "dBFS",
        )


def _speech_windows(mono: FloatAudio, detector: SpeechDetector, limits: ClipLimits) -> npt.NDArray[np.bool_]:
    """Boolean mask of speech per 32 ms VAD window; refuses a clip with too little speech."""
    speech = detector.probabilities(mono) >= limits.vad_threshold
    seconds = float(np.count_nonzero(speech)) * WINDOW / VAD_RATE
    if seconds < limits.min_speech_s:
        raise unusable(
            "no_speech",
            f"the clip holds {seconds:.1f} s of speech; at least {limits.min_speech_s:g} s is needed",
            seconds,
            limits.min_speech_s,
            "s",
        )
    return speech


def _trim_and_normalise(mono: FloatAudio, speech: npt.NDArray[np.bool_], target_dbfs: float) -> FloatAudio:
    """Keep the speech with a margin; scale it so its speech windows have the target RMS, peak <= -1 dBFS."""
    span = WINDOW * SAMPLE_RATE // VAD_RATE  # one VAD window in 24 kHz samples
    windows = np.flatnonzero(speech)
    margin = int(SPEECH_MARGIN_S * SAMPLE_RATE)
    start = max(0, int(windows[0]) * span - margin)
    end = min(len(mono), (int(windows[-1]) + 1) * span + margin)
    voiced = np.concatenate([mono[i * span : (i + 1) * span] for i in windows])
    gain = 10 ** ((target_dbfs - rms_dbfs(voiced)) / 20)
    clip = mono[start:end] * gain
    peak = float(np.max(np.abs(clip)))
    if peak > PEAK_CEILING:
        clip = clip * (PEAK_CEILING / peak)
    return clip.astype(np.float32)


def prepare_clip(data: bytes, limits: ClipLimits, detector: SpeechDetector) -> PreparedClip:
    """Decode and check an uploaded clip; raises UnsupportedMedia (415) or Unprocessable (422)."""
    raw, rate, source_format = _decode(data, limits.max_s)
    _check_length(len(raw) / rate, limits)
    _check_clipping(raw, limits)
    mono = resample(to_mono(raw), rate, SAMPLE_RATE)
    _check_loudness(mono, limits)
    speech = _speech_windows(mono, detector, limits)
    clip = _trim_and_normalise(mono, speech, limits.target_dbfs)
    return PreparedClip(
        samples=clip,
        duration_s=round(len(clip) / SAMPLE_RATE, 3),
        speech_s=round(float(np.count_nonzero(speech)) * WINDOW / VAD_RATE, 3),
        source_format=source_format,
        source_rate=rate,
    )
