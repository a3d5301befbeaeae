"""Moshi's text pieces grouped into utterances: what the transcript records, one entry each.

An utterance is what Moshi says between pauses: it closes after `pause_frames` frames without text (Moshi
leaves 3-6 frames between words while it talks), at a word past `MAX_UTTERANCE_FRAMES`, or when the
session ends. Time is counted in frames, never the wall clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.dialogue.priming import ASSISTANT

# Past this length an utterance closes at the next word even without a pause (Moshi telling a long story):
# the one in progress is written to the session hash on every frame with text (for a worker taking the
# session over), so its size is what each of those writes costs; and a transcript entry stays readable.
MAX_UTTERANCE_FRAMES = 375  # 30 s


@dataclass
class Utterance:
    first_seq: int
    last_seq: int
    started_at: float
    pieces: list[str] = field(default_factory=list)
    ended_at: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()

    def record(self) -> dict[str, Any]:
        """The transcript entry (live list and durable log alike)."""
        return {
            "speaker": ASSISTANT,
            "text": self.text,
            "seq": self.first_seq,
            "end_seq": self.last_seq,
            "t": self.started_at,
            "t_end": self.ended_at or self.started_at,
        }


class UtteranceBuilder:
    def __init__(self, pause_frames: int) -> None:
        self.pause_frames = pause_frames
        self.current: Utterance | None = None
        self._quiet = 0

    def push(self, seq: int, text: str, at: float | None = None) -> Utterance | None:
        """One frame's text piece ('' for none); returns the utterance this frame closed, if any."""
        at = at if at is not None else time.time()
        if text:
            current = self.current
            length = seq - current.first_seq if current is not None else 0
            # At a piece that begins a word; at any, past twice the length (a script without spaces).
            long = length >= MAX_UTTERANCE_FRAMES and (
                text[:1].isspace() or length >= 2 * MAX_UTTERANCE_FRAMES
            )
            closed = self.flush() if long else None
            if self.current is None:
                self.current = Utterance(seq, seq, at)
            self.current.pieces.append(text)
            self.current.last_seq, self.current.ended_at = seq, at
            self._quiet = 0
            return closed
        if self.current is None:
            return None
        self._quiet += 1
        return self.flush() if self._quiet >= self.pause_frames else None

    def flush(self) -> Utterance | None:
        """Close the utterance in progress (the session ends)."""
        done, self.current, self._quiet = self.current, None, 0
        return done if done is not None and done.text else None
