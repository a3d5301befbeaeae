"""Reference clips for voice cloning: decode, check, normalise. CPU work: call it from a thread.

Decoding is libsndfile's (through `soundfile`): WAV, FLAC, OGG (Opus or Vorbis) and MP3, nothing
hand-written. A clip is refused with the measured value and the limit when it is too short, too long,
silent, clipped, or has too little speech (Silero VAD). An accepted clip is mixed to mono, resampled to
24 kHz, trimmed to its speech (with a margin) and normalised so its speech has the target RMS loudness.

A few hundred kilobytes of FLAC can claim 8 channels at 655,350 Hz for 30 s: 629 MB once decoded to
float32. So the header is checked before any sample is decoded (at most 2 channels, 48 kHz and
`max_s` seconds: at most 2.9 M samples for 30 s), and decoding runs in blocks of `BLOCK_FRAMES`, each
mixed to mono and resampled to 24 kHz before the next is read. What the gateway holds is the upload, one
block and the 24 kHz mono result (2.9 MB for 30 s), whatever the file's header says.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.audio import SAMPLE_RATE, FloatAudio, rms_dbfs, to_mono
from shared.errors import ChorusError, PayloadTooLarge, Unprocessable, UnsupportedMedia
from shared.vad import VAD_RATE, WINDOW, SpeechDetector

# libsndfile's major formats we accept, and the name a user knows them by.
ACCEPTED_FORMATS = {"WAV": "WAV", "WAVEX": "WAV", "RF64": "WAV", "FLAC": "FLAC", "OGG": "OGG", "MP3": "MP3"}
ACCEPTED_TEXT = "WAV, FLAC, OGG (Opus or Vorbis) or MP3"
FULL_SCALE = 0.999  # a sample at or beyond this is at the converter's limit
PEAK_CEILING = 10 ** (-1 / 20)  # -1 dBFS: headroom left after normalising
SPEECH_MARGIN_S = 0.3  # kept around the first and last speech window
SILENCE_FLOOR_DBFS = -120.0  # digital silence is -inf dBFS; JSON has no -inf
MAX_CHANNELS = 2  # mono or stereo: what a microphone recording is
MAX_SAMPLE_RATE = 48_000  # the highest common recording rate; the clip is stored at 24 kHz anyway
BLOCK_FRAMES = 32_768  # decoded per step: 256 KB of float32 stereo


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


@dataclass(frozen=True)
class _Header:
    format: str  # the name a user knows it by (WAV, FLAC, ...)
    channels: int
    rate: int


def _read_header(data: bytes, max_s: float) -> _Header:
    """The file's header, refused before any sample is decoded: format, channels, sample rate, length."""
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
    if info.channels > MAX_CHANNELS:
        raise unusable(
            "too_many_channels",
            f"the clip has {info.channels} channels; send mono or stereo (at most {MAX_CHANNELS})",
            info.channels,
            MAX_CHANNELS,
            "channels",
        )
    if info.samplerate <= 0:
        raise _unsupported("the audio header names no sample rate (a damaged file?)", "undecodable")
    if info.samplerate > MAX_SAMPLE_RATE:
        raise unusable(
            "sample_rate_too_high",
            f"the clip is sampled at {info.samplerate} Hz; the maximum is {MAX_SAMPLE_RATE} Hz",
            info.samplerate,
            MAX_SAMPLE_RATE,
            "Hz",
        )
    if info.frames / info.samplerate > max_s:
        raise _too_long(info.frames / info.samplerate, max_s)
    return _Header(ACCEPTED_FORMATS[info.format], info.channels, info.samplerate)


@dataclass(frozen=True)
class _Decoded:
    mono: FloatAudio  # 24 kHz
    seconds: float  # as decoded, at the source rate
    clipped_ratio: float  # share of all samples (every channel) at full scale


def _decode(data: bytes, header: _Header, max_s: float) -> _Decoded:
    """Decode block by block, each mixed to mono and resampled before the next: memory stays O(block).

    libsndfile never reads past the length its header gave, which `_read_header` bounded; counting what
    is decoded keeps that bound even for a decoder that does.
    """
    rate = header.rate
    max_frames = int(max_s * rate)
    resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32") if rate != SAMPLE_RATE else None
    pieces: list[FloatAudio] = []
    frames = clipped = 0
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as source:
            while len(block := source.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):
                frames += len(block)
                if frames > max_frames:
                    raise _too_long(frames / rate, max_s)
                if not np.isfinite(block).all():  # float WAVs can hold them; every measure below would lie
                    raise _unsupported(
                        "the audio holds samples that are not numbers (NaN or infinite)", "undecodable"
                    )
                clipped += int(np.count_nonzero(np.abs(block) >= FULL_SCALE))
                mono = to_mono(block)
                pieces.append(resampler.resample_chunk(mono) if resampler else mono)
    except (soundfile.SoundFileError, RuntimeError, ValueError) as exc:
        raise _unsupported("the audio could not be decoded (a damaged file?)", "undecodable") from exc
    if resampler is not None:
        pieces.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    mono_24k = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return _Decoded(
        mono=mono_24k.astype(np.float32, copy=False),
        seconds=frames / rate,
        clipped_ratio=clipped / max(1, frames * header.channels),
    )


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


def _check_clipping(ratio: float, limits: ClipLimits) -> None:
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
    header = _read_header(data, limits.max_s)
    decoded = _decode(data, header, limits.max_s)
    _check_length(decoded.seconds, limits)
    _check_clipping(decoded.clipped_ratio, limits)
    mono = decoded.mono
    _check_loudness(mono, limits)
    speech = _speech_windows(mono, detector, limits)
    clip = _trim_and_normalise(mono, speech, limits.target_dbfs)
    return PreparedClip(
        samples=clip,
        duration_s=round(len(clip) / SAMPLE_RATE, 3),
        speech_s=round(float(np.count_nonzero(speech)) * WINDOW / VAD_RATE, 3),
        source_format=header.format,
    )
