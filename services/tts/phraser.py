"""Groups Moshi's text pieces into phrases worth speaking, as they arrive.

Moshi emits one text piece (a SentencePiece token, '▁' turned into a space) or nothing per 80 ms frame;
while it talks a word comes every 4-6 frames. Waiting for whole sentences would hold the first audio back
by seconds, speaking every piece alone would sound broken. A phrase ends:
- on sentence punctuation (. ! ? …), or on , ; : once it has `min_words_at_comma` words;
- on a pause: `pause_frames` frames in a row without text after some words;
- on the word budget: it has `max_words` and its last word is complete (a frame without text follows,
  or the next word starts); the first phrase after a pause
  (a new turn) has the smaller `first_max_words`, so its audio starts early; the phrases after it are
  synthesised while it plays, so they can be longer and sound more natural.

Time comes from the frames' sequence numbers, never the wall clock, so tests run it instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SENTENCE_END = ".!?\u2026"
CLAUSE_END = ",;:\u2013\u2014"
CLOSERS = "\"')]\u201d\u2019\u00bb"


@dataclass(frozen=True)
class PhraseRules:
    max_words: int = 4
    first_max_words: int = 2
    min_words_at_comma: int = 3
    pause_frames: int = 8


@dataclass(frozen=True)
class Phrase:
    phrase_id: int
    text: str
    words: int
    first_seq: int  # the dialogue frame of its first text piece
    last_seq: int  # the dialogue frame of its last text piece


@dataclass
class _Pending:
    pieces: list[str] = field(default_factory=list)
    first_seq: int = -1
    last_seq: int = -1

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()

    @property
    def words(self) -> int:
        return len(self.text.split())


class Phraser:
    def __init__(self, rules: PhraseRules, next_phrase_id: int = 0) -> None:
        self.rules = rules
        self.next_phrase_id = next_phrase_id
        self._pending = _Pending()
        self._budget = rules.first_max_words
        self._last_text_seq: int | None = None  # None: nothing said yet, or a flush; the next is a turn

    def push(self, seq: int, text: str) -> list[Phrase]:
        """Feed one dialogue frame (its text piece, or '' for none); returns the phrases it completed."""
        if not text.strip():
            # A frame without text also tells that the last word is complete (Moshi emits the pieces of
            # one word in consecutive frames): a phrase at its budget need not wait for the next word.
            full = self._pending.words >= self._budget
            if self._pending.pieces and (full or seq - self._pending.last_seq >= self.rules.pause_frames):
                return self._close()
            return []
        done: list[Phrase] = []
        starts_word = text[0].isspace() or not self._pending.pieces
        if starts_word and self._pending.words >= self._budget:
            done += self._close()
        if not self._pending.pieces:
            self._pending.first_seq = seq
            self._budget = self.rules.first_max_words if self._turn_starts(seq) else self.rules.max_words
        self._pending.pieces.append(text)
        self._pending.last_seq = seq
        self._last_text_seq = seq
        if self._ends_phrase(text):
            done += self._close()
        return done

    def flush(self) -> list[Phrase]:
        """Close whatever is pending (the dialogue ended)."""
        return self._close()

    def clear(self) -> int:
        """Drop the pending words (barge-in); returns how many were dropped. What comes next is a turn."""
        words = self._pending.words
        self._pending = _Pending()
        self._last_text_seq = None
        return words

    def _turn_starts(self, seq: int) -> bool:
        return self._last_text_seq is None or seq - self._last_text_seq >= self.rules.pause_frames

    def _ends_phrase(self, piece: str) -> bool:
        tail = piece.rstrip().rstrip(CLOSERS)
        if not tail:
            return False
        if tail[-1] in SENTENCE_END:
            return True
        return tail[-1] in CLAUSE_END and self._pending.words >= self.rules.min_words_at_comma

    def _close(self) -> list[Phrase]:
        pending, self._pending = self._pending, _Pending()
        text = pending.text
        if not any(c.isalnum() for c in text):
            return []  # punctuation alone has nothing to say
        phrase = Phrase(self.next_phrase_id, text, len(text.split()), pending.first_seq, pending.last_seq)
        self.next_phrase_id += 1
        return [phrase]
