"""The lean tick gives exactly what the straightforward one gave: the batcher stepping the way it used to
(bench/bench_tick.py's baseline: fresh tensors each tick, blocking copies, masks rebuilt every step,
eager resets) runs the same sessions, joins, leaves, primers and samples as the lean one; and the lean
one copies its row masks to the device only when the slot table changes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import astuple
from typing import Any

import numpy as np
import torch

from bench.bench_tick import StraightforwardBatcher
from services.dialogue.batcher import Batcher, RowOutput
from shared.audio import FRAME_SAMPLES
from shared.messages import Sampling

SAMPLING = Sampling(text_temperature=0.8, text_top_k=40, audio_temperature=0.8)


# tick -> what happens to the slot table before that tick's step
Change = Callable[[Batcher], None]


def script(primer: list[int]) -> dict[int, list[Change]]:
    return {
        0: [lambda b: b.join("a", (), SAMPLING), lambda b: b.join("b", primer, SAMPLING)],
        3: [lambda b: b.join("c", (), Sampling(text_temperature=0.0, text_top_k=1))],
        6: [lambda b: b.leave(0)],
        7: [lambda b: b.join("d", primer[:5], SAMPLING)],
        10: [lambda b: b.leave(1)],
        11: [lambda b: b.join("e", (), SAMPLING), lambda b: b.leave(2)],
        13: [lambda b: b.join("f", primer, SAMPLING)],
    }


def play(batcher: Batcher, changes: dict[int, list[Change]], ticks: int) -> list[tuple[Any, ...]]:
    """Run the script on fixed seeds; every output of every tick, as plain values."""
    torch.manual_seed(1234)
    rng = np.random.default_rng(5)
    seen: list[tuple[Any, ...]] = []
    for tick in range(ticks):
        for change in changes.get(tick, []):
            change(batcher)
        audio = (rng.standard_normal((batcher.batch_size, FRAME_SAMPLES)) * 0.4).astype(np.float32)
        prime_until = time.monotonic() + 60 if tick % 3 == 0 else None  # some ticks prime ahead, some not
        for out in batcher.step(audio, prime_until=prime_until):
            values = astuple(out)
            seen.append((*values[:-1], None if out.pcm is None else out.pcm.tobytes()))
    return seen


def test_the_lean_tick_gives_the_same_outputs_as_the_straightforward_one(
    make_batcher: Callable[..., Batcher],
) -> None:
    reference = make_batcher(3, cls=StraightforwardBatcher)
    primer = reference.model.encode_text("You are a pirate captain who loves maps.")
    expected = play(reference, script(primer), 18)
    reference.close()

    # graph_resets on the CPU: no graph, but the state tensors moshi reassigns are updated in place.
    lean = make_batcher(3, graph_resets=True)
    assert not isinstance(lean, StraightforwardBatcher)
    got = play(lean, script(primer), 18)

    assert len(got) == len(expected) and any(o[-1] is not None for o in got), "the script publishes frames"
    for tick_out, ref_out in zip(got, expected, strict=True):
        assert tick_out == ref_out


def test_row_masks_reach_the_device_only_when_the_slot_table_changes(
    make_batcher: Callable[..., Batcher],
) -> None:
    batcher = make_batcher(3)
    silence = np.zeros((3, FRAME_SAMPLES), dtype=np.float32)
    batcher.join("a")
    batcher.join("b")
    batcher.step(silence)  # a join tick: the reset, active and first-frame masks
    batcher.step(silence)
    built = batcher.mask_builds
    for _ in range(5):
        batcher.step(silence)
    assert batcher.mask_builds == built, "a steady table reuses its device masks"

    batcher.leave(1)
    batcher.step(silence)
    assert batcher.mask_builds == built + 1, "a leave changes the active rows only"
    batcher.join("c")
    batcher.step(silence)
    batcher.step(silence)
    after_join = batcher.mask_builds
    assert after_join > built + 1
    for _ in range(3):
        batcher.step(silence)
    assert batcher.mask_builds == after_join


def test_outputs_of_a_tick_survive_the_next_tick(make_batcher: Callable[..., Batcher]) -> None:
    """The worker publishes a tick's frames while the next step runs: they must not be overwritten."""
    batcher = make_batcher(1, audio_temperature=0.0)
    batcher.join("a", (), Sampling(text_temperature=0.0))
    rng = np.random.default_rng(3)
    kept: list[tuple[RowOutput, bytes]] = []
    for _ in range(batcher.delay + 4):
        (out,) = batcher.step(rng.standard_normal((1, FRAME_SAMPLES)).astype(np.float32))
        if out.pcm is not None:
            kept.append((out, out.pcm.tobytes()))
    assert kept and all(out.pcm is not None and out.pcm.tobytes() == pcm for out, pcm in kept)
