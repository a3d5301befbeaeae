"""The gateway's Ogg/Opus stream (shared/audio.py `OpusEncoder`, libopus called directly with our own Ogg
pages) is one Moshi's own reader (sphn) and ffmpeg's demuxer both read: valid pages and CRCs, granule
positions at 48 kHz, the audio back within a lossy codec's error."""

from __future__ import annotations

import importlib.metadata
import io
import itertools
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from shared.audio import (
    FRAME_SAMPLES,
    OPUS_NOISE_FLOOR,
    SAMPLE_RATE,
    LibopusMissing,
    OpusDecoder,
    OpusEncoder,
    libopus,
    ogg_crc,
)
from tests.support.audio import SPEECH_WAV

OGG_OPUS_FIXTURE = SPEECH_WAV.with_name("speech.opus.ogg")  # written by an independent encoder


def speech() -> np.ndarray:
    audio, rate = sf.read(SPEECH_WAV, dtype="float32")
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def pages(stream: bytes) -> list[tuple[int, int, bytes, list[int]]]:
    """(header flags, granule, the page, its packets' sizes) of every page; asserts each page's CRC."""
    found, pos = [], 0
    while pos < len(stream):
        assert stream[pos : pos + 4] == b"OggS", f"a page starts at {pos}"
        flags, granule = stream[pos + 5], struct.unpack_from("<q", stream, pos + 6)[0]
        lacing = stream[pos + 27 : pos + 27 + stream[pos + 26]]
        page = bytearray(stream[pos : pos + 27 + len(lacing) + sum(lacing)])
        crc = struct.unpack_from("<I", page, 22)[0]
        page[22:26] = bytes(4)
        assert ogg_crc(page) == crc, f"the CRC of the page at {pos}"
        sizes, size = [], 0
        for value in lacing:
            size += value
            if value < 255:
                sizes.append(size)
                size = 0
        found.append((flags, granule, bytes(page), sizes))
        pos += len(page)
    return found


def test_ogg_crc_matches_the_pages_of_an_independent_encoder() -> None:
    assert len(pages(OGG_OPUS_FIXTURE.read_bytes())) > 2  # every CRC checked in `pages`


def test_moshi_s_reader_and_ffmpeg_read_the_stream_back() -> None:
    audio = speech()
    frames = [audio[i : i + FRAME_SAMPLES] for i in range(0, len(audio) - FRAME_SAMPLES, FRAME_SAMPLES)]
    encoder, decoder = OpusEncoder(), OpusDecoder()
    chunks = [encoder.encode(frame) for frame in frames]
    decoded = np.concatenate([decoder.decode(chunk) for chunk in chunks])

    stream = b"".join(chunks)
    found = pages(stream)
    assert found[0][2][28:36] == b"OpusHead" and found[0][0] == 0x02, "the first page opens the stream"
    assert found[1][2][28:36] == b"OpusTags"
    granules = [granule for _, granule, _, _ in found[2:]]
    assert granules == sorted(granules) and len(found) == len(frames) + 2, "one page per frame, in order"
    assert granules[-1] == len(frames) * FRAME_SAMPLES * 48_000 // SAMPLE_RATE, (
        "granules count 48 kHz samples"
    )

    sent = np.concatenate(frames)
    assert len(decoded) == len(sent)
    lag = max(
        range(2000), key=lambda shift: float(np.dot(decoded[shift : shift + SAMPLE_RATE], sent[:SAMPLE_RATE]))
    )
    heard = decoded[lag:]
    error = heard - sent[: len(heard)]
    assert 10 * np.log10(np.sum(sent[: len(heard)] ** 2) / np.sum(error**2)) > 10, "the speech comes back"

    with av.open(io.BytesIO(stream), format="ogg") as container:
        packets = [p for p in container.demux(container.streams.audio[0]) if p.size]
    assert len(packets) == sum(len(sizes) for _, _, _, sizes in found[2:]), "ffmpeg finds every packet"


def test_a_long_chunk_is_split_into_pages_of_at_most_255_segments() -> None:
    audio = speech()
    encoder = OpusEncoder()
    stream = encoder.encode(np.tile(audio, 2))  # ~15 s at once: hundreds of 20 ms packets
    found = pages(stream)
    assert len(found) > 3 and all(len(sizes) <= 255 for *_, sizes in found)
    assert found[-1][1] == (2 * len(audio)) // 480 * 960, "every whole 20 ms packet is in the stream"


def test_the_packets_are_those_of_pyav_s_libopus_encoder_with_the_same_settings() -> None:
    """The encoder calls libopus itself, holding what is under 20 ms for the next call; PyAV's libopus
    encoder (the gateway's before) makes the same packets of the same samples cut the same way: the
    codec, its settings and the stream's pre-skip are unchanged."""
    audio = speech()[: 4 * SAMPLE_RATE]
    cuts = itertools.takewhile(
        lambda cut: cut < len(audio),
        itertools.accumulate(itertools.cycle([FRAME_SAMPLES, 1000, 7, 1500, 413])),
    )
    chunks = [audio[a:b] for a, b in itertools.pairwise([0, *cuts, len(audio)])]
    ours = OpusEncoder()
    stream = b"".join(ours.encode(chunk) for chunk in chunks)
    with av.open(io.BytesIO(stream), format="ogg") as container:
        packets = [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]

    codec = av.CodecContext.create("libopus", "w")
    assert isinstance(codec, av.AudioCodecContext)
    codec.sample_rate, codec.layout, codec.format, codec.bit_rate = SAMPLE_RATE, "mono", "flt", ours.BITRATE
    codec.options = {"compression_level": str(ours.COMPLEXITY), "vbr": "constrained"}
    codec.open()
    theirs, pts = [], 0
    for chunk in chunks:
        frame = av.AudioFrame.from_ndarray(
            (chunk + OPUS_NOISE_FLOOR[: len(chunk)]).reshape(1, -1), format="flt", layout="mono"
        )
        frame.sample_rate, frame.pts = SAMPLE_RATE, pts
        pts += len(chunk)
        theirs += [bytes(packet) for packet in codec.encode(frame)]

    assert len(packets) == len(audio) // 480 and packets == theirs
    assert codec.extradata is not None and pages(stream)[0][2][28:] == bytes(codec.extradata), "the OpusHead"


def test_an_encoder_s_libopus_state_is_freed_with_it() -> None:
    """libopus's state (~31 KB) lives outside Python's heap: an encoder dropped frees it, so a gateway's
    memory does not grow with the sessions it has served (2,000 leaked states would be ~63 MB)."""

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    OpusEncoder()
    before = resident_mb()
    for _ in range(2000):
        OpusEncoder()
    assert resident_mb() - before < 20


def test_a_call_that_raises_leaves_the_header_pages_to_the_next() -> None:
    """A stream without its `OpusHead` page is unreadable to ffmpeg and the browser's decoders: the headers
    go out with the first call that returns."""
    encoder = OpusEncoder()
    with pytest.raises(ValueError):
        encoder.encode(np.array(["not audio"]))
    stream = encoder.encode(speech()[:FRAME_SAMPLES])
    assert [page[28:36] for _, _, page, _ in pages(stream)[:2]] == [b"OpusHead", b"OpusTags"]
    with av.open(io.BytesIO(stream), format="ogg") as container:
        assert sum(frame.samples for frame in container.decode(audio=0)) > 0


@pytest.fixture
def fresh_libopus() -> Iterator[None]:
    """`libopus()` looked up anew in the test, and again after it (it is cached for the process)."""
    libopus.cache_clear()
    yield
    libopus.cache_clear()


@pytest.mark.usefixtures("fresh_libopus")
def test_a_libopus_that_does_not_load_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a crash, nor an OSError from ctypes: `LibopusMissing`, which the gateway refuses to start on."""
    broken = tmp_path / "libopus-0123abcd.so.0"
    broken.write_bytes(b"not a shared object")
    entry = importlib.metadata.PackagePath(broken.name)
    monkeypatch.setattr(entry, "locate", lambda: broken, raising=False)
    monkeypatch.setattr(importlib.metadata, "files", lambda name: [entry])
    with pytest.raises(LibopusMissing, match="libopus-0123abcd.so.0 cannot be used"):
        OpusEncoder()

    monkeypatch.setattr(importlib.metadata, "files", lambda name: [])
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(LibopusMissing, match="not found"):
        OpusEncoder()


REPO = Path(__file__).resolve().parents[2]
ENCODING_AT_EXIT = """
import threading, numpy as np
from shared.audio import OpusEncoder
audio = np.full(96_000, 0.1, dtype=np.float32)
def encode_forever(encoder):
    while True:
        encoder.encode(audio)
encoders = [OpusEncoder() for _ in range(8)]
for encoder in encoders:
    threading.Thread(target=encode_forever, args=(encoder,), daemon=True).start()
threading.Event().wait(0.2)
"""


def test_an_encoder_still_encoding_when_the_interpreter_exits_is_not_freed_under_it() -> None:
    """Daemon threads run on while the interpreter exits: libopus's state must outlive them (it crashed
    most runs when exit freed it)."""
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", ENCODING_AT_EXIT], cwd=REPO, check=False, capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()[-500:]
