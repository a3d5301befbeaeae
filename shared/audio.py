"""The one home of Chorus's audio format: 24 kHz mono, 80 ms frames of 1920 samples, PCM16 LE on the wire."""

from __future__ import annotations

import io
import secrets
import struct
import time
import wave
import zlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import soxr
import sphn

from shared import metrics

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
    """PCM -> an Ogg/Opus stream as Moshi's server sends it: the `OpusHead` and `OpusTags` pages first, then
    one page per call with the 20 ms packets encoded so far (any length in; PyAV re-chunks it).

    libopus through PyAV, not sphn's writer (Moshi's server's): the same codec and stream format at a fifth
    of the CPU on speech (0.24 against 1.2 ms per 80 ms frame, the gateway's largest per-frame cost;
    docs/performance.md); sphn's writer has no settings. sphn still decodes."""

    BITRATE = 32_000
    COMPLEXITY = 5  # libopus's effort, 0-10: 5 costs a quarter of 10 on speech, for a few kb/s more

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        import av  # here, not at the top: only the gateway and clients encode (the GPU benchmark has no av)

        codec = av.CodecContext.create("libopus", "w")
        assert isinstance(codec, av.AudioCodecContext)
        codec.sample_rate = sample_rate
        codec.layout = "mono"
        codec.format = "flt"
        codec.bit_rate = self.BITRATE
        # Constrained VBR holds the rate near 32 kb/s, sphn's (unconstrained at complexity 5 it is ~50).
        codec.options = {"compression_level": str(self.COMPLEXITY), "vbr": "constrained"}
        codec.open()
        self._codec = codec
        self._frame = av.AudioFrame
        self._sample_rate = sample_rate
        self._pages = OggPages(serial=secrets.randbits(32))
        self._samples_in = 0
        self._granule = 0  # 48 kHz samples decodable from the pages written (Ogg Opus counts at 48 kHz)

    def encode(self, samples: FloatAudio) -> bytes:
        began = time.thread_time()  # the codec's own CPU, apart from the plumbing (bench_latency)
        try:
            return self._encode(samples)
        finally:
            _codec_cpu["encode"] += time.thread_time() - began

    def _encode(self, samples: FloatAudio) -> bytes:
        # Exact digital silence (a gap, a mixer with nothing to play) takes libopus's slow path: 1.2 ms a
        # frame, five times speech. Noise at -120 dBFS, far under PCM16's last bit, keeps it on the fast one.
        flat = np.asarray(samples, dtype=np.float32).reshape(-1)
        pcm = (flat + np.resize(_DITHER, flat.shape)).reshape(1, -1)
        head = b""
        if self._pages.sequence == 0:
            assert self._codec.extradata is not None  # libopus's OpusHead, pre-skip and input rate in it
            head = self._pages.page([bytes(self._codec.extradata)], 0, first=True)
            head += self._pages.page([_OPUS_TAGS], 0)
        if not pcm.size:
            return head
        frame = self._frame.from_ndarray(pcm, format="flt", layout="mono")
        frame.sample_rate = self._sample_rate
        frame.pts = self._samples_in
        self._samples_in += pcm.shape[1]
        pages: list[bytes] = [head]
        batch: list[bytes] = []
        segments = 0
        for packet in self._codec.encode(frame):
            data = bytes(packet)
            if segments + len(data) // 255 + 1 > 255:  # a page holds 255 segments: the rest on the next
                pages.append(self._pages.page(batch, self._granule))
                batch, segments = [], 0
            assert packet.duration is not None
            self._granule += packet.duration * 48_000 // self._sample_rate
            batch.append(data)
            segments += len(data) // 255 + 1
        if batch:
            pages.append(self._pages.page(batch, self._granule))
        return b"".join(pages)


_codec_cpu = {"encode": 0.0, "decode": 0.0}  # CPU seconds in the codec, by direction (its metric reads them)
metrics.CODEC_CPU.labels(direction="encode").set_function(lambda: _codec_cpu["encode"])
metrics.CODEC_CPU.labels(direction="decode").set_function(lambda: _codec_cpu["decode"])
_DITHER = (np.random.default_rng(0).standard_normal(FRAME_SAMPLES) * 1e-6).astype(np.float32)
_OPUS_TAGS = b"OpusTags" + struct.pack("<I", 6) + b"chorus" + struct.pack("<I", 0)  # vendor, no comments


class OggPages:
    """Ogg pages of one logical stream (RFC 3533): whole packets (255 segments at most) per page; a page's
    granule position is the stream's after its last packet."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.sequence = 0

    def page(self, packets: list[bytes], granule: int, *, first: bool = False) -> bytes:
        lacing = bytearray()
        for packet in packets:
            lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
        header = struct.pack(
            "<4sBBqIIIB",
            b"OggS",
            0,
            0x02 if first else 0,
            granule,
            self.serial,
            self.sequence,
            0,
            len(lacing),
        )
        page = bytearray(header + lacing + b"".join(packets))
        struct.pack_into("<I", page, 22, ogg_crc(page))
        self.sequence += 1
        return bytes(page)


_BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def ogg_crc(data: bytes | bytearray) -> int:
    """Ogg's CRC-32: polynomial 0x04C11DB7, MSB first, no initial value or final xor. That is zlib's
    reflected CRC-32 (same polynomial) of the bit-reversed bytes, bit-reversed; zlib runs it in C, where a
    Python loop costs ~50 µs a page."""
    reflected = ~zlib.crc32(data.translate(_BIT_REVERSED), 0xFFFFFFFF) & 0xFFFFFFFF
    return int.from_bytes(reflected.to_bytes(4, "little").translate(_BIT_REVERSED), "big")


class OpusDecoder:
    """Ogg/Opus pages -> PCM (sphn.OpusStreamReader); returns what is decodable so far."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._reader = sphn.OpusStreamReader(sample_rate)

    def decode(self, data: bytes) -> FloatAudio:
        began = time.thread_time()
        try:
            return np.asarray(self._reader.append_bytes(data), dtype=np.float32)
        finally:
            _codec_cpu["decode"] += time.thread_time() - began


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


# --- G.711 (telephony: 8 kHz, one byte a sample) ----------------------------------------------------
# The ITU-T G.711 tables, computed once with numpy as the reference `g711.c` does it (Python's `audioop`
# is gone in 3.13): decoding looks a byte up in 256 samples, encoding a sample up in 65536 bytes.

G711_RATE = 8000

_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_ALL_PCM16 = np.arange(-32768, 32768, dtype=np.int64)
_ALL_BYTES = np.arange(256, dtype=np.int64)


def _ulaw_encode_table() -> npt.NDArray[np.uint8]:
    value = _ALL_PCM16 >> 2  # 14-bit
    mask = np.where(value < 0, 0x7F, 0xFF)
    value = np.minimum(np.abs(value), 8159) + 0x21
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, value)
    code = (segment << 4) | ((value >> (segment + 1)) & 0xF)
    table: npt.NDArray[np.uint8] = (np.where(segment >= 8, 0x7F, code) ^ mask).astype(np.uint8)
    return table


def _ulaw_decode_table() -> npt.NDArray[np.int16]:
    inverted = ~_ALL_BYTES & 0xFF
    magnitude = (((inverted & 0xF) << 3) + 0x84) << ((inverted & 0x70) >> 4)
    return np.where(inverted & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _alaw_encode_table() -> npt.NDArray[np.uint8]:
    value = _ALL_PCM16 >> 3  # 13-bit
    mask = np.where(value >= 0, 0xD5, 0x55)
    value = np.where(value >= 0, value, -value - 1)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, value)
    low = np.where(segment < 2, value >> 1, value >> np.maximum(segment, 1)) & 0xF
    code = (segment << 4) | low
    table: npt.NDArray[np.uint8] = (np.where(segment >= 8, 0x7F, code) ^ mask).astype(np.uint8)
    return table


def _alaw_decode_table() -> npt.NDArray[np.int16]:
    flipped = _ALL_BYTES ^ 0x55
    segment = (flipped & 0x70) >> 4
    base = ((flipped & 0xF) << 4) + np.where(segment == 0, 8, 0x108)
    magnitude = np.where(segment > 1, base << np.maximum(segment - 1, 0), base)
    return np.where(flipped & 0x80, magnitude, -magnitude).astype(np.int16)


_G711_ENCODE = {"pcmu": _ulaw_encode_table(), "pcma": _alaw_encode_table()}
_G711_DECODE = {"pcmu": _ulaw_decode_table(), "pcma": _alaw_decode_table()}


def g711_encode(pcm: bytes, law: str) -> bytes:
    """PCM16 LE bytes -> G.711 bytes (`law`: "pcmu" or "pcma"), one byte a sample, at the same rate."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.int64) + 32768
    return _G711_ENCODE[law][samples].tobytes()


def g711_decode(data: bytes, law: str) -> bytes:
    """G.711 bytes (`law`: "pcmu" or "pcma") -> PCM16 LE bytes, at the same rate."""
    return _G711_DECODE[law][np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


class StreamResampler:
    """Resamples a stream chunk by chunk without clicks at the chunk edges (soxr keeps its filter state
    across chunks); mono float32 in and out."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self._stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32")

    def push(self, samples: FloatAudio) -> FloatAudio:
        return np.asarray(self._stream.resample_chunk(samples.astype(np.float32, copy=False)), np.float32)
