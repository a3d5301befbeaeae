"""The dialogue worker's clock: ticks at a fixed interval, and how much of a tick priming may take."""

from __future__ import annotations

import asyncio
import contextlib
import time

from shared import metrics

PRIME_SHARE_LIVE = 0.75  # of a tick, spent on priming steps at most while live sessions need theirs
PRIME_SHARE_IDLE = 0.95


class TickClock:
    """Paces ticks at a fixed interval. A late tick is followed at once; one more than a whole interval
    late re-bases the clock (no burst of catch-up ticks)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = time.monotonic()

    def restart(self) -> None:
        self._next = time.monotonic()

    async def wait(self, stop: asyncio.Event) -> None:
        self._next += self.interval_s
        delay = self._next - time.monotonic()
        if delay < 0:
            metrics.TICK_OVERRUNS.labels(service="dialogue").inc()
            if delay < -self.interval_s:
                self._next = time.monotonic()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def prime_deadline(started: float, interval_s: float, *, live: bool) -> float:
    """Until when a tick's spare time may go on priming steps: most of the tick while a live session
    needs the next one on time, nearly all of it while none is live (a session taken over after a
    failover is primed as fast as the model steps: its user is waiting)."""
    return started + (PRIME_SHARE_LIVE if live else PRIME_SHARE_IDLE) * interval_s
