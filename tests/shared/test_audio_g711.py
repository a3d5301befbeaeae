"""G.711 μ-law and A-law, the telephony codecs of the realtime protocol, against the standard's known
codes and its quantisation bound; and a telephone round trip 24 kHz -> 8 kHz G.711 -> 24 kHz."""

from __future__ import annotations

import numpy as np
import pytest

from shared.audio import (
    G711_RATE,
    SAMPLE_RATE,
    StreamResampler,
    float_to_pcm16,
    g711_decode,
    g711_encode,
    pcm16_to_float,
)

EVERY_SAMPLE = np.arange(-32768, 32768, dtype=np.int64)


@pytest.mark.parametrize(
    ("law", "codes"),
    [
        # G.711's own reference points: silence, the loudest positive and negative samples.
        ("pcmu", {0: 0xFF, 32767: 0x80, -32768: 0x00}),
        ("pcma", {0: 0xD5, 32767: 0xAA, -32768: 0x2A}),
    ],
)
def test_known_samples_encode_to_the_standards_codes(law: str, codes: dict[int, int]) -> None:
    for sample, code in codes.items():
        assert g711_encode(np.array([sample], dtype="<i2").tobytes(), law) == bytes([code])


@pytest.mark.parametrize("law", ["pcmu", "pcma"])
def test_every_sample_survives_encoding_within_its_segments_step(law: str) -> None:
    wire = g711_encode(EVERY_SAMPLE.astype("<i2").tobytes(), law)
    decoded = np.frombuffer(g711_decode(wire, law), dtype="<i2")
    error = np.abs(decoded.astype(np.int64) - EVERY_SAMPLE)
    # Logarithmic quantisation: the error grows with the level, at most half a step of its segment
    # (1/32 of the level, 1/16 near the top), and a few units near zero.
    assert np.all(error <= np.maximum(np.abs(EVERY_SAMPLE) / 16, 16)), error.max()
    assert g711_decode(g711_encode(g711_decode(bytes(range(256)), law), law), law) == g711_decode(
        bytes(range(256)), law
    ), "decoding then encoding gives back every code's sample"


def test_a_tone_survives_a_mu_law_telephone_round_trip() -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    down, up = StreamResampler(SAMPLE_RATE, G711_RATE), StreamResampler(G711_RATE, SAMPLE_RATE)
    received = []
    for chunk in np.split(tone, 25):  # 40 ms chunks, as a client sends them
        narrow = float_to_pcm16(down.push(chunk))
        wire = g711_encode(narrow, "pcmu")
        assert len(wire) == len(narrow) // 2, "one byte per sample"
        received.append(up.push(pcm16_to_float(g711_decode(wire, "pcmu"))))
    back = np.concatenate(received)
    assert len(back) > 0.9 * SAMPLE_RATE
    middle = slice(2400, len(back) - 2400)  # the resamplers' filters hold back a few ms
    best = max(
        float(np.corrcoef(tone[middle.start - lag : middle.stop - lag], back[middle])[0, 1])
        for lag in range(0, 400)
    )
    assert best > 0.99, "the same tone comes back, only delayed"
