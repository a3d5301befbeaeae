"""The one way the suite waits for something another task or process does: poll a condition until it
holds, and fail with what was awaited, the bound, and the last thing seen. The bound guards against a
hang; where a test claims a bound (chaos: "within the lease"), it passes that bound and says so in `what`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

Check = Callable[[], T | Awaitable[T]]


def _failure(what: str, timeout_s: float, last: object, seen: Callable[[], object] | None) -> str:
    return f"{what}: not within {timeout_s:g} s (last seen: {seen() if seen else last!r})"


async def wait_until(
    check: Check[T],
    what: str,
    timeout_s: float = 60.0,
    *,
    every_s: float = 0.05,
    seen: Callable[[], object] | None = None,
) -> T:
    """Call `check` (sync or async) until it returns something truthy, and return that. After `timeout_s`
    raise AssertionError naming `what` and the last value (or what `seen()` says)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_failure(what, timeout_s, value, seen))
        await asyncio.sleep(every_s)


async def seconds_until(
    check: Check[object],
    what: str,
    timeout_s: float,
    *,
    every_s: float = 0.1,
    seen: Callable[[], object] | None = None,
) -> float:
    """`wait_until`, returning how long the condition took to hold (for tests that report a recovery
    time; the bound they claim is `timeout_s`)."""
    began = time.monotonic()
    await wait_until(check, what, timeout_s, every_s=every_s, seen=seen)
    return time.monotonic() - began


def wait_until_blocking(
    check: Callable[[], T],
    what: str,
    timeout_s: float = 60.0,
    *,
    every_s: float = 0.3,
    seen: Callable[[], object] | None = None,
) -> T:
    """`wait_until` for code outside an event loop (starting processes, fixtures): blocks the thread."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(_failure(what, timeout_s, value, seen))
        time.sleep(every_s)
    return value
