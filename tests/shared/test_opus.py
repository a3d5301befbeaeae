"""The gateway's Ogg/Opus stream (shared/audio.py `OpusEncoder`, libopus called directly with our own Ogg
pages) is one Moshi's own reader (sphn) and ffmpeg's demuxer both read: valid pages and CRCs, granule
positions at 48 kHz, the audio back within a lossy codec's error."""

from __future__ import annotations

import functools
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
    InvalidOggOpus,
    LibopusMissing,
    OggOpusMeter,
    OggPages,
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


def libopus_stream(frame_ms: float, bitrate: int, application: str) -> bytes:
    """Two seconds of a tone, Ogg/Opus by PyAV's libopus with these settings (SILK, hybrid or CELT frames
    of 2.5 to 120 ms: every TOC configuration family and frame count code)."""
    out = io.BytesIO()
    with av.open(out, "w", format="ogg") as container:
        options = {"frame_duration": str(frame_ms), "application": application}
        stream = container.add_stream("libopus", rate=48000, options=options)
        stream.bit_rate, stream.layout = bitrate, "mono"
        tone = (0.3 * np.sin(np.arange(96000) / 48000 * 2 * np.pi * 300)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
        frame.sample_rate = 48000
        for packet in itertools.chain(stream.encode(frame), stream.encode(None)):
            container.mux(packet)
    return out.getvalue()


def ours_by_frames() -> bytes:
    """The gateway's stream: 80 ms frames, each encoded as it comes."""
    encoder = OpusEncoder()
    frames = speech()[: 62 * FRAME_SAMPLES].reshape(62, FRAME_SAMPLES)
    return b"".join(encoder.encode(frame) for frame in frames)


STREAMS = {
    "ours": ours_by_frames,
    "independent encoder": OGG_OPUS_FIXTURE.read_bytes,
    **{
        f"{frame_ms} ms {application}": functools.partial(libopus_stream, frame_ms, bitrate, application)
        for frame_ms, bitrate, application in [
            (2.5, 64000, "lowdelay"),
            (10, 32000, "audio"),
            (20, 8000, "voip"),
            (60, 6000, "voip"),
            (120, 6000, "voip"),
        ]
    },
}


@pytest.mark.parametrize("name", STREAMS)
def test_the_meter_counts_the_audio_the_decoder_gives_without_decoding(name: str) -> None:
    """The gateway charges a socket's pace by `OggOpusMeter` before decoding: it must count what sphn
    will decode, to the sample, whole or cut across messages anywhere."""
    stream = STREAMS[name]()
    decoder = OpusDecoder()  # in pieces: sphn decodes at most ~5 s a call
    decoded_s = sum(len(decoder.decode(stream[at : at + 4096])) for at in range(0, len(stream), 4096))
    decoded_s /= SAMPLE_RATE
    assert decoded_s > 1
    assert OggOpusMeter().push(stream) == pytest.approx(decoded_s, abs=1e-9)
    meter = OggOpusMeter()
    assert sum(meter.push(stream[at : at + 97]) for at in range(0, len(stream), 97)) == pytest.approx(
        decoded_s, abs=1e-9
    )


def celt_page(writer: OggPages, packets: list[bytes]) -> bytes:
    return writer.page([len(p) for p in packets], b"".join(packets), granule=0)


def test_audio_that_fails_to_decode_is_counted_as_what_it_carries() -> None:
    """The attack the meter answers: 5 s of 20 ms packets and one more in one message. sphn decodes the 5
    s, then raises: charged after decoding, it cost its sender nothing."""
    rng = np.random.default_rng(0)
    packets = [b"\xf8" + rng.bytes(199) for _ in range(251)]  # CELT fullband, 20 ms, one frame each
    writer = OggPages(serial=1)
    message = b"".join(celt_page(writer, packets[at : at + 40]) for at in range(0, 251, 40))
    with pytest.raises(Exception, match="invalid argument"):
        OpusDecoder().decode(message)
    assert OggOpusMeter().push(message) == pytest.approx(5.02)
    code3 = b"\xfb\x06" + rng.bytes(100)  # code 3: six 20 ms frames in one packet
    assert OggOpusMeter().push(celt_page(writer, [code3, b"\xfb"])) == pytest.approx(0.12 + 0.12)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("a flipped byte", "CRC"),
        ("no capture pattern", "not an Ogg page"),
        ("an empty packet", "empty Opus packet"),
        # Bounds on the Python that counts a message (~0.3 ms): 1 MiB of the smallest pages took 65 ms.
        ("pages of nothing", "more than 128 Ogg pages"),
        ("tiny packets", "more than 1024 Opus packets"),
    ],
)
def test_the_meter_refuses_what_is_not_ogg_opus(case: str, reason: str) -> None:
    writer = OggPages(serial=1)
    page = bytearray(celt_page(writer, [b"\xf8" + bytes(99)]))
    if case == "a flipped byte":
        page[-1] ^= 0xFF
    elif case == "no capture pattern":
        page = bytearray(b"XXXX") + page
    elif case == "an empty packet":
        page = bytearray(writer.page([60, 0, 60], b"\xf8" * 120, granule=0))
    elif case == "pages of nothing":
        page = bytearray(b"".join(writer.page([], b"", granule=0) for _ in range(129)))
    else:  # 2.5 ms CELT packets of one byte: 1,025 of them are 2.6 s
        page = bytearray(b"".join(writer.page([1] * 205, b"\x80" * 205, granule=0) for _ in range(5)))
    with pytest.raises(InvalidOggOpus, match=reason):
        OggOpusMeter().push(bytes(page))


def raw_page(lacing: list[int], body: bytes, *, continued: bool, sequence: int) -> bytes:
    """An Ogg page with this lacing as given (a packet may run on into the next page) and its CRC."""
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, int(continued), 0, 1, sequence, 0, len(lacing))
    page = bytearray(header + bytes(lacing) + body)
    struct.pack_into("<I", page, 22, ogg_crc(page))
    return bytes(page)


def test_a_packet_across_two_pages_is_counted_once_and_the_continued_flag_is_the_meters_own() -> None:
    """Found by a review: sphn ignores a page's continued flag, so a meter that believed it counted
    nothing of packets the flag hid (a page flagged continued after a whole packet) while sphn decoded
    them. The meter knows itself whether a packet is pending, and refuses a page that says otherwise."""
    raw = libopus_stream(20, 128_000, "audio")  # 20 ms packets of 300-600 bytes
    stream = pages(raw)
    heads = raw[: len(stream[0][2]) + len(stream[1][2])]  # as sent: `pages` zeroes the CRC it checked
    _, _, first, sizes = stream[2]
    packet = first[27 + first[26] :][: sizes[0]]  # the first audio packet
    assert len(packet) > 255, "longer than a segment: its first 255 bytes in one page, the rest in the next"
    cut = 255 * (len(packet) // 255)
    split = raw_page([255] * (cut // 255), packet[:cut], continued=False, sequence=2) + raw_page(
        [len(packet) - cut], packet[cut:], continued=True, sequence=3
    )
    meter, decoder = OggOpusMeter(), OpusDecoder()
    counted = [meter.push(heads), meter.push(split[:40]), meter.push(split[40:])]
    decoded = len(decoder.decode(heads + split)) / SAMPLE_RATE
    assert counted == [0, 0, pytest.approx(0.02)] and decoded == pytest.approx(0.02)
    whole = [255] * (cut // 255) + [len(packet) - cut]
    hidden = raw_page(whole, packet, continued=True, sequence=4)
    with pytest.raises(InvalidOggOpus, match="continues no packet"):
        meter.push(hidden)  # after a whole packet: the flag would hide this one from the count
    pending = OggOpusMeter()
    pending.push(raw_page([255] * (cut // 255), packet[:cut], continued=False, sequence=2))
    with pytest.raises(InvalidOggOpus, match="continued flag does not match"):
        pending.push(raw_page(whole, packet, continued=False, sequence=3))
