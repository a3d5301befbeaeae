"""The one home of Chorus's audio format: 24 kHz mono, 80 ms frames of 1920 samples, PCM16 LE on the wire."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import io
import secrets
import struct
import time
import wave
import weakref
import zlib
from collections.abc import Iterator
from typing import Any

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


class Pcm16Frames:
    """Accumulates PCM16 bytes of any length and hands out whole 80 ms frames of it; keeps the remainder.
    What a client sends as PCM16 is cut as bytes: no trip through float and back (~10 µs a frame)."""

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        self.frame_bytes = frame_bytes
        self._pending = bytearray()

    def push(self, pcm: bytes) -> list[bytes]:
        if len(pcm) % 2:
            raise ValueError(f"PCM16 needs an even number of bytes, got {len(pcm)}")
        self._pending += pcm
        whole = len(self._pending) - len(self._pending) % self.frame_bytes
        frames = [bytes(self._pending[i : i + self.frame_bytes]) for i in range(0, whole, self.frame_bytes)]
        del self._pending[:whole]
        return frames

    def clear(self) -> None:
        self._pending.clear()


class OpusEncoder:
    """PCM -> an Ogg/Opus stream as Moshi's server sends it: the `OpusHead` and `OpusTags` pages first, then
    one page per call with the 20 ms packets encoded so far (any length in; a remainder under 20 ms waits
    for the next call).

    libopus called directly (`LibopusEncoder`: the build PyAV ships, the one its encoder wrapped before),
    not sphn's writer (Moshi's server's): the same codec and stream format at a sixth of sphn's CPU on
    speech; sphn's writer has no settings. Not through PyAV either: its frame and packet objects and the
    filter graph that cuts each frame into 20 ms ones were a sixth of the encode (docs/performance.md).
    sphn decodes."""

    BITRATE = 32_000
    COMPLEXITY = 5  # libopus's effort, 0-10: 5 costs a quarter of 10 on speech, for a few kb/s more

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._opus = LibopusEncoder(sample_rate, self.BITRATE, self.COMPLEXITY)
        self._packet = sample_rate // 50  # 20 ms, the packet libopus makes of each call
        # Reused on every call: the samples (a frame and a held remainder) and the packets, back to back.
        self._pcm = _Buffer(np.empty(FRAME_SAMPLES + self._packet, dtype=np.float32))
        self._out = _Buffer(np.empty(_MAX_PACKET_BYTES * (FRAME_SAMPLES // self._packet + 1), dtype=np.uint8))
        self._held = 0  # samples at the start of `_pcm` waiting for a whole packet
        self._pages = OggPages(serial=secrets.randbits(32))
        self._granule = 0  # 48 kHz samples decodable from the pages written (Ogg Opus counts at 48 kHz)
        pre_skip = self._opus.lookahead * 48_000 // sample_rate
        self._head = struct.pack("<8sBBHIhB", b"OpusHead", 1, 1, pre_skip, sample_rate, 0, 0)

    def encode(self, samples: FloatAudio) -> bytes:
        began = time.thread_time()  # the codec's own CPU, apart from the plumbing (bench_latency)
        try:
            return self._encode(samples)
        finally:
            _codec_cpu["encode"] += time.thread_time() - began

    def _encode(self, samples: FloatAudio) -> bytes:
        pcm, total = self._with_noise_floor(np.asarray(samples, dtype=np.float32).reshape(-1))
        whole = total - total % self._packet
        sizes, body = self._packets(pcm, whole)
        self._held = total - whole  # under 20 ms: waits for the next call, at the start of the buffer
        self._pcm.array[: self._held] = pcm.array[whole:total]
        # The header pages once nothing above can raise: a call that fails must not take them with it.
        head = b""
        if self._pages.sequence == 0:
            head = self._pages.page([len(self._head)], self._head, 0, first=True)
            head += self._pages.page([len(_OPUS_TAGS)], _OPUS_TAGS, 0)
        return head + self._paged(sizes, body) if sizes else head

    def _with_noise_floor(self, flat: FloatAudio) -> tuple[_Buffer, int]:
        """The samples held from the last call then `flat`, with the noise floor added, in one buffer; and
        how many samples that makes.

        Exact digital silence (a gap, a mixer with nothing to play) takes libopus's slow path: 1.2 ms a
        frame, six times speech. Noise at -120 dBFS, far under PCM16's last bit, keeps it on the fast one."""
        total = self._held + len(flat)
        pcm = self._pcm
        if total > len(pcm.array):  # a long chunk at once: a buffer of its own
            pcm = _Buffer(np.empty(total, dtype=np.float32))
            pcm.array[: self._held] = self._pcm.array[: self._held]
        noise = (
            OPUS_NOISE_FLOOR[: len(flat)]
            if len(flat) <= len(OPUS_NOISE_FLOOR)
            else np.resize(OPUS_NOISE_FLOOR, len(flat))
        )
        np.add(flat, noise, out=pcm.array[self._held : total])
        return pcm, total

    def _packets(self, pcm: _Buffer, whole: int) -> tuple[list[int], bytes]:
        """The first `whole` samples of `pcm` as 20 ms packets: their sizes, and the packets back to back."""
        out = self._out
        if len(out.array) < whole // self._packet * _MAX_PACKET_BYTES:  # a long chunk: a buffer of its own
            out = _Buffer(np.empty(whole // self._packet * _MAX_PACKET_BYTES, dtype=np.uint8))
        sizes, used = [], 0
        for start in range(0, whole * 4, self._packet * 4):  # float32: 4 bytes a sample
            size = self._opus.encode(pcm.address + start, self._packet, out.address + used)
            sizes.append(size)
            used += size
        return sizes, out.array[:used].tobytes()

    def _paged(self, sizes: list[int], body: bytes) -> bytes:
        """The packets of `body` (`sizes` in order) in Ogg pages of whole packets, 255 lacing values each."""
        pages: list[bytes] = []
        first = begins = segments = 0
        for i, size in enumerate(sizes):
            if segments + size // 255 + 1 > 255:
                pages.append(self._page(sizes[first:i], body, begins))
                begins += sum(sizes[first:i])
                first, segments = i, 0
            segments += size // 255 + 1
        pages.append(self._page(sizes[first:], body, begins))
        return b"".join(pages)

    def _page(self, sizes: list[int], body: bytes, begins: int) -> bytes:
        self._granule += len(sizes) * 960  # a 20 ms packet is 960 samples at 48 kHz
        return self._pages.page(sizes, body[begins : begins + sum(sizes)], self._granule)


class _Buffer:
    """An array and the address of its data, for libopus (taken once: numpy's `.ctypes` costs µs a call)."""

    def __init__(self, array: npt.NDArray[Any]) -> None:
        self.array = array
        self.address: int = array.ctypes.data


_MAX_PACKET_BYTES = 1275  # the most one Opus frame can take (RFC 6716 3.2.1)


class LibopusEncoder:
    """One libopus encoder (`opus_encoder_create`), called through ctypes: float PCM in, one packet per
    20 ms. Set as PyAV's libopus encoder set it before (the same packets for the same input): application
    "audio", VBR constrained to `bitrate`, `complexity`. Destroyed with its Python object. One thread at a
    time: libopus's state has no lock."""

    def __init__(self, sample_rate: int, bitrate: int, complexity: int) -> None:
        lib = libopus()
        error = ctypes.c_int()
        handle = lib.opus_encoder_create(sample_rate, 1, _OPUS_APPLICATION_AUDIO, ctypes.byref(error))
        if error.value or not handle:
            raise RuntimeError(f"libopus: opus_encoder_create failed ({error.value})")
        self._handle: int = handle
        # Not at interpreter exit: a daemon thread may still be inside `encode` then (the OS frees it anyway).
        weakref.finalize(self, lib.opus_encoder_destroy, handle).atexit = False
        self._encode = lib.opus_encode_float
        for request, value in (
            (_OPUS_SET_BITRATE, bitrate),
            (_OPUS_SET_VBR, 1),
            (_OPUS_SET_VBR_CONSTRAINT, 1),
            (_OPUS_SET_COMPLEXITY, complexity),
        ):
            self._ctl(request, ctypes.c_int(value))
        lookahead = ctypes.c_int()
        self._ctl(_OPUS_GET_LOOKAHEAD, ctypes.byref(lookahead))
        self.lookahead = lookahead.value  # samples at `sample_rate`: the stream's pre-skip

    def _ctl(self, request: int, argument: Any) -> None:
        if (status := libopus().opus_encoder_ctl(self._handle, request, argument)) != 0:
            raise RuntimeError(f"libopus: opus_encoder_ctl({request}) failed ({status})")

    def encode(self, pcm_address: int, samples: int, out_address: int) -> int:
        """Encodes `samples` floats at `pcm_address` into one packet at `out_address`; its size in bytes."""
        size: int = self._encode(self._handle, pcm_address, samples, out_address, _MAX_PACKET_BYTES)
        if size < 0:
            raise RuntimeError(f"libopus: opus_encode_float failed ({size})")
        return size


_OPUS_APPLICATION_AUDIO = 2049
_OPUS_SET_BITRATE, _OPUS_SET_VBR, _OPUS_SET_COMPLEXITY = 4002, 4006, 4010
_OPUS_SET_VBR_CONSTRAINT, _OPUS_GET_LOOKAHEAD = 4020, 4027


class LibopusMissing(RuntimeError):
    """No libopus that loads: the Moshi protocol's encoder cannot work, so the gateway does not start."""


@functools.cache
def libopus() -> ctypes.CDLL:
    """The libopus that PyAV's wheel ships (the build its encoder used: the gateway's codec before), else
    the system's (a PyAV built from source links that one)."""
    try:
        files = importlib.metadata.files("av") or []
    except importlib.metadata.PackageNotFoundError:  # no PyAV (the GPU benchmark's machine): the system's
        files = []
    shipped = [f for f in files if f.name.startswith(("libopus", "opus"))]
    path = str(shipped[0].locate()) if shipped else ctypes.util.find_library("opus")
    if path is None:
        raise LibopusMissing("libopus not found: neither in PyAV's wheel nor on the system")
    try:
        return _declared(ctypes.CDLL(path))
    except (OSError, AttributeError) as exc:  # not loadable here, or an encoder function missing
        raise LibopusMissing(f"libopus at {path} cannot be used: {exc}") from exc


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with the C signatures of the encoder functions Chorus calls."""
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encoder_destroy.restype = None
    # Variadic past the request: its argument goes as an extra (ctypes then passes it the variadic way).
    lib.opus_encoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.opus_encoder_ctl.restype = ctypes.c_int
    lib.opus_encode_float.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int32,
    ]
    lib.opus_encode_float.restype = ctypes.c_int32
    return lib


_codec_cpu = {"encode": 0.0, "decode": 0.0}  # CPU seconds in the codec, by direction (its metric reads them)
metrics.CODEC_CPU.labels(direction="encode").set_function(lambda: _codec_cpu["encode"])
metrics.CODEC_CPU.labels(direction="decode").set_function(lambda: _codec_cpu["decode"])
# Added to what the encoder gets (`OpusEncoder._with_noise_floor` says why): -120 dBFS, under PCM16's LSB.
OPUS_NOISE_FLOOR = (np.random.default_rng(0).standard_normal(FRAME_SAMPLES) * 1e-6).astype(np.float32)
_OPUS_TAGS = b"OpusTags" + struct.pack("<I", 6) + b"chorus" + struct.pack("<I", 0)  # vendor, no comments


class OggPages:
    """Ogg pages of one logical stream (RFC 3533): whole packets (255 segments at most) per page; a page's
    granule position is the stream's after its last packet."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.sequence = 0

    def page(self, sizes: list[int], body: bytes, granule: int, *, first: bool = False) -> bytes:
        """One page of the packets in `body`, whose sizes are `sizes` in order."""
        if all(size < 255 for size in sizes):
            lacing = bytes(sizes)
        else:
            lacing = b"".join(b"\xff" * (size // 255) + bytes([size % 255]) for size in sizes)
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
        page = bytearray(header + lacing + body)
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


class InvalidOggOpus(ValueError):
    """Client audio that is not Ogg/Opus as a decoder may be given it."""


def _opus_frames(toc: int) -> tuple[float, int]:
    """(seconds a frame, frames a packet; 0 = the packet's second byte says) by an Opus packet's TOC byte
    (RFC 6716, 3.1): its configuration's mode and frame size, and its frame count code."""
    config, code = toc >> 3, toc & 3
    if config < 12:  # SILK
        size = (0.010, 0.020, 0.040, 0.060)[config & 3]
    elif config < 16:  # hybrid
        size = (0.010, 0.020)[config & 1]
    else:  # CELT
        size = (0.0025, 0.005, 0.010, 0.020)[config & 3]
    return size, (1, 2, 2, 0)[code]


_OPUS_TOC = [_opus_frames(toc) for toc in range(256)]
OPUS_MAX_PACKET_S = 0.120  # RFC 6716: no packet carries more
# What one message may hold, so that counting it costs about 1 ms at most (2 ms for 1 MiB of the largest
# pages: their CRC): a client sends a page per 80 ms (2 s, the burst, of 20 ms packets is 100 packets).
OGG_MAX_PAGES, OPUS_MAX_PACKETS = 128, 1024
_OGG_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, CRC, segments


class OggOpusMeter:
    """The seconds of audio Ogg/Opus bytes carry, read from the pages and each packet's TOC byte, without
    decoding: what a socket's audio pace is charged before the decoder runs, so that audio that fails to
    decode (sphn decodes up to 5 s of a message before it raises) costs its sender as much as audio that
    decodes. Pages are checked as an Ogg reader checks them (capture pattern, version, CRC); a page cut
    across messages is counted once it is whole.

    A packet is counted in the page where it begins. Whether a page's first segments continue a packet
    is what the meter tracks itself (the last segment of the page before was 255 bytes): a page whose
    "continued" flag says otherwise is refused, because sphn ignores the flag and would decode a packet
    the flag had hidden from the count. Refused (`InvalidOggOpus`) too: an empty packet (sphn conceals it
    as a lost packet with its whole 5 s buffer), and more than `OGG_MAX_PAGES` pages or `OPUS_MAX_PACKETS`
    packets in one call (counting them in Python would cost more than decoding them). A packet whose
    frames are not all there counts as the most a packet carries (120 ms): the decoder refuses it."""

    def __init__(self) -> None:
        self._tail = b""  # an incomplete page, at most 65,307 bytes (27 + 255 + 255 x 255)
        self._pending = False  # the last whole page ended inside a packet

    def push(self, data: bytes) -> float:
        buf = self._tail + data if self._tail else data
        seconds, at, size, pages, packets = 0.0, 0, len(buf), 0, 0
        while size - at >= _OGG_HEADER.size:
            if (pages := pages + 1) > OGG_MAX_PAGES:
                raise InvalidOggOpus(f"more than {OGG_MAX_PAGES} Ogg pages in one message")
            capture, version, flags, _, _, _, crc, segments = _OGG_HEADER.unpack_from(buf, at)
            if capture != b"OggS" or version != 0:
                raise InvalidOggOpus("not an Ogg page where one should begin")
            lacing_at = at + _OGG_HEADER.size
            body_at = lacing_at + segments
            if size < body_at:
                break
            lacing = buf[lacing_at:body_at]
            end = body_at + sum(lacing)
            if size < end:
                break
            page = bytearray(buf[at:end])
            page[22:26] = b"\0\0\0\0"
            if ogg_crc(page) != crc:
                raise InvalidOggOpus("an Ogg page whose CRC does not match its bytes")
            if bool(flags & 0x01) != self._pending:
                raise InvalidOggOpus(
                    "an Ogg page whose continued flag does not match the packet before it"
                    if self._pending
                    else "an Ogg page that continues no packet"
                )
            page_s, packets = self._page_seconds(buf, body_at, lacing, packets)
            seconds += page_s
            if lacing:
                self._pending = lacing[-1] == 255
            at = end
        self._tail = buf[at:]
        return seconds

    def _page_seconds(self, buf: bytes, at: int, lacing: bytes, packets: int) -> tuple[float, int]:
        """The seconds of the packets that begin in this page, and `packets` (the call's count so far)
        with them."""
        seconds, starts = 0.0, not self._pending  # a continued page's first segments end a packet
        for length in lacing:
            if starts:
                if (packets := packets + 1) > OPUS_MAX_PACKETS:
                    raise InvalidOggOpus(f"more than {OPUS_MAX_PACKETS} Opus packets in one message")
                if length == 0:
                    raise InvalidOggOpus("an empty Opus packet: send the audio, not a lost frame")
                if length < 8 or buf[at : at + 8] not in (b"OpusHead", b"OpusTags"):
                    frame_s, frames = _OPUS_TOC[buf[at]]
                    if frames == 0 and length >= 2:  # code 3: the count is in the packet's second byte
                        frames = buf[at + 1] & 0x3F
                    seconds += min(frame_s * frames, OPUS_MAX_PACKET_S) if frames else OPUS_MAX_PACKET_S
            starts = length < 255
            at += length
        return seconds, packets

    def reset(self) -> None:
        self._tail, self._pending = b"", False


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
