"""What a session is primed with: the persona first, then the tail of what it said, within a bound."""

from __future__ import annotations

from services.dialogue.priming import ASSISTANT, primer_tokens, spoken_so_far


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
