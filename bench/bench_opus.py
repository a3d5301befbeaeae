"""The gateway's Opus work per 80 ms frame, encode and decode apart, each against what it costs libopus
alone, on the same frames in the same run: the test suite's speech fixture (espeak), white noise, and
digital silence (exact zeros: what a session sends in a rollover's gap, or when the mixer has nothing).
CPU time of this thread (`time.thread_time`) per frame, median over `ROUNDS` passes that alternate the
candidates; bytes per frame for the encoders (Ogg pages included where there are pages).

Encode (PCM float -> Ogg/Opus pages):
- `now`: `shared.audio.OpusEncoder`, libopus called directly (complexity 5, constrained VBR at 32 kb/s);
- `pyav`: the encoder before it, libopus through PyAV with the same settings (its frame and packet
  objects, the filter graph that re-chunks a frame into 20 ms ones), the noise floor added with
  `np.resize`, the same Ogg pages;
- `libopus_alone`: `opus_encode_float` on the same samples with the noise floor already added, four
  20 ms packets a frame into one buffer, nothing else: the floor;
- `sphn`: sphn's `OpusStreamWriter` (Moshi's server's), for scale.

Decode (Ogg/Opus pages -> PCM float):
- `now`: `shared.audio.OpusDecoder` (sphn's `OpusStreamReader`, what the gateway runs);
- `pyav_packets`: PyAV's libopus decoder on the packets alone (no Ogg parsing: the least a PyAV decode
  with our own page parser would cost), each frame to numpy;
- `libopus_alone`: `opus_decode_float` of the libopus the encoder uses, on the packets alone.
"""

from __future__ import annotations

import ctypes
import io
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import soundfile as sf
import soxr
import sphn

from shared.audio import (
    FRAME_SAMPLES,
    OPUS_NOISE_FLOOR,
    SAMPLE_RATE,
    LibopusEncoder,
    OggPages,
    OpusDecoder,
    OpusEncoder,
    libopus,
)
from tests.support.audio import SPEECH_WAV

ROUNDS = 7  # passes over each signal, alternating the candidates
PACKET = SAMPLE_RATE // 50  # 20 ms
OPUS_TAGS = b"OpusTags" + struct.pack("<I", 6) + b"chorus" + struct.pack("<I", 0)  # as the gateway's

Frames = list[np.ndarray]
Encode = Callable[[np.ndarray], bytes]


def signals() -> dict[str, Frames]:
    audio, rate = sf.read(SPEECH_WAV, dtype="float32")
    speech = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    noise = (np.random.default_rng(0).standard_normal(len(speech)) * 0.1).astype(np.float32)
    return {
        name: [x[i : i + FRAME_SAMPLES] for i in range(0, len(x) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]
        for name, x in (("speech", speech), ("noise", noise), ("silence", np.zeros_like(speech)))
    }


class PyAVEncoder:
    """The gateway's encoder before: libopus through PyAV, the noise floor by `np.resize`, Ogg pages."""

    def __init__(self) -> None:
        codec = av.CodecContext.create("libopus", "w")
        assert isinstance(codec, av.AudioCodecContext)
        codec.sample_rate = SAMPLE_RATE
        codec.layout = "mono"
        codec.format = "flt"
        codec.bit_rate = OpusEncoder.BITRATE
        codec.options = {"compression_level": str(OpusEncoder.COMPLEXITY), "vbr": "constrained"}
        codec.open()
        self._codec = codec
        self._pages = OggPages(serial=secrets.randbits(32))
        self._samples_in = self._granule = 0

    def encode(self, samples: np.ndarray) -> bytes:
        flat = np.asarray(samples, dtype=np.float32).reshape(-1)
        pcm = (flat + np.resize(OPUS_NOISE_FLOOR, flat.shape)).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._samples_in
        self._samples_in += pcm.shape[1]
        head = b""
        if self._pages.sequence == 0:
            assert self._codec.extradata is not None  # libopus's OpusHead
            head = self._pages.page([len(self._codec.extradata)], bytes(self._codec.extradata), 0, first=True)
            head += self._pages.page([len(OPUS_TAGS)], OPUS_TAGS, 0)
        packets = [bytes(packet) for packet in self._codec.encode(frame)]
        self._granule += len(packets) * 960
        return head + self._pages.page([len(p) for p in packets], b"".join(packets), self._granule)


def libopus_alone() -> Encode:
    """Four `opus_encode_float` calls a frame into one reused buffer; the noise floor added beforehand."""
    opus = LibopusEncoder(SAMPLE_RATE, OpusEncoder.BITRATE, OpusEncoder.COMPLEXITY)
    out = np.empty(4 * 1275, dtype=np.uint8)
    address = out.ctypes.data

    def encode(noisy: np.ndarray) -> bytes:
        pcm, used = noisy.ctypes.data, 0
        for start in range(0, FRAME_SAMPLES * 4, PACKET * 4):
            used += opus.encode(pcm + start, PACKET, address + used)
        return out[:used].tobytes()

    return encode


def sphn_writer() -> Encode:
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    return lambda frame: bytes(writer.append_pcm(frame))


def timed(work: Callable[[], int], frames: int) -> tuple[float, int]:
    """(CPU ms per frame, what `work` returned) of one pass."""
    started = time.thread_time()
    result = work()
    return (time.thread_time() - started) * 1000 / frames, result


def encode_pass(make: Callable[[], Encode], frames: Frames) -> Callable[[], int]:
    encode = make()  # made outside the timed pass
    return lambda: sum(len(encode(frame)) for frame in frames)


def encoders(frames: Frames) -> dict[str, Any]:
    noisy = [np.ascontiguousarray(frame + OPUS_NOISE_FLOOR) for frame in frames]
    candidates: dict[str, Callable[[], Callable[[], int]]] = {
        "now": lambda: encode_pass(lambda: OpusEncoder().encode, frames),
        "pyav": lambda: encode_pass(lambda: PyAVEncoder().encode, frames),
        "libopus_alone": lambda: encode_pass(libopus_alone, noisy),
        "sphn": lambda: encode_pass(sphn_writer, frames),
    }
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in candidates}
    for _ in range(ROUNDS):
        for name, prepare in candidates.items():
            runs[name].append(timed(prepare(), len(frames)))
    return {
        **{f"{name}_ms": round(float(np.median([ms for ms, _ in run])), 4) for name, run in runs.items()},
        **{f"{name}_bytes": round(run[0][1] / len(frames)) for name, run in runs.items()},
    }


def decoders(frames: Frames) -> dict[str, Any]:
    encoder = OpusEncoder()
    pages = [encoder.encode(frame) for frame in frames]
    pages[1] = pages[0] + pages[1]  # the header pages come with the first audio, as a client sends them
    pages = pages[1:]
    with av.open(io.BytesIO(b"".join(pages)), format="ogg") as container:
        packets = [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]
    lib = libopus()
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_void_p]
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decode_float.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    out = np.empty(FRAME_SAMPLES, dtype=np.float32)
    address = out.ctypes.data

    def now() -> int:
        decoder = OpusDecoder()
        return sum(len(decoder.decode(page)) for page in pages)

    def pyav_packets() -> int:
        codec = av.CodecContext.create("libopus", "r")
        assert isinstance(codec, av.AudioCodecContext)
        codec.sample_rate, codec.layout = SAMPLE_RATE, "mono"
        return sum(f.to_ndarray().size for p in packets for f in codec.decode(av.Packet(p)))

    def alone() -> int:
        error = ctypes.c_int()
        decoder = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(error))
        try:
            return sum(lib.opus_decode_float(decoder, p, len(p), address, PACKET, 0) for p in packets)
        finally:
            lib.opus_decoder_destroy(decoder)

    candidates: dict[str, Callable[[], int]] = {
        "now": now,
        "pyav_packets": pyav_packets,
        "libopus_alone": alone,
    }
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(ROUNDS):
        for name, work in candidates.items():
            ms, samples = timed(work, len(frames))
            assert samples >= (len(frames) - 1) * FRAME_SAMPLES, f"{name} decoded {samples} samples"
            runs[name].append(ms)
    return {f"{name}_ms": round(float(np.median(run)), 4) for name, run in runs.items()}


def run() -> dict[str, Any]:
    lib = libopus()
    lib.opus_get_version_string.restype = ctypes.c_char_p
    results: dict[str, Any] = {"encode": {}, "decode": {}, "frames_per_pass": {}}
    for name, frames in signals().items():
        results["frames_per_pass"][name] = len(frames)
        results["encode"][name] = encoders(frames)
        results["decode"][name] = decoders(frames)
        print(f"   {name}: encode {results['encode'][name]}; decode {results['decode'][name]}", flush=True)
    return {
        **results,
        "unit": "ms of CPU per 80 ms frame (median of the passes); bytes per frame",
        "rounds": ROUNDS,
        "complexity": OpusEncoder.COMPLEXITY,
        "bitrate": OpusEncoder.BITRATE,
        "libopus": lib.opus_get_version_string().decode(),
    }
