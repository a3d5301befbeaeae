"""Whether a new conversation may start now, checked before it touches a worker:
- Redis memory: above CHORUS_REDIS_MAX_MEMORY_SHARE of `maxmemory`, new sessions are refused (every live
  session's writes would start failing once Redis is full, with `noeviction`);
- the placement queue: at most CHORUS_PLACEMENT_QUEUE_MAX conversations of this gateway wait for a slot.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.bus import Bus
from shared.errors import NoCapacity, ServiceUnavailable

log = logging.getLogger(__name__)

MEMORY_CHECK_S = 1.0  # INFO memory at most once a second, whatever the rate of new sessions


class RedisMemoryFull(ServiceUnavailable):
    code = "redis_memory_full"
    title = "Redis memory nearly full"


class Admission:
    def __init__(self, bus: Bus, settings: GatewaySettings) -> None:
        self.bus = bus
        self.max_share = settings.redis_max_memory_share
        self.queue_max = settings.placement_queue_max
        self.waiting = 0
        self._share = 0.0
        self._checked_at = float("-inf")

    async def memory_share(self) -> float:
        """Used memory over `maxmemory` (0 when Redis has no limit)."""
        if time.monotonic() - self._checked_at > MEMORY_CHECK_S:
            self._share = (await self.bus.memory_use()).share
            self._checked_at = time.monotonic()
        return self._share

    async def check_memory(self) -> None:
        share = await self.memory_share()
        if share > self.max_share:
            metrics.SESSIONS_REJECTED.labels(reason="redis_memory").inc()
            log.warning("new session refused: Redis memory at %.0f%%", 100 * share)
            raise RedisMemoryFull(
                f"Redis is using {share:.0%} of its memory limit (new sessions stop at "
                f"{self.max_share:.0%}); try again when sessions have ended",
                memory_share=round(share, 3),
            )

    @contextlib.asynccontextmanager
    async def in_queue(self) -> AsyncIterator[None]:
        """A place among the conversations waiting for a dialogue slot (NoCapacity when there is none)."""
        if self.waiting >= self.queue_max:
            metrics.SESSIONS_REJECTED.labels(reason="queue_full").inc()
            raise NoCapacity(
                f"{self.waiting} conversations are already waiting for a slot; try again shortly"
            )
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1
