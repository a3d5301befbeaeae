"""A session's user audio on the worker's clock: one frame per tick, silence when it is missing,
late frames dropped, bounded buffering."""

from __future__ import annotations

from services.dialogue.inputs import Arrival, InputTimeline, Take


def frame(n: int) -> bytes:
    return bytes([n % 256]) * 4


def test_frames_are_played_in_seq_order_after_the_jitter_slack() -> None:
    timeline = InputTimeline(capacity=10, jitter=1)
    assert timeline.take() == (Take.WAITING, None), "no audio yet: silence, not a missing frame"
    timeline.push(5, frame(5))
    timeline.push(7, frame(7))
    timeline.push(6, frame(6))
    assert timeline.take() == (Take.WAITING, None), "one tick of slack against jitter"
    assert [timeline.take() for _ in range(3)] == [(Take.FRAME, frame(n)) for n in (5, 6, 7)]


def test_a_slow_client_gets_silence_and_its_late_frame_is_dropped() -> None:
    timeline = InputTimeline(capacity=10, jitter=0)
    timeline.push(0, frame(0))
    assert timeline.take() == (Take.FRAME, frame(0))
    assert timeline.take() == (Take.MISSING, None), "frame 1 is not there: the tick does not wait"
    assert timeline.push(1, frame(1)) is Arrival.LATE
    timeline.push(2, frame(2))
    assert timeline.take() == (Take.FRAME, frame(2)), "the timeline kept its pace"


def test_duplicates_are_ignored() -> None:
    timeline = InputTimeline(capacity=10, jitter=0)
    assert timeline.push(3, frame(3)) is Arrival.ACCEPTED
    assert timeline.push(3, frame(99)) is Arrival.DUPLICATE
    assert timeline.take() == (Take.FRAME, frame(3))


def test_a_client_running_ahead_is_bounded_by_dropping_its_oldest_frames() -> None:
    timeline = InputTimeline(capacity=3, jitter=0)
    arrivals = [timeline.push(n, frame(n)) for n in range(5)]
    assert arrivals == [Arrival.ACCEPTED] * 3 + [Arrival.OVERFLOW] * 2
    assert [timeline.take() for _ in range(4)] == [
        (Take.FRAME, frame(2)),
        (Take.FRAME, frame(3)),
        (Take.FRAME, frame(4)),
        (Take.MISSING, None),
    ], "three frames were kept, the newest"


def test_a_restarted_numbering_re_anchors_the_timeline() -> None:
    timeline = InputTimeline(capacity=4, jitter=0)
    for n in range(100, 103):
        timeline.push(n, frame(n))
        timeline.take()
    assert timeline.push(0, frame(0)) is Arrival.ACCEPTED, "far in the past: a new numbering"
    assert timeline.take() == (Take.FRAME, frame(0))
