"""The lean tick gives exactly what the straightforward one gave: a reference batcher that steps the way
the batcher used to (fresh tensors each tick, blocking copies, masks rebuilt every step, eager resets)
runs the same sessions, joins, leaves, primers and samples as the lean one; and the lean one copies its
row masks to the device only when the slot table changes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import astuple
from typing import Any

import numpy as np
import torch

from services.dialogue.batcher import Batcher, Phase, RowOutput
from shared.audio import FRAME_SAMPLES, FloatAudio
from shared.messages import Sampling

SAMPLING = Sampling(text_temperature=0.8, text_top_k=40, audio_temperature=0.8)


class ReferenceBatcher(Batcher):
    """The step as it was written before the tick was made lean (kept here as the specification)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ref_force_mask = torch.zeros(self.batch_size, dtype=torch.bool)
        self._ref_force_tokens = torch.zeros(self.batch_size, dtype=torch.long)

    def _live_step(self, audio: FloatAudio) -> list[RowOutput]:
        return self._step(audio, priming_only=False)

    def _priming_step(self) -> None:
        self._step(np.zeros((self.batch_size, FRAME_SAMPLES), dtype=np.float32), priming_only=True)

    def _step(self, audio: FloatAudio, priming_only: bool) -> list[RowOutput]:
        slots = [s for s in self.active() if s.forced or not priming_only]
        phases = {s.row: Phase.IDLE for s in self.slots} | {s.row: s.phase for s in slots}
        with self._compile_mode():
            self._reset_joined_rows()
            live = np.array([phases[row] is Phase.LIVE for row in range(self.batch_size)])
            pcm = torch.from_numpy(np.where(live[:, None], audio, 0.0).astype(np.float32))[:, None, :]
            tokens, out = self._reference_models(pcm.to(self.model.device), phases)
        outputs = [self._output(slot, phases[slot.row], tokens, out) for slot in slots]
        for slot in slots:
            slot.age += 1
        return outputs

    def _reference_models(
        self, pcm: torch.Tensor, phases: dict[int, Phase]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mimi, device = self.model.mimi, self.model.device
        active = torch.tensor([phases[r] is not Phase.IDLE for r in range(self.batch_size)], device=device)
        first = torch.tensor([phases[s.row] is not Phase.IDLE and s.age == 0 for s in self.slots])
        first = first.to(device)
        mimi.set_exec_mask(active)
        self.gen.set_exec_mask(active)
        codes = mimi.encode(pcm)
        if bool(first.any()):
            mimi.reset_streaming(first)
        self._prepare_forcing()
        tokens = self.gen.step(codes)
        assert tokens is not None
        generated = active & (tokens[:, 1:, 0] >= 0).all(dim=1)
        mimi.set_exec_mask(generated)
        out = mimi.decode(tokens[:, 1:].clamp(min=0))
        return tokens[:, 0, 0].cpu(), out[:, 0].float().cpu()

    def _reset_joined_rows(self) -> None:
        joined = [s for s in self.slots if s.needs_reset]
        if not joined:
            return
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        for slot in joined:
            mask[slot.row] = True
            slot.needs_reset = False
        self.model.mimi.reset_streaming(mask.to(self.model.device))
        self.gen.reset_streaming(mask.to(self.model.device))

    def _prepare_forcing(self) -> None:
        tokens = [s.forced.popleft() if s.session_id is not None and s.forced else -1 for s in self.slots]
        self._forcing = any(t >= 0 for t in tokens)
        if self._forcing:
            forced = torch.tensor(tokens)
            self._ref_force_mask = (forced >= 0).to(self.model.device)
            self._ref_force_tokens = forced.clamp(min=0).to(self.model.device)

    def _force_text(self, text_token: torch.Tensor) -> None:
        if self._forcing:
            text_token.copy_(torch.where(self._ref_force_mask, self._ref_force_tokens, text_token))


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
    reference = make_batcher(3, cls=ReferenceBatcher)
    primer = reference.model.encode_text("You are a pirate captain who loves maps.")
    expected = play(reference, script(primer), 18)
    reference.close()

    # graph_resets on the CPU: no graph, but the state tensors moshi reassigns are updated in place.
    lean = make_batcher(3, graph_resets=True)
    assert not isinstance(lean, ReferenceBatcher)
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
