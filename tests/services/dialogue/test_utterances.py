"""Moshi's text pieces grouped into transcript entries (`services/dialogue/utterances.py`)."""

from __future__ import annotations

from services.dialogue.utterances import MAX_UTTERANCE_FRAMES, UtteranceBuilder


def test_a_pause_closes_an_utterance_and_the_next_words_open_another() -> None:
    builder = UtteranceBuilder(pause_frames=3)
    assert builder.push(0, " Hello", at=1.0) is None
    assert builder.push(1, " there", at=1.1) is None
    assert [builder.push(seq, "") for seq in (2, 3)] == [None, None]
    closed = builder.push(4, "")
    assert closed is not None and closed.record()["text"] == "Hello there"
    assert (closed.first_seq, closed.last_seq) == (0, 1)
    assert builder.current is None


def test_an_utterance_without_a_pause_closes_at_a_word_past_its_maximum_length() -> None:
    """Moshi talking on and on: the utterance in progress (rewritten to the session hash on every frame
    with text) stays bounded, and is cut between words, never inside one."""
    builder = UtteranceBuilder(pause_frames=3)
    closed = []
    for seq in range(3 * MAX_UTTERANCE_FRAMES):
        piece = " word" if seq % 2 == 0 else "ing"  # every other piece goes on the word before it
        if (done := builder.push(seq, piece)) is not None:
            closed.append(done)
    assert len(closed) == 2, "one entry per maximum length"
    for done in closed:
        assert done.last_seq - done.first_seq <= MAX_UTTERANCE_FRAMES
        assert done.record()["text"].startswith("word") and done.record()["text"].endswith("ing")
    assert closed[1].first_seq == closed[0].last_seq + 1, "nothing said is lost between them"
    assert builder.current is not None and builder.current.first_seq == closed[1].last_seq + 1


def test_text_without_spaces_between_words_is_cut_at_twice_the_maximum_length() -> None:
    builder = UtteranceBuilder(pause_frames=3)
    closed = [
        done for seq in range(5 * MAX_UTTERANCE_FRAMES) if (done := builder.push(seq, "語")) is not None
    ]
    assert len(closed) == 2 and all(d.last_seq - d.first_seq < 2 * MAX_UTTERANCE_FRAMES for d in closed)
