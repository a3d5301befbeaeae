"""What a session is primed with: the persona first, then the tail of what it said, within a bound."""

from __future__ import annotations

from services.dialogue.priming import (
    ASSISTANT,
    ROLLOVER_SLACK_FRAMES,
    primer_tokens,
    rollover_threshold,
    spoken_so_far,
)


def words(text: str) -> list[int]:
    """A stand-in tokenizer: one token per word (the real one is tested through the batcher)."""
    return [len(w) for w in text.split()]


def test_the_primer_comes_first_then_the_most_recent_speech() -> None:
    tokens = primer_tokens(words, "a bb", "c dd eee ffff", limit=4)
    assert tokens == [1, 2, 3, 4]


def test_a_primer_longer_than_the_bound_is_cut_at_its_end() -> None:
    assert primer_tokens(words, "a bb ccc dddd", "ee", limit=2) == [1, 2]


def test_no_primer_no_priming() -> None:
    assert primer_tokens(words, "  ", "", limit=10) == []


def test_only_the_models_own_words_are_replayed() -> None:
    turns = [
        {"speaker": ASSISTANT, "text": " Hello"},
        {"speaker": "user", "text": "hi there"},
        {"speaker": ASSISTANT, "text": " there"},
    ]
    assert spoken_so_far(turns) == "Hello there"


def test_a_rollover_leaves_room_to_prime_the_fresh_state_before_the_context_fills() -> None:
    margin = 66 + ROLLOVER_SLACK_FRAMES
    assert rollover_threshold(None, 3000, primer_bound=66) == 3000 - margin
    assert rollover_threshold(None, 100, primer_bound=66) is None, "a context under twice the margin: off"
    assert rollover_threshold(None, None, primer_bound=66) is None, "no fixed context, nothing to roll over"
    assert rollover_threshold(40, 100, primer_bound=66) == 40, "set: as set"
    assert rollover_threshold(0, 3000, primer_bound=66) is None, "0: off"
