"""The batched step on the real Moshi classes (small generated checkpoint): rows are independent
sessions, joining and leaving touch only their row, priming reaches the model, sampling is per row."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from services.dialogue.batcher import Batcher, Phase, RowOutput
from shared.audio import FRAME_SAMPLES
from shared.messages import Sampling

GREEDY = Sampling(text_temperature=0.0, text_top_k=25, audio_temperature=0.0)
STEPS = 12


def user_audio(seed: int, steps: int = STEPS) -> list[np.ndarray]:
    """A deterministic 'user' voice: noise frames, different per seed."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(FRAME_SAMPLES) * 0.5).astype(np.float32) for _ in range(steps)]


def run(batcher: Batcher, feeds: dict[int, list[np.ndarray]], steps: int) -> dict[int, list[RowOutput]]:
    """Step `steps` times, feeding each row its own frames; returns each row's outputs."""
    outputs: dict[int, list[RowOutput]] = {row: [] for row in feeds}
    for t in range(steps):
        audio = np.zeros((batcher.batch_size, FRAME_SAMPLES), dtype=np.float32)
        for row, frames in feeds.items():
            audio[row] = frames[min(t, len(frames) - 1)]
        for out in batcher.step(audio):
            outputs.setdefault(out.row, []).append(out)
    return outputs


def tokens(outputs: list[RowOutput]) -> list[int | None]:
    return [o.text_token for o in outputs]


def test_rows_of_one_batch_are_independent_sessions(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(4, audio_temperature=0.0)
    feeds = {row: user_audio(seed=row) for row in range(4)}
    for row in range(4):
        batcher.join(f"s{row}", (), GREEDY)
    first = run(batcher, feeds, STEPS)

    # Same sessions again, except row 2's session leaves mid-run and another one takes its row.
    for row in range(4):
        batcher.leave(row)
        batcher.join(f"s{row}", (), GREEDY)
    second = run(batcher, feeds, 5)
    batcher.leave(2)
    assert batcher.join("newcomer", (), GREEDY) == 2
    rest = run(batcher, {row: frames[5:] for row, frames in feeds.items()}, STEPS - 5)

    for row in (0, 1, 3):
        again = second[row] + rest[row]
        assert tokens(again) == tokens(first[row]), f"row {row} was disturbed by row 2's reset"
        assert all(
            np.array_equal(a.pcm, b.pcm) for a, b in zip(again, first[row], strict=True) if a.pcm is not None
        )
    assert tokens(first[0]) != tokens(first[1]), "different users should get different replies"


def test_a_session_joining_mid_run_starts_from_a_fresh_row(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(2, audio_temperature=0.0)
    voice = user_audio(seed=7)
    batcher.join("alone", (), GREEDY)
    reference = run(batcher, {0: voice}, STEPS)[0]
    batcher.leave(0)

    # The other row talks for a while; then the same session joins row 0, which held someone else.
    batcher.join("busy", (), GREEDY)
    batcher.join("other", (), GREEDY)
    run(batcher, {0: user_audio(seed=8), 1: user_audio(seed=9)}, 6)
    batcher.leave(0)
    assert batcher.join("late", (), GREEDY) == 0
    joined = run(batcher, {0: voice, 1: user_audio(seed=9)}, STEPS)[0]

    assert tokens(joined) == tokens(reference)
    assert joined[0].went_live and joined[0].text_token is None, "the first frame is still in the delay"
    assert all(o.pcm is not None and o.pcm.shape == (FRAME_SAMPLES,) for o in joined[batcher.delay :])


def test_a_session_that_left_gets_no_output_and_frees_its_row(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(2)
    batcher.join("stays")
    batcher.join("leaves")
    run(batcher, {0: user_audio(1), 1: user_audio(2)}, 3)
    batcher.leave(1)
    outputs = run(batcher, {0: user_audio(1), 1: user_audio(2)}, 3)
    assert set(outputs) == {0, 1} and outputs[1] == []
    assert batcher.free_rows() == [1]


def test_priming_forces_the_primer_into_the_models_text_stream(
    make_batcher: Callable[..., Batcher],
) -> None:
    batcher = make_batcher(2, audio_temperature=0.0)
    primer = batcher.model.encode_text("You are a pirate captain.")
    written: list[torch.Tensor] = []
    forcing_hook = batcher.gen.on_text_hook
    assert forcing_hook is not None

    def spy(text_token: torch.Tensor) -> None:  # LMGen writes this tensor into the model's context
        forcing_hook(text_token)
        written.append(text_token.clone())

    batcher.gen.on_text_hook = spy
    primed = batcher.join("primed", primer, GREEDY)
    plain = batcher.join("plain", (), GREEDY)
    silence = [np.zeros(FRAME_SAMPLES, dtype=np.float32)] * (len(primer) + 4)
    outputs = run(batcher, {primed: silence, plain: silence}, len(primer) + 4)

    assert [int(t[primed]) for t in written[: len(primer)]] == primer
    assert [o.phase for o in outputs[primed][: len(primer)]] == [Phase.PRIMING] * len(primer)
    live = [o for o in outputs[primed] if o.went_live]
    assert len(live) == 1 and live[0] is outputs[primed][len(primer)], "ready right after the primer"
    assert all(o.text_token is None for o in outputs[primed][: len(primer) + batcher.delay])
    # Same (silent) input, same weights: only the forced context makes the two rows' next tokens differ.
    assert [int(t[primed]) for t in written[len(primer) :]] != [int(t[plain]) for t in written[len(primer) :]]


def test_text_sampling_is_applied_per_row(make_batcher: Callable[..., Batcher]) -> None:
    torch.manual_seed(0)
    batcher = make_batcher(3, audio_temperature=0.0)
    voice = user_audio(seed=3, steps=30)
    batcher.join("greedy", (), GREEDY)
    batcher.join("top1", (), Sampling(text_temperature=1.5, text_top_k=1, audio_temperature=0.0))
    batcher.join("wild", (), Sampling(text_temperature=2.0, text_top_k=1000, audio_temperature=0.0))
    outputs = run(batcher, {0: voice, 1: voice, 2: voice}, 30)
    assert tokens(outputs[1]) == tokens(outputs[0]), "top-k 1 is greedy whatever the temperature"
    assert tokens(outputs[2]) != tokens(outputs[0]), "a hot row samples, the greedy one does not"


def test_spare_time_primes_ahead_without_moving_the_live_rows(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(2, audio_temperature=0.0)
    voice = user_audio(seed=5)
    batcher.join("talking", (), GREEDY)
    reference = run(batcher, {0: voice}, STEPS)[0]

    batcher.leave(0)
    batcher.join("talking", (), GREEDY)
    primer = batcher.model.encode_text("You are a calm and curious teacher.")
    batcher.join("priming", primer, GREEDY)
    talking: list[RowOutput] = []
    for t in range(STEPS):
        audio = np.zeros((2, FRAME_SAMPLES), dtype=np.float32)
        audio[0] = voice[t]
        outputs = batcher.step(audio, prime_until=time.monotonic() + 60)  # plenty of spare time
        talking += [o for o in outputs if o.row == 0]
        if t == 0:
            assert not batcher.slots[1].forced, "the whole primer went in during the first tick"
    assert tokens(talking) == tokens(reference), "extra priming steps must not advance the live row"
