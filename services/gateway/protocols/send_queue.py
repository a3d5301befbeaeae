"""A bounded per-socket send queue: a slow reader loses the oldest audio, a reader that stops reading is
closed; neither costs the gateway more than a bound of memory, nor time per item queued.

Audio is queued as PCM and encoded only when sent, so dropping frames keeps the Opus/Ogg stream valid.
Audio (droppable) and everything else (text, events, errors: never dropped, since losing one would leave
the client with a broken transcript or an unexplained refusal) wait in two deques; a sequence number
keeps their order. Dropping the oldest audio is a `popleft`, whatever else is queued.

Everything else is bounded too, in items and in bytes: a client that does not read what it is sent is
not served forever. Past either bound the queue closes: `put` raises `ClientNotReading`, which ends the
session (the socket closes with 1008 and the reason).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from typing import Generic, NoReturn, TypeVar

from shared import metrics
from shared.errors import ClientNotReading

T = TypeVar("T")


class SendQueue(Generic[T]):
    def __init__(self, max_audio: int, max_messages: int, max_bytes: int, size: Callable[[T], int]) -> None:
        """`max_audio` droppable items; `max_messages` other items holding at most `max_bytes`
        (`size(item)` each)."""
        self.max_audio = max_audio
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._size = size
        self._audio: deque[tuple[int, T]] = deque()
        self._messages: deque[tuple[int, T, int]] = deque()
        self._message_bytes = 0
        self._order = itertools.count()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self.closed: ClientNotReading | None = None
        self.dropped = 0
        self._unreported_drops = 0

    def put(self, item: T, *, droppable: bool) -> None:
        if self.closed is not None:
            raise self.closed
        if droppable:
            self._audio.append((next(self._order), item))
            if len(self._audio) > self.max_audio:
                self._audio.popleft()
                self.dropped += 1
                self._unreported_drops += 1
                metrics.FRAMES_DROPPED.labels(service="gateway", reason="slow_client").inc()
        else:
            size = self._size(item)
            if len(self._messages) >= self.max_messages or self._message_bytes + size > self.max_bytes:
                self._close()
            self._messages.append((next(self._order), item, size))
            self._message_bytes += size
        self._empty.clear()
        self._ready.set()

    def _close(self) -> NoReturn:
        metrics.LIMIT_REJECTIONS.labels(limit="ws_send_queue").inc()
        self.closed = ClientNotReading(
            f"the client does not read what it is sent: over {self.max_messages} messages or "
            f"{self.max_bytes} bytes wait for it"
        )
        self._ready.set()  # the sender stops
        raise self.closed

    def drop_audio(self) -> None:
        """Forget the audio not sent yet (a realtime client cancelled the response it belongs to)."""
        self._audio.clear()
        if not self._messages:
            self._empty.set()

    def take_drop_report(self) -> int:
        """How many audio items were dropped since the last call (to tell the client once per burst)."""
        count, self._unreported_drops = self._unreported_drops, 0
        return count

    async def get(self) -> T:
        """The oldest item; raises `ClientNotReading` once the queue is closed."""
        while not (self._audio or self._messages):
            if self.closed is not None:
                raise self.closed
            self._ready.clear()
            await self._ready.wait()
        if self.closed is not None:
            raise self.closed
        if not self._messages or (self._audio and self._audio[0][0] < self._messages[0][0]):
            item = self._audio.popleft()[1]
        else:
            _, item, size = self._messages.popleft()
            self._message_bytes -= size
        if not (self._audio or self._messages):
            self._empty.set()
        return item

    async def drained(self, timeout_s: float = 2.0) -> bool:
        """Wait (bounded) until everything queued was taken; False on timeout or when closed."""
        if self.closed is not None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._audio) + len(self._messages)
