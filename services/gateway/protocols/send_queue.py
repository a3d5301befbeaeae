"""A bounded per-socket send queue: a slow reader loses the oldest audio, never memory.

Audio is queued as PCM and encoded only when sent, so dropping frames keeps the Opus/Ogg stream valid.
Control items (text, events) are never dropped while audio can be dropped instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared import metrics

T = TypeVar("T")


@dataclass
class Queued(Generic[T]):
    item: T
    droppable: bool


class SendQueue(Generic[T]):
    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: deque[Queued[T]] = deque()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self.dropped = 0
        self._unreported_drops = 0

    def put(self, item: T, *, droppable: bool) -> None:
        self._items.append(Queued(item, droppable))
        self._empty.clear()
        while len(self._items) > self.max_items and self._drop_oldest_audio():
            pass
        self._ready.set()

    def _drop_oldest_audio(self) -> bool:
        for i, queued in enumerate(self._items):
            if queued.droppable:
                del self._items[i]
                self.dropped += 1
                self._unreported_drops += 1
                metrics.FRAMES_DROPPED.labels(service="gateway", reason="slow_client").inc()
                return True
        return False

    def take_drop_report(self) -> int:
        """How many audio items were dropped since the last call (to tell the client once per burst)."""
        count, self._unreported_drops = self._unreported_drops, 0
        return count

    async def get(self) -> T:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft().item
        if not self._items:
            self._empty.set()
        return item

    async def drained(self, timeout_s: float = 2.0) -> bool:
        """Wait (bounded) until everything queued was taken; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._items)
