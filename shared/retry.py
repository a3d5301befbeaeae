"""Surviving a Redis outage: which errors are worth retrying, and one helper that keeps a long-lived loop
running through them.

Every long-lived loop of every service (placement, control tails, ticks, routing, heartbeats) runs under
`keep_running`: a Redis restart, a dropped connection, a timeout or `OOM command not allowed` makes the
loop wait (exponential backoff with jitter, capped low so new sessions work within seconds of Redis being
back) and start again. Anything else is a bug and propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

# Every error of the Redis client (an outage or a refused command): what services catch, since none of
# them imports `redis` (the bus and the stores of `shared/` hide it).
StoreError = RedisError

# Server replies that mean "not now" rather than "wrong": out of memory (noeviction), still loading its
# data after a restart, a replica that is read-only or lost its master, a busy script, a cluster asking
# to retry.
_TRANSIENT_REPLIES = {"OOM", "LOADING", "READONLY", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN"}


def reply_code(exc: ResponseError) -> str:
    """An error reply's code (`OOM`, `LOADING`, ...), also when a script's call got it: Redis 6 wraps
    those as "Error running script (call to f_...): @user_script:2: -OOM command not allowed ..."."""
    message = str(exc)
    if message.startswith("Error running script") and " -" in message:
        message = message.rsplit(" -", 1)[1]
    return message.split(" ", 1)[0].upper()


def is_retryable(exc: BaseException) -> bool:
    """A Redis error that a later attempt may not meet: the connection, a timeout, or a transient reply."""
    # redis-py wraps socket errors in its own classes; a bare ConnectionError (reset, refused) may still
    # escape from a half-closed socket.
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | BusyLoadingError | ConnectionError):
        return True
    return isinstance(exc, ResponseError) and reply_code(exc) in _TRANSIENT_REPLIES


class Backoff:
    """Exponential delays with full jitter: first..cap seconds. `reset()` after a healthy stretch."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 2.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self._next = first_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap_s)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self.first_s


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, returning early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


HEALTHY_RUN_S = 10.0  # a loop that ran this long before failing starts again from the shortest delay


async def keep_running(
    name: str,
    loop: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    *,
    backoff: Backoff | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Run `loop()` until it returns or `stop` is set; restart it after retryable Redis errors.

    The loop keeps its own state across restarts (cursors, sessions): it only has to be safe to call again.
    """
    backoff = backoff or Backoff()
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            await loop()
            return
        except Exception as exc:
            if not is_retryable(exc):
                raise
            if time.monotonic() - started > HEALTHY_RUN_S:
                backoff.reset()
                failures = 0
            failures += 1
            delay = backoff.next_delay()
            # The first failure of an outage is a warning; while it lasts, every tenth says it still does.
            level = logging.WARNING if failures % 10 == 1 else logging.DEBUG
            log.log(
                level,
                "%s: Redis unavailable (%s: %s), retrying in %.2fs",
                name,
                type(exc).__name__,
                exc,
                delay,
                extra={"loop": name, "failures": failures, **(extra or {})},
            )
            await sleep_unless_stopped(stop, delay)
