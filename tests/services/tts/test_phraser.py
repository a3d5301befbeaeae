"""Phrase grouping: what Pocket TTS is asked to say, and when, from Moshi's text pieces."""

from __future__ import annotations

from services.tts.phraser import Phrase, Phraser, PhraseRules


def feed(phraser: Phraser, pieces: list[str], start_seq: int = 0) -> list[Phrase]:
    """One piece per 80 ms frame ('' = a frame without text), as the dialogue service emits them."""
    return [p for seq, piece in enumerate(pieces, start_seq) for p in phraser.push(seq, piece)]


def test_sentence_punctuation_ends_a_phrase_at_once() -> None:
    phrases = feed(Phraser(PhraseRules()), [" Hello", " there", ".", " How", " are", " you", "?"])
    assert [p.text for p in phrases] == ["Hello there.", "How are you?"]
    assert [(p.first_seq, p.last_seq) for p in phrases] == [(0, 2), (3, 6)]
    assert [p.phrase_id for p in phrases] == [0, 1]


def test_subword_pieces_join_into_words() -> None:
    phrases = feed(Phraser(PhraseRules()), [" Un", "believ", "able", " weather", "!"])
    assert phrases[0].text == "Unbelievable weather!"
    assert phrases[0].words == 2


def test_a_comma_ends_a_phrase_only_once_it_has_enough_words() -> None:
    rules = PhraseRules(min_words_at_comma=3, first_max_words=8, max_words=8)
    assert feed(Phraser(rules), [" Well", ","]) == []
    phrases = feed(Phraser(rules), [" So", " I", " think", ",", " maybe"])
    assert [p.text for p in phrases] == ["So I think,"]


def test_a_pause_in_moshis_text_speaks_the_pending_words() -> None:
    phraser = Phraser(PhraseRules(pause_frames=3, first_max_words=8, max_words=8))
    assert feed(phraser, [" I", " see", "", ""]) == []
    (phrase,) = phraser.push(4, "")  # the third frame without text after " see" (seq 1)
    assert phrase.text == "I see"
    assert phraser.push(5, "") == [], "nothing pending, nothing to say"


def test_the_word_budget_cuts_a_long_sentence_between_words() -> None:
    phraser = Phraser(PhraseRules(max_words=4, first_max_words=4))
    pieces = [" one", " two", " three", " fo", "ur", " five", " six", " seven", " eight", " nine", "."]
    phrases = feed(phraser, pieces)
    assert [p.text for p in phrases] == ["one two three four", "five six seven eight", "nine."]


def test_a_phrase_at_its_budget_ends_with_the_first_frame_without_text() -> None:
    phraser = Phraser(PhraseRules(max_words=3, first_max_words=3, pause_frames=8))
    assert feed(phraser, [" one", "", " two", "", " thr", "ee"]) == [], "the last word may go on"
    (phrase,) = phraser.push(6, "")
    assert (phrase.text, phrase.last_seq) == ("one two three", 5)


def test_the_first_phrase_of_a_turn_is_short_so_its_audio_starts_early() -> None:
    phraser = Phraser(PhraseRules(max_words=4, first_max_words=2, pause_frames=3))
    talking = [" a", "", " b", "", " c", "", " d", "", " e", "", " f", "", " g"]
    assert [p.text for p in feed(phraser, talking)] == ["a b", "c d e f"]
    after_a_pause = ["", "", "", " h", " i", " j"]
    assert [p.text for p in feed(phraser, after_a_pause, start_seq=13)] == ["g", "h i"]


def test_punctuation_alone_is_not_a_phrase() -> None:
    phraser = Phraser(PhraseRules(pause_frames=2))
    assert feed(phraser, ["...", "", "", "?"]) == []


def test_clear_drops_the_pending_words_and_keeps_numbering() -> None:
    phraser = Phraser(PhraseRules())
    feed(phraser, [" Hi", "."])
    feed(phraser, [" and", " then"], start_seq=2)
    assert phraser.clear() == 2
    (phrase,) = feed(phraser, [" Okay", "."], start_seq=4)
    assert (phrase.text, phrase.phrase_id) == ("Okay.", 1)


def test_flush_closes_what_is_pending_when_the_dialogue_ends() -> None:
    phraser = Phraser(PhraseRules())
    feed(phraser, [" See", " you"])
    assert [p.text for p in phraser.flush()] == ["See you"]
