"""The gateway's Opus encode per 80 ms frame: `shared.audio.OpusEncoder` (libopus through PyAV, complexity
5, our Ogg pages) against sphn's `OpusStreamWriter` (Moshi's server's), in the same run, on the same
frames: the test suite's speech fixture (espeak), white noise, and digital silence (exact zeros: what a
session sends in a rollover's gap, or when the mixer has nothing). CPU time (`time.process_time`) per
frame, bytes per frame, and the ratio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import sphn

from shared.audio import FRAME_SAMPLES, SAMPLE_RATE, OpusEncoder
from tests.support.audio import SPEECH_WAV

ROUNDS = 5  # passes over each signal, alternating the encoders


def signals() -> dict[str, list[np.ndarray]]:
    audio, rate = sf.read(SPEECH_WAV, dtype="float32")
    speech = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    noise = (np.random.default_rng(0).standard_normal(len(speech)) * 0.1).astype(np.float32)
    return {
        name: [x[i : i + FRAME_SAMPLES] for i in range(0, len(x) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]
        for name, x in (("speech", speech), ("noise", noise), ("silence", np.zeros_like(speech)))
    }


def cost(make: Callable[[], Callable[[np.ndarray], bytes]], frames: list[np.ndarray]) -> tuple[float, float]:
    """CPU ms and bytes per frame of a fresh encoder over `frames`."""
    encode = make()
    started, size = time.process_time(), 0
    for frame in frames:
        size += len(encode(frame))
    return (time.process_time() - started) * 1000 / len(frames), size / len(frames)


def sphn_writer() -> Callable[[np.ndarray], bytes]:
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    return lambda frame: bytes(writer.append_pcm(frame))


def run() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, frames in signals().items():
        ours, theirs = [], []
        for _ in range(ROUNDS):
            ours.append(cost(lambda: OpusEncoder().encode, frames))
            theirs.append(cost(sphn_writer, frames))
        ours_ms, theirs_ms = float(np.median([c for c, _ in ours])), float(np.median([c for c, _ in theirs]))
        results[name] = {
            "frames": len(frames) * ROUNDS,
            "chorus_ms_per_frame": round(ours_ms, 3),
            "sphn_ms_per_frame": round(theirs_ms, 3),
            "chorus_bytes_per_frame": round(float(np.median([b for _, b in ours]))),
            "sphn_bytes_per_frame": round(float(np.median([b for _, b in theirs]))),
            "sphn_over_chorus": round(theirs_ms / ours_ms, 2),
        }
        print(f"   {name}: {results[name]}", flush=True)
    return {"encoders": results, "complexity": OpusEncoder.COMPLEXITY, "bitrate": OpusEncoder.BITRATE}
