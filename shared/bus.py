"""The Redis Streams bus: the only module that talks XADD / XREADGROUP / XACK / XAUTOCLAIM.

Services append typed messages and register handlers with `GroupConsumer`; they never call redis
stream commands themselves. Rules enforced here: every append is capped (MAXLEN ~), a malformed
entry is logged, dead-lettered and acked (never retried), a failing handler is retried through the
pending list up to `max_deliveries` and then dead-lettered, and stale pending entries of a dead
consumer are taken over with XAUTOCLAIM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import metrics
from shared.errors import MalformedMessage, ServiceUnavailable
from shared.messages import Codec, Envelope, encode
from shared.streams import StreamNames

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Envelope)
Fields = dict[bytes, bytes]


@dataclass(frozen=True)
class Entry:
    """One raw stream entry as read."""

    stream: str
    entry_id: str
    fields: Fields


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Bus:
    """A thin async layer over one Redis connection pool. Binary-safe (decode_responses=False)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        names: StreamNames,
        session_maxlen: int = 1500,
        control_maxlen: int = 10_000,
    ) -> None:
        # redis-py types replies as str | bytes | int unions; with decode_responses=False they are bytes.
        self.redis: Any = redis
        self.names = names
        self.session_maxlen = session_maxlen
        self.control_maxlen = control_maxlen

    @classmethod
    async def connect(
        cls,
        url: str,
        names: StreamNames,
        *,
        timeout_s: float = 5.0,
        session_maxlen: int = 1500,
        control_maxlen: int = 10_000,
    ) -> Bus:
        """Connect and PING within `timeout_s`; raises ServiceUnavailable with the reason otherwise."""
        redis = aioredis.Redis.from_url(
            url, decode_responses=False, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        try:
            async with asyncio.timeout(timeout_s):
                await redis.ping()
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await redis.aclose()
            raise ServiceUnavailable(f"cannot reach Redis at {url}: {exc}") from exc
        return cls(redis, names, session_maxlen, control_maxlen)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False

    # --- writing -------------------------------------------------------------------------------

    async def append(self, stream: str, message: Envelope, maxlen: int | None = None) -> str:
        """XADD with an approximate cap, so no stream grows without bound."""
        cap = maxlen if maxlen is not None else self.session_maxlen
        entry_id = await self.redis.xadd(stream, encode(message), maxlen=cap, approximate=True)  # type: ignore[arg-type]
        return _s(entry_id)

    async def append_many(self, items: Sequence[tuple[str, Envelope]]) -> list[str]:
        """XADD several entries in one round trip (a pipeline), each capped like `append` /
        `append_control`; returns their ids."""
        if not items:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, message in items:
                cap = self.control_maxlen if stream == self.names.control else self.session_maxlen
                pipe.xadd(stream, encode(message), maxlen=cap, approximate=True)
            return [_s(entry_id) for entry_id in await pipe.execute()]

    async def append_control(self, message: Envelope) -> str:
        return await self.append(self.names.control, message, maxlen=self.control_maxlen)

    # --- reading without a group (a session's single owner tails its stream) -----------------------

    async def read(
        self, cursors: dict[str, str], *, count: int = 100, block_ms: int | None = None
    ) -> list[Entry]:
        """XREAD after each stream's cursor (an entry id, '0' for all, '$' for new only)."""
        result = await self.redis.xread(cursors, count=count, block=block_ms)  # type: ignore[arg-type]
        return [
            Entry(_s(stream), _s(eid), fields) for stream, entries in result or [] for eid, fields in entries
        ]

    async def last_id(self, stream: str) -> str:
        """The newest entry id of a stream ('0-0' when empty): a cursor that skips the backlog."""
        entries = await self.redis.xrevrange(stream, count=1)
        return _s(entries[0][0]) if entries else "0-0"

    async def range(
        self, stream: str, start: str = "-", end: str = "+", count: int | None = None
    ) -> list[Entry]:
        entries = await self.redis.xrange(stream, start, end, count=count)
        return [Entry(stream, _s(eid), fields) for eid, fields in entries]

    # --- consumer groups -----------------------------------------------------------------------

    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """XGROUP CREATE ... MKSTREAM; an existing group (BUSYGROUP) is fine, anything else is not."""
        try:
            await self.redis.xgroup_create(stream, group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_group(
        self, stream: str, group: str, consumer: str, *, count: int = 10, block_ms: int | None = 1000
    ) -> list[Entry]:
        result = await self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        return [Entry(_s(s), _s(eid), fields) for s, entries in result or [] for eid, fields in entries]

    async def ack(self, stream: str, group: str, *entry_ids: str) -> int:
        if not entry_ids:
            return 0
        return int(await self.redis.xack(stream, group, *entry_ids))

    async def claim_stale(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 100
    ) -> list[Entry]:
        """XAUTOCLAIM entries pending longer than `min_idle_ms` (their consumer died) to `consumer`."""
        entries: list[Entry] = []
        cursor = "0-0"
        while True:
            reply = await self.redis.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count)
            cursor = _s(reply[0])
            # Redis 7 also returns deleted ids; entries trimmed away come back as None fields.
            entries.extend(Entry(stream, _s(eid), fields) for eid, fields in reply[1] if fields)
            if cursor == "0-0" or len(entries) >= count:
                return entries

    async def touch(self, stream: str, group: str, consumer: str, *entry_ids: str) -> None:
        """Reset the idle time of entries this consumer still holds, so nobody claims them."""
        if entry_ids:
            await self.redis.xclaim(stream, group, consumer, 0, list(entry_ids), justid=True)

    async def delivery_count(self, stream: str, group: str, entry_id: str) -> int:
        pending = await self.redis.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 0

    async def dead_letter(self, entry: Entry, group: str, reason: str) -> None:
        """Keep a copy of an entry we gave up on, with why, in a capped stream."""
        fields: dict[Any, Any] = {
            b"stream": entry.stream,
            b"entry_id": entry.entry_id,
            b"group": group,
            b"reason": reason[:500],
        }
        fields.update({b"f:" + k: v for k, v in entry.fields.items()})
        await self.redis.xadd(self.names.dead_letter, fields, maxlen=1000, approximate=True)

    # --- per-session keys ----------------------------------------------------------------------

    async def expire_session(self, sid: str, ttl_s: int) -> None:
        """Give every key of a finished session a TTL (they are rebuildable; durable data lives elsewhere)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self.names.session_keys(sid):
                pipe.expire(key, ttl_s)
            await pipe.execute()


class Handled:
    """What a handler may return: ACK (default) or HOLD (keep it pending; the owner touches it)."""

    ACK = "ack"
    HOLD = "hold"


Handler = Callable[[M, Entry], Awaitable[str | None]]


class GroupConsumer(Generic[M]):
    """The consumer loop, written once: read-group, decode, handle, ack; claim stale entries.

    The handler returns None / Handled.ACK to ack, or Handled.HOLD to keep the entry pending while
    the work it started lives on (e.g. a session placed on this worker): `held` entries are touched
    every claim interval, so only a dead consumer's entries go idle and get claimed by another.
    """

    def __init__(
        self,
        bus: Bus,
        stream: str,
        group: str,
        consumer: str,
        codec: Codec[M],
        handler: Handler[M],
        *,
        claim_idle_ms: int = 5000,
        max_deliveries: int = 5,
        batch: int = 10,
        block_ms: int = 500,
        can_take: Callable[[], bool] = lambda: True,
        claim_batch: int | None = None,
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.codec = codec
        self.handler = handler
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.batch = batch
        self.block_ms = block_ms
        self.can_take = can_take
        # Claims may take more than `batch` at once: a dead worker's sessions move together.
        self.claim_batch = claim_batch or batch
        self.held: set[str] = set()
        self._last_claim = 0.0

    async def release(self, entry_id: str) -> None:
        """Ack an entry that was held (its work ended)."""
        self.held.discard(entry_id)
        await self.bus.ack(self.stream, self.group, entry_id)

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_group(self.stream, self.group)
        backoff = 0.1
        while not stop.is_set():
            try:
                await self._maintain()
                if not self.can_take():
                    await asyncio.sleep(self.block_ms / 1000)
                    continue
                entries = await self.bus.read_group(
                    self.stream, self.group, self.consumer, count=self.batch, block_ms=self.block_ms
                )
                for entry in entries:
                    await self.process(entry)
                backoff = 0.1
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream or group was deleted under us (FLUSHALL, manual cleanup): recreate.
                    log.warning("consumer group missing, recreating", extra={"stream": self.stream})
                    await self.bus.ensure_group(self.stream, self.group)
                    continue
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning(
                    "bus read failed, retrying in %.1fs: %s", backoff, exc, extra={"stream": self.stream}
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_claim < self.claim_idle_ms / 2000:
            return
        self._last_claim = now
        await self.bus.touch(self.stream, self.group, self.consumer, *self.held)
        if not self.can_take():
            return
        for entry in await self.bus.claim_stale(
            self.stream, self.group, self.consumer, min_idle_ms=self.claim_idle_ms, count=self.claim_batch
        ):
            if entry.entry_id in self.held:
                continue
            deliveries = await self.bus.delivery_count(self.stream, self.group, entry.entry_id)
            if deliveries > self.max_deliveries:
                log.error(
                    "giving up on entry after %d deliveries",
                    deliveries,
                    extra={"stream": self.stream, "entry_id": entry.entry_id},
                )
                await self.bus.dead_letter(entry, self.group, f"failed {deliveries} deliveries")
                await self.bus.ack(self.stream, self.group, entry.entry_id)
                metrics.BUS_DEAD_LETTERS.labels(stream_kind="control", reason="retries").inc()
                continue
            log.info(
                "claimed a stale entry from a dead consumer",
                extra={"stream": self.stream, "entry_id": entry.entry_id, "deliveries": deliveries},
            )
            await self.process(entry, claimed=True)

    async def process(self, entry: Entry, claimed: bool = False) -> None:
        try:
            message = self.codec.decode(entry.fields)
        except MalformedMessage as exc:
            log.warning(
                "malformed entry rejected: %s",
                exc.detail,
                extra={"stream": self.stream, "entry_id": entry.entry_id, "group": self.group},
            )
            await self.bus.dead_letter(entry, self.group, exc.detail)
            await self.bus.ack(self.stream, self.group, entry.entry_id)
            metrics.BUS_DEAD_LETTERS.labels(stream_kind="control", reason="malformed").inc()
            return
        try:
            outcome = await self.handler(message, entry)
        except Exception:
            # Left pending: it is retried after claim_idle_ms, up to max_deliveries.
            log.exception(
                "handler failed; entry stays pending for retry",
                extra={
                    "stream": self.stream,
                    "entry_id": entry.entry_id,
                    "session_id": message.session_id,
                    "claimed": claimed,
                },
            )
            return
        if outcome == Handled.HOLD:
            self.held.add(entry.entry_id)
        else:
            await self.bus.ack(self.stream, self.group, entry.entry_id)


async def tail(
    bus: Bus,
    stream: str,
    codec: Codec[M],
    *,
    start: str = "$",
    block_ms: int = 500,
    stop: asyncio.Event | None = None,
    count: int = 100,
) -> AsyncIterator[tuple[M, Entry]]:
    """Async-iterate new messages of one stream (no group): for a session's single reader.

    Malformed entries are logged and skipped. `start='$'` resolves to the current last id first, so
    nothing appended between two reads is missed.
    """
    cursor = await bus.last_id(stream) if start == "$" else start
    while stop is None or not stop.is_set():
        for entry in await bus.read({stream: cursor}, count=count, block_ms=block_ms):
            cursor = entry.entry_id
            try:
                message = codec.decode(entry.fields)
            except MalformedMessage as exc:
                log.warning(
                    "malformed entry skipped: %s",
                    exc.detail,
                    extra={"stream": stream, "entry_id": entry.entry_id},
                )
                continue
            yield message, entry


def make_bus_kwargs(settings: Any) -> dict[str, Any]:
    """Bus.connect keyword arguments from a CommonSettings."""
    return {
        "timeout_s": settings.redis_connect_timeout_s,
        "session_maxlen": settings.session_stream_maxlen,
        "control_maxlen": settings.control_stream_maxlen,
    }


__all__: Sequence[str] = ("Bus", "Entry", "GroupConsumer", "Handled", "tail", "make_bus_kwargs")
