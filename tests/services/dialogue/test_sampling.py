"""Per-row sampling inside the shared batch (small generated checkpoint): a seeded session samples the
same text tokens and audio codes wherever it sits and whoever shares its batch, and every sampling
parameter changes what its row samples, and only its row."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from services.dialogue.batcher import Batcher
from services.dialogue.sampling import RowSampling
from shared.audio import FRAME_SAMPLES
from shared.messages import Sampling

STEPS = 24
SEEDED = Sampling(
    text_temperature=1.0, text_top_k=200, audio_temperature=1.0, audio_top_k=500, text_seed=11, audio_seed=12
)


def user_audio(seed: int, steps: int = STEPS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(FRAME_SAMPLES) * 0.5).astype(np.float32) for _ in range(steps)]


class Recorder:
    """Every step's text tokens and audio codes of every row, as LMGen chose them."""

    def __init__(self, batcher: Batcher) -> None:
        self.text: list[torch.Tensor] = []
        self.codes: list[torch.Tensor] = []
        choose = batcher.gen.choose_text

        def text(token: torch.Tensor) -> None:
            choose(token)
            self.text.append(token.clone())

        batcher.gen.choose_text = text
        batcher.gen.on_audio_hook = lambda codes: self.codes.append(codes.clone())

    def row(self, row: int, since: int = 0) -> tuple[list[int], list[list[int]]]:
        return (
            [int(t[row]) for t in self.text[since:]],
            [c[row].tolist() for c in self.codes[since:]],
        )


def step(batcher: Batcher, feeds: dict[int, list[np.ndarray]], tick: int) -> None:
    audio = np.zeros((batcher.batch_size, FRAME_SAMPLES), dtype=np.float32)
    for row, frames in feeds.items():
        audio[row] = frames[tick % len(frames)]
    batcher.step(audio)


def test_a_seeded_session_samples_the_same_whoever_shares_its_batch(
    make_batcher: Callable[..., Batcher],
) -> None:
    voice = user_audio(seed=1)
    crowd = make_batcher(4)
    seen = Recorder(crowd)
    crowd.join("other-1", (), Sampling(text_temperature=1.5, text_top_k=500))
    crowd.join("first", (), SEEDED)
    crowd.join("other-2", (), Sampling(audio_temperature=1.2, text_seed=5))
    crowd.join("twin", (), SEEDED)
    for tick in range(STEPS):
        if tick == 8:  # a neighbour leaves and a newcomer takes its row mid-run
            crowd.leave(2)
            crowd.join("newcomer", (), Sampling(text_temperature=2.0, text_top_k=1000))
        step(crowd, {0: user_audio(seed=2), 1: voice, 2: user_audio(seed=3), 3: voice}, tick)
    first, twin = seen.row(1), seen.row(3)
    assert twin == first, "same seeds and input on two rows of one batch"
    crowd.close()

    # Elsewhere: a smaller batch, joined late on another row beside a session already talking.
    alone = make_batcher(2)
    late = Recorder(alone)
    alone.join("busy", (), Sampling(text_temperature=1.0, text_top_k=300))
    for tick in range(5):
        step(alone, {0: user_audio(seed=4)}, tick)
    alone.join("again", (), SEEDED)
    for tick in range(STEPS):
        step(alone, {0: user_audio(seed=4), 1: voice}, tick)
    assert late.row(1, since=5) == first, "same seeds and input in another batch, another row, joined late"
    alone.close()

    reseeded = make_batcher(2)
    other = Recorder(reseeded)
    reseeded.join("text", (), SEEDED.model_copy(update={"text_seed": 99}))
    reseeded.join("audio", (), SEEDED.model_copy(update={"audio_seed": 99}))
    for tick in range(STEPS):
        step(reseeded, {0: voice, 1: voice}, tick)
    assert other.row(0)[0] != first[0], "another text seed samples other text"
    (audio_seeded_text, audio_seeded_codes) = other.row(1)
    assert audio_seeded_text[0] == first[0][0] and audio_seeded_codes[0] != first[1][0], "other audio codes"


@pytest.mark.parametrize(
    ("base", "change", "stream"),
    [
        ({}, {"text_temperature": 0.0}, "text"),
        ({}, {"text_top_k": 1}, "text"),
        ({}, {"pad_mult": 10.0}, "text"),
        # Greedy text repeats itself (hot text over this small vocabulary hardly does in a few steps).
        ({"text_temperature": 0.0}, {"repetition_penalty": 3.0}, "text"),
        ({"text_temperature": 0.0}, {"repetition_penalty": 3.0, "repetition_penalty_context": 0}, "same"),
        ({}, {"text_seed": 1}, "text"),
        ({}, {"audio_temperature": 0.0}, "audio"),
        ({}, {"audio_top_k": 1}, "audio"),
        ({}, {"audio_seed": 1}, "audio"),
    ],
    ids=lambda value: ("-".join(value) or "hot") if isinstance(value, dict) else value,
)
def test_each_parameter_changes_what_its_row_samples(
    make_batcher: Callable[..., Batcher], base: dict[str, float], change: dict[str, float], stream: str
) -> None:
    """Two rows, same seeds and input, one parameter apart (an empty penalty window changes nothing)."""
    voice = user_audio(seed=6)
    batcher = make_batcher(2)
    seen = Recorder(batcher)
    batcher.join("base", (), SEEDED.model_copy(update=base))
    batcher.join("changed", (), SEEDED.model_copy(update={**base, **change}))
    for tick in range(STEPS):
        step(batcher, {0: voice, 1: voice}, tick)
    (base_text, base_audio), (text, audio) = seen.row(0), seen.row(1)
    if stream == "text":
        assert text != base_text
    elif stream == "audio":
        # The audio codes differ from the first step; the text only follows (it hears its own audio).
        assert text[0] == base_text[0] and audio[0] != base_audio[0]
    else:
        assert (text, audio) == (base_text, base_audio)


def test_the_counter_based_noise_samples_the_softmax_at_the_rows_temperature() -> None:
    """Many rows with their own seeds, one step: the tokens drawn follow softmax(logits / temperature),
    within the top-k, as LMGen's multinomial sampling would."""
    rows = 4000
    sampling = RowSampling(
        rows,
        text_card=6,
        audio_card=6,
        audio_codebooks=1,
        padding_tokens=(5, 4),
        audio_temperature=0.5,
        audio_top_k=3,
        device=torch.device("cpu"),
    )
    for row in range(rows):
        sampling.start(row, Sampling(text_seed=row, audio_seed=row))
    sampling.prepare()
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0001])).expand(rows, 1, 1, 6)

    drawn = sampling.sample_audio(logits.clone(), 0)
    kept = torch.softmax(logits[0, 0, 0, :3] / 0.5, dim=-1)
    frequencies = torch.bincount(drawn, minlength=6).float() / rows
    assert torch.allclose(frequencies[:3], kept, atol=0.03), (frequencies, kept)
    assert frequencies[3:].sum() == 0, "nothing outside the top-k"


def test_a_penalty_turned_on_mid_session_samples_the_same_whoever_shares_its_batch() -> None:
    """Recent text tokens are only recorded while some row of the batch penalizes; a row that turns its
    penalty on by an update must not depend on whether a neighbour did before (greedy text, one row's
    logits favouring token 0: the penalty flips it to token 1 only if token 0 was recorded)."""

    def first_row_after_update(neighbour_penalty: float) -> int:
        sampling = RowSampling(
            2,
            text_card=6,
            audio_card=6,
            audio_codebooks=1,
            padding_tokens=(5, 4),
            audio_temperature=0.5,
            audio_top_k=3,
            device=torch.device("cpu"),
        )
        sampling.start(0, Sampling(text_temperature=0.0, text_seed=1, audio_seed=1))
        sampling.start(1, Sampling(repetition_penalty=neighbour_penalty, text_seed=2, audio_seed=2))
        executed = torch.ones(2, dtype=torch.bool)
        for _ in range(4):
            sampling.prepare()
            logits = torch.tensor([3.0, 2.5, 0.0, 0.0, 0.0, 0.0]).expand(2, 1, 1, 6).clone()
            sampling.shape_text(logits)
            sampling.record(logits[:, 0, 0].argmax(dim=-1), executed)
            sampling.advance(executed)
        sampling.set(0, Sampling(text_temperature=0.0, repetition_penalty=3.0))
        sampling.prepare()
        logits = torch.tensor([3.0, 2.5, 0.0, 0.0, 0.0, 0.0]).expand(2, 1, 1, 6).clone()
        sampling.shape_text(logits)
        return int(logits[0, 0, 0].argmax())

    assert first_row_after_update(neighbour_penalty=3.0) == first_row_after_update(neighbour_penalty=1.0)
