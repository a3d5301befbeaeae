"""Moshi's text pieces grouped into utterances: what the transcript records, one entry each.

An utterance is what Moshi says between pauses: it closes after `pause_frames` frames without text (Moshi
leaves 3-6 frames between words while it talks), or when the session ends. Time is counted in frames,
never the wall clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.dialogue.priming import ASSISTANT


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
            if self.current is None:
                self.current = Utterance(seq, seq, at)
            self.current.pieces.append(text)
            self.current.last_seq, self.current.ended_at = seq, at
            self._quiet = 0
            return None
        if self.current is None:
            return None
        self._quiet += 1
        return self.flush() if self._quiet >= self.pause_frames else None

    def flush(self) -> Utterance | None:
        """Close the utterance in progress (the session ends)."""
        done, self.current, self._quiet = self.current, None, 0
        return done if done is not None and done.text else None
