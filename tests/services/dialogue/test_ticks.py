"""The dialogue worker's clock: fixed-interval ticks without catch-up bursts, and the priming budget."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from services.dialogue.ticks import TickClock, prime_deadline


def overruns() -> float:
    return REGISTRY.get_sample_value("chorus_tick_overruns_total", {"service": "dialogue"}) or 0.0


async def test_a_tick_late_by_more_than_an_interval_is_followed_at_once_then_the_clock_starts_again() -> None:
    clock, stop = TickClock(0.2), asyncio.Event()
    before = overruns()
    await asyncio.sleep(0.6)  # a stalled step: three intervals late
    await clock.wait(stop)
    await clock.wait(stop)  # re-based: this one is on time, not a catch-up tick
    assert overruns() - before == 1


def test_priming_takes_most_of_a_tick_while_a_session_is_live_and_nearly_all_while_none_is() -> None:
    assert prime_deadline(100.0, 0.08, live=True) == pytest.approx(100.06)
    assert prime_deadline(100.0, 0.08, live=False) == pytest.approx(100.076)
