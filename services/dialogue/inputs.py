"""A session's user audio on the worker's clock: exactly one frame per tick, whatever the network does.

Frames are placed by their `seq` on the session's own timeline, which starts at the first frame that
arrives (plus `jitter` ticks of slack). Each tick takes the frame due now; if it has not arrived, the
tick gets silence (the model never waits on one slow client), and when it does arrive it is late: it
is dropped, never played out of place, so latency cannot pile up. A client far ahead or far behind
(a reconnect that restarted its numbering) re-anchors the timeline.
"""

from __future__ import annotations

import enum


class Arrival(enum.Enum):
    ACCEPTED = "accepted"
    LATE = "late"  # its tick has passed (it was filled with silence)
    DUPLICATE = "duplicate"
    OVERFLOW = "overflow"  # accepted, but the oldest buffered frame had to go


class Take(enum.Enum):
    FRAME = "frame"
    MISSING = "missing"  # the due frame has not arrived: silence
    WAITING = "waiting"  # no audio yet, or the jitter slack is still filling: silence


class InputTimeline:
    def __init__(self, capacity: int, jitter: int = 1) -> None:
        self.capacity = capacity
        self.jitter = jitter
        self._frames: dict[int, bytes] = {}
        self._next_seq: int | None = None  # the seq due at the next tick
        self._slack = jitter

    def push(self, seq: int, pcm: bytes) -> Arrival:
        if self._next_seq is None or not -self.capacity <= seq - self._next_seq < 2 * self.capacity:
            self._anchor(seq)
        assert self._next_seq is not None
        if seq < self._next_seq:
            return Arrival.LATE
        if seq in self._frames:
            return Arrival.DUPLICATE
        self._frames[seq] = pcm
        if len(self._frames) <= self.capacity:
            return Arrival.ACCEPTED
        # The client runs ahead of real time: skip to the oldest frames we keep (bounded latency).
        oldest = min(self._frames)
        del self._frames[oldest]
        self._next_seq = max(self._next_seq, oldest + 1)
        return Arrival.OVERFLOW

    def take(self) -> tuple[Take, bytes | None]:
        """The frame due this tick (advancing the timeline), or why there is none."""
        if self._next_seq is None or self._slack > 0:
            if self._next_seq is not None:
                self._slack -= 1
            return Take.WAITING, None
        pcm = self._frames.pop(self._next_seq, None)
        self._next_seq += 1
        return (Take.FRAME, pcm) if pcm is not None else (Take.MISSING, None)

    def _anchor(self, seq: int) -> None:
        self._frames.clear()
        self._next_seq = seq
        self._slack = self.jitter
