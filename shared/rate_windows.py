"""Request budgets counted in Redis and shared by every gateway: the `limits` library's sliding window
counters (two counters per identity, no per-request entries), under `{prefix}limits`.

What is counted, and how much is allowed, is the caller's (services/gateway/limits.py `RateLimits`).
"""

from __future__ import annotations

from limits import RateLimitItem
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from shared.bus import Bus


class RateWindows:
    def __init__(self, bus: Bus) -> None:
        # The bus's own connection pool (its timeouts, password, reconnects): limits passes it on to
        # redis-py, though it types its options as plain values.
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=bus.names.rate_limits,
            connection_pool=bus.redis.connection_pool,
        )
        self.limiter = SlidingWindowCounterRateLimiter(storage)

    async def hit(self, item: RateLimitItem, identity: str) -> bool:
        """Count one request of `identity` against `item`: False when it is over the budget."""
        return await self.limiter.hit(item, identity)

    async def reset_at(self, item: RateLimitItem, identity: str) -> float:
        """When (Unix seconds) `identity`'s window for `item` has room again."""
        return (await self.limiter.get_window_stats(item, identity)).reset_time
