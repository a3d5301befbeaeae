"""The Redis Streams bus: the only module that talks XADD / XREADGROUP / XACK / XAUTOCLAIM.

Services append typed messages and register handlers with `GroupConsumer`; they never call redis
stream commands themselves. Rules enforced here: every append is capped (MAXLEN ~), a malformed
entry is logged, dead-lettered and acked (never retried), a failing handler is retried through the
pending list up to `max_deliveries` and then dead-lettered, and stale pending entries of a dead
consumer are taken over with XAUTOCLAIM. No blocking read outlives the client's socket timeout.

Writes to a session's streams go through `append_sessions`: one script that appends only while the
writer still owns the session (a fence: a worker that was paused and lost its sessions cannot publish
for them any more) and keeps every session stream on a TTL, short once the session has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import metrics
from shared.errors import ChorusError, MalformedMessage, ServiceUnavailable
from shared.logging import without_passwords
from shared.messages import Codec, Envelope, SessionStart, encode
from shared.retry import is_retryable, keep_running
from shared.streams import StreamNames

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Envelope)
MAX_CONNECTIONS = 100  # per process (redis-py's default); the hot loops' lanes hold one each
Fields = dict[bytes, bytes]


@dataclass(frozen=True)
class Entry:
    """One raw stream entry as read."""

    stream: str
    entry_id: str
    fields: Fields


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Fence:
    """Who may write for a session: the session hash's `field` must still hold `token` (its owner)."""

    field: str
    token: str


@dataclass(frozen=True)
class SessionKeyTimes:
    """How long a session's keys live: `ttl_s` while it runs (refreshed by every write) and after it
    ended for its hash and transcript; `linger_s` for its streams once it ended (readers finish)."""

    ttl_s: int = 600
    linger_s: int = 10


# Appends each session's entries only while the writer owns it (or unfenced: field ''), and keeps each
# written stream on a TTL: the live one, or the short one once the session hash says `ended`. One HMGET
# per session, however many entries: Redis work per frame is the cost. The live TTL is set when a write
# creates the stream and when the writer says it is due (`refresh`: it renews it a few times per TTL, not
# on every frame); the short one on every write after the end.
# KEYS: per session its hash, then one stream key per entry. ARGV: fence field, token, MAXLEN, live TTL
# ms, ended TTL ms, session count; then per session its entry count and refresh flag (1/0), then per
# entry the number n of field/value strings followed by those n strings. Returns 1/0 per session:
# written / fenced off.
_APPEND_SESSIONS = """
local field, token, maxlen, live_ttl, ended_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local k, a = 1, 7
local written = {}
for s = 1, tonumber(ARGV[6]) do
  local hash = KEYS[k]
  k = k + 1
  local entries, refresh = tonumber(ARGV[a]), ARGV[a + 1] == '1'
  a = a + 2
  local held = redis.call('HMGET', hash, 'state', field == '' and 'state' or field)
  local owned = field == '' or held[2] == token
  local ttl = live_ttl
  if held[1] == 'ended' then
    ttl, refresh = ended_ttl, true
  end
  local touched = {}
  for e = 1, entries do
    local stream = KEYS[k]
    k = k + 1
    local n = tonumber(ARGV[a])
    a = a + 1
    if owned then
      local args = {stream, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*'}
      for i = 0, n - 1 do args[#args + 1] = ARGV[a + i] end
      if not redis.call('XADD', unpack(args)) then
        table.remove(args, 2)  -- no such stream yet: create it, and give it its TTL
        redis.call('XADD', unpack(args))
        touched[stream] = true
      elseif refresh then
        touched[stream] = true
      end
    end
    a = a + n
  end
  for stream in pairs(touched) do redis.call('PEXPIRE', stream, ttl) end
  written[s] = owned and 1 or 0
end
return written
"""


@dataclass(frozen=True)
class MemoryUse:
    """Redis memory: `used` bytes of at most `limit` (0 = no limit)."""

    used: int
    limit: int

    @property
    def share(self) -> float:
        """Used over the limit (0 without one)."""
        return self.used / self.limit if self.limit else 0.0


SessionWrites = Mapping[str, Sequence[tuple[str, Envelope]]]


@dataclass(frozen=True)
class _AppendCall:
    """One call of the append script, built: the sessions in order, its keys and arguments, and the
    sessions whose TTL it renews (`due`, as of `now`)."""

    sids: list[str]
    keys: list[str]
    args: list[Any]
    due: set[str]
    now: float


class Bus:
    """A thin async layer over one Redis connection pool. Binary-safe (decode_responses=False)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        names: StreamNames,
        session_maxlen: int = 1500,
        control_maxlen: int = 10_000,
        *,
        key_times: SessionKeyTimes | None = None,
        max_block_ms: int = 1000,
    ) -> None:
        # redis-py types replies as str | bytes | int unions; with decode_responses=False they are bytes.
        self._redis: Any = redis
        self.names = names
        self.session_maxlen = session_maxlen
        self.control_maxlen = control_maxlen
        self.key_times = key_times or SessionKeyTimes()
        # A blocking read must come back well before the client's socket timeout would fire.
        self.max_block_ms = max_block_ms
        self._append_sessions = redis.register_script(_APPEND_SESSIONS)
        self._ttl_renewed: dict[str, float] = {}  # session -> when this process last renewed its streams' TTL
        self._ttl_swept = time.monotonic()

    @classmethod
    async def connect(
        cls,
        url: str,
        names: StreamNames,
        *,
        timeout_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        session_maxlen: int = 1500,
        control_maxlen: int = 10_000,
        key_times: SessionKeyTimes | None = None,
    ) -> Bus:
        """Connect and PING within `timeout_s`; raises ServiceUnavailable with the reason otherwise.

        Every command fails after `socket_timeout_s` without an answer (a hung or partitioned Redis
        surfaces as a retryable TimeoutError instead of a hang); blocking reads block at most half of it.
        """
        # Blocking: past `MAX_CONNECTIONS` in use a command waits for one (at most its socket timeout) where
        # redis-py's default pool failed it at once: a burst of one client's requests (300 at once, even
        # unauthenticated: each refusal is counted in Redis) made other clients' requests fail with 503.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=socket_timeout_s,
            decode_responses=False,
            socket_connect_timeout=timeout_s,
            socket_timeout=socket_timeout_s,
            health_check_interval=30,
            # After Redis restarted (or dropped clients), every idle pooled connection is dead and its
            # next command fails: one immediate retry on a fresh connection, never on a timeout.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        redis = aioredis.Redis.from_pool(pool)
        try:
            async with asyncio.timeout(timeout_s):
                await redis.ping()
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await redis.aclose()
            raise ServiceUnavailable(f"cannot reach Redis at {without_passwords(url)}: {exc}") from exc
        max_block_ms = max(1, min(1000, int(socket_timeout_s * 500)))
        return cls(
            redis, names, session_maxlen, control_maxlen, key_times=key_times, max_block_ms=max_block_ms
        )

    @property
    def redis(self) -> Any:
        """The client, for the stores of `shared/` (sessions, presence, ownership, ...) and for tests only.

        Services never reach it: they call Bus and store methods, so Redis stays an implementation detail
        of `shared/` (checked by tests/test_architecture.py and the import contracts of `make lint`)."""
        return self._redis

    async def close(self) -> None:
        await self.redis.aclose()

    def lane(self) -> Lane:
        """A connection of its own for one task's hot loop (`Lane`)."""
        return Lane(self)

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
        """A `start` goes on the shared control stream (placement, through consumer groups); every other
        control message on its session's control stream, which only that session's owners read. That
        stream lives on the session TTL (refreshed by each write; `expire_session` keeps it as long)."""
        if isinstance(message, SessionStart):
            return await self.append(self.names.control, message, maxlen=self.control_maxlen)
        stream = self.names.session_control(message.session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, encode(message), maxlen=self.session_maxlen, approximate=True)
            pipe.expire(stream, self.key_times.ttl_s)
            entry_id, _ = await pipe.execute()
        return _s(entry_id)

    async def append_sessions(
        self, writes: SessionWrites, fence: Fence | None = None, *, lane: Lane | None = None
    ) -> set[str]:
        """Append entries to sessions' streams in one round trip; with a `fence`, only for the sessions
        whose hash still names this writer. Returns the session ids that were fenced off (not written).
        Through `lane` when given (a hot loop's own connection), else through the pool."""
        call = self._append_call(writes, fence)
        if call is None:
            return set()
        if lane is None:
            written = await self._append_sessions(keys=call.keys, args=call.args)
        else:
            written = await lane.run_script(self._append_sessions, call.keys, call.args)
        return self._appended(call, written)

    def _append_call(self, writes: SessionWrites, fence: Fence | None) -> _AppendCall | None:
        """The append script's keys and arguments for `writes` (None when there is nothing to write)."""
        writes = {sid: items for sid, items in writes.items() if items}
        if not writes:
            return None
        now = time.monotonic()
        due = {sid for sid in writes if now - self._ttl_renewed.get(sid, -math.inf) >= self._renew_s}
        keys: list[str] = []
        args: list[Any] = [
            fence.field if fence else "",
            fence.token if fence else "",
            self.session_maxlen,
            self.key_times.ttl_s * 1000,
            self.key_times.linger_s * 1000,
            len(writes),
        ]
        for sid, items in writes.items():
            keys.append(self.names.session(sid))
            args.extend((len(items), int(sid in due)))
            for stream, message in items:
                keys.append(stream)
                fields = encode(message)
                args.append(2 * len(fields))
                for name, value in fields.items():
                    args.extend((name, value))
        return _AppendCall(list(writes), keys, args, due, now)

    def _appended(self, call: _AppendCall, written: Sequence[int]) -> set[str]:
        """After the script ran: TTLs renewed, and the sessions it fenced off."""
        self._renewed(call.due, call.now)
        return {sid for sid, ok in zip(call.sids, written, strict=True) if not ok}

    @property
    def _renew_s(self) -> float:
        """How often a writer renews its session streams' live TTL: four times per TTL, so a live stream
        never lapses, where renewing on every write cost a PEXPIRE per frame."""
        return self.key_times.ttl_s / 4

    def _renewed(self, sids: set[str], now: float) -> None:
        self._ttl_renewed.update(dict.fromkeys(sids, now))
        if now - self._ttl_swept >= self._renew_s:  # bounded: only sessions written to lately stay
            self._ttl_renewed = {s: t for s, t in self._ttl_renewed.items() if now - t < self._renew_s}
            self._ttl_swept = now

    async def append_session(
        self, sid: str, items: Sequence[tuple[str, Envelope]], fence: Fence | None = None
    ) -> bool:
        """`append_sessions` for one session: False when it was fenced off."""
        return not await self.append_sessions({sid: items}, fence)

    # --- reading without a group (a session's single owner tails its stream) -----------------------

    async def read(
        self,
        cursors: dict[str, str],
        *,
        count: int = 100,
        block_ms: int | None = None,
        lane: Lane | None = None,
    ) -> list[Entry]:
        """XREAD after each stream's cursor (an entry id, '0' for all, '$' for new only); through `lane`
        when given."""
        block = self._block(block_ms)
        if lane is not None:
            (reply,) = await lane.execute(_xread(cursors, count, block))
            return _entries(reply)
        result = await self.redis.xread(cursors, count=count, block=block)  # type: ignore[arg-type]
        return [
            Entry(_s(stream), _s(eid), fields) for stream, entries in result or [] for eid, fields in entries
        ]

    async def read_when_woken(
        self,
        wake: dict[str, str],
        cursors: dict[str, str],
        *,
        count: int = 100,
        block_ms: int,
        lane: Lane | None = None,
    ) -> list[Entry]:
        """Wait for an entry on any of the `wake` streams (at most `block_ms`), then XREAD `cursors`: in one
        round trip. Both XREADs go in one pipeline; Redis runs a blocked client's next command only once
        the blocking one returns, so the second reads everything new after the wake-up (or the timeout).
        Through `lane` when given."""
        if lane is not None:
            _, reply = await lane.execute(
                _xread(wake, 1, self._block(block_ms)), _xread(cursors, count, None)
            )
            return _entries(reply)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xread(wake, count=1, block=self._block(block_ms))  # type: ignore[arg-type]
            pipe.xread(cursors, count=count)  # type: ignore[arg-type]
            _, result = await pipe.execute()
        return [
            Entry(_s(stream), _s(eid), fields) for stream, entries in result or [] for eid, fields in entries
        ]

    def _block(self, block_ms: int | None) -> int | None:
        """BLOCK for a read: never longer than `max_block_ms` (0 would mean forever: the cap too)."""
        if block_ms is None:
            return None
        return self.max_block_ms if block_ms <= 0 else min(block_ms, self.max_block_ms)

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
        block = self._block(block_ms)
        result = await self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block)
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

    async def forget_idle_consumers(self, stream: str, group: str, idle_ms: int) -> int:
        """Delete consumers with nothing pending that have not read for `idle_ms` (workers that stopped:
        each process start has its own consumer name). A live one that was idle is recreated on its next
        read. Returns how many went."""
        gone = 0
        for consumer in await self.redis.xinfo_consumers(stream, group):
            if int(consumer["pending"]) == 0 and int(consumer["idle"]) > idle_ms:
                gone += int(await self.redis.xgroup_delconsumer(stream, group, consumer["name"]) == 0)
        return gone

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

    async def memory_use(self) -> MemoryUse:
        """How much memory Redis uses, and its limit (`maxmemory`, 0 = none)."""
        info = await self.redis.info("memory")
        return MemoryUse(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))

    # --- per-session keys ----------------------------------------------------------------------

    async def expire_session(self, sid: str) -> None:
        """A finished session: its streams (most of its memory) go after the short linger, so readers can
        finish; its hash and transcript keep the session TTL (rebuildable; durable data lives elsewhere)."""
        times = self.key_times
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self.names.session_streams(sid):
                pipe.expire(key, times.linger_s)
            pipe.expire(self.names.session(sid), times.ttl_s)
            pipe.expire(self.names.session_control(sid), times.ttl_s)  # its stop, for late readers
            pipe.expire(self.names.session_transcript(sid), times.ttl_s)
            pipe.delete(self.names.session_lease(sid))
            await pipe.execute()


class Lane:
    """One connection of the bus's pool kept for one task's hot loop: the router's route loop, a gateway's
    `:out` reader and its `:in` writer (pass it as `lane=` to `Bus.append_sessions`, `read`,
    `read_when_woken`). A call through it skips what redis-py adds to each round trip through the pool
    (the checkout and release, a pipeline object for two commands, the reply callbacks): the commands are
    packed and sent together and their raw replies parsed by the bus. One task at a time: a call made while
    another is in flight raises RuntimeError (two tasks reading one connection can each take the other's
    reply without any error).

    Faults as through the pool: a dropped connection (Redis restarted) is retried once at once on a fresh
    one, a timeout is not; a call that fails or is cancelled drops the connection, so no reply is left
    unread on it; a script Redis forgot (restarted) is loaded again.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._connection: Any = None
        self._busy = False

    async def execute(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send `commands` at once; their raw replies, in order (an error reply raises)."""
        if self._busy:
            raise RuntimeError("a lane serves one task at a time: another call on it is in flight")
        self._busy = True
        try:
            return await self._send(commands)
        finally:
            self._busy = False

    async def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        packed = _pack(commands)
        for retry in (False, True):
            if self._connection is None:
                self._connection = await self.bus.redis.connection_pool.get_connection()
            connection = self._connection
            try:
                await connection.send_packed_command(packed)
                return [await connection.read_response() for _ in commands]
            except RedisConnectionError:
                await connection.disconnect()
                if retry:
                    raise
            except BaseException:
                await connection.disconnect()
                raise
        raise AssertionError("unreachable")

    async def run_script(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA of a registered script; loaded first (in the same round trip) when Redis lacks it."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            (reply,) = await self.execute(command)
        except NoScriptError:
            _, reply = await self.execute(("SCRIPT", "LOAD", script.script), command)
        return reply

    async def close(self) -> None:
        """Give the connection back to the pool (a later call takes one again)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await self.bus.redis.connection_pool.release(connection)


def _pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """`commands` in Redis's protocol, in one buffer. redis-py's packer costs ~1 µs per argument (its
    encoder's checks, then a join per argument), most of the router's output call: that one carries ~20
    arguments per session (each entry's fields). Arguments are bytes, str or int here (others as redis-py
    encodes them, or refused as it refuses them: never their repr sent as data)."""
    pieces: list[bytes] = []
    for command in commands:
        pieces.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is bytes:
                value = arg
            elif kind is str:
                value = arg.encode()
            else:
                value = b"%d" % arg if kind is int else _arg(arg)
            pieces.append(b"$%d\r\n" % len(value))
            pieces.append(value)
            pieces.append(b"\r\n")
    return b"".join(pieces)


def _arg(arg: Any) -> bytes:
    """An argument neither bytes nor str exactly, as redis-py's encoder takes it (never its repr as data)."""
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool) or not isinstance(arg, int | float):
        raise DataError(f"a lane sends bytes, str, int or float, not {type(arg).__name__}: {arg!r:.40}")
    return b"%d" % arg if isinstance(arg, int) else repr(arg).encode()


def _xread(cursors: Mapping[str, str], count: int, block: int | None) -> tuple[Any, ...]:
    blocking = ("BLOCK", block) if block is not None else ()
    return ("XREAD", "COUNT", count, *blocking, "STREAMS", *cursors, *cursors.values())


def _entries(reply: Any) -> list[Entry]:
    """A raw XREAD reply (RESP2 pairs, or RESP3's map) as entries."""
    streams = reply.items() if isinstance(reply, dict) else reply or ()
    return [Entry(_s(stream), _s(eid), _fields(flat)) for stream, entries in streams for eid, flat in entries]


def _fields(flat: list[bytes] | None) -> Fields:
    pairs = iter(flat or ())
    return dict(zip(pairs, pairs, strict=False))


class Handled(enum.StrEnum):
    """What a consumer handler made of an entry (returning None is `DONE`)."""

    DONE = "done"  # acked
    RETRY_LATER = "retry_later"  # not now (e.g. no free slot since the read): stays pending, claimed again
    # The handler took it on and acks it itself (`GroupConsumer.ack`) once done, or gives it up
    # (`GroupConsumer.let_go`): pending until then, so if this consumer dies first, another claims it.
    # Its handler must be done within `claim_idle_ms`, or another consumer claims it meanwhile.
    TAKEN = "taken"


Handler = Callable[[M, Entry], Awaitable[Handled | None]]

IDLE_CONSUMER_MS = 3_600_000  # a consumer of a group that has not read for an hour is forgotten


class GroupConsumer(Generic[M]):
    """The consumer loop, written once: read-group, decode, handle, ack; claim stale entries.

    An entry is acked when its handler returns (`Handled.DONE` or None); one it answers
    `Handled.RETRY_LATER`, or whose handler raised, stays pending and is retried
    (claimed after `claim_idle_ms`, by this or another consumer) up to `max_deliveries` times. Work that
    outlives the handler (a session placed on this worker) is owned through `shared.ownership`, not by
    keeping entries pending. Redis outages are waited out (`shared.retry.keep_running`).
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
        self.claim_batch = claim_batch or batch
        self._last_claim = 0.0
        self._taken: set[str] = set()  # entries a handler took on (`Handled.TAKEN`), not acked yet

    async def run(self, stop: asyncio.Event) -> None:
        await keep_running(
            f"{self.group} consumer", lambda: self._consume(stop), stop, extra={"stream": self.stream}
        )

    async def _consume(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_group(self.stream, self.group)
        while not stop.is_set():
            try:
                await self._maintain()
                if not self.can_take():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.block_ms / 1000)
                    continue
                entries = await self.bus.read_group(
                    self.stream, self.group, self.consumer, count=self.batch, block_ms=self.block_ms
                )
                for entry in entries:
                    await self.process(entry)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group is gone (Redis restarted without persistence, FLUSHALL): recreate.
                log.warning("consumer group missing, recreating", extra={"stream": self.stream})
                await self.bus.ensure_group(self.stream, self.group)

    async def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_claim < self.claim_idle_ms / 2000:
            return
        self._last_claim = now
        await self.bus.forget_idle_consumers(self.stream, self.group, IDLE_CONSUMER_MS)
        if not self.can_take():
            return
        for entry in await self.bus.claim_stale(
            self.stream, self.group, self.consumer, min_idle_ms=self.claim_idle_ms, count=self.claim_batch
        ):
            if entry.entry_id in self._taken:  # this consumer's, in hand (the claim kept it fresh)
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
        extra = {"stream": self.stream, "entry_id": entry.entry_id, "session_id": message.session_id}
        try:
            handled = await self.handler(message, entry)
        except ChorusError as exc:
            # An expected refusal (e.g. no free slot since the read): pending, retried later.
            log.warning("entry left pending for retry: %s", exc.detail, extra={**extra, "claimed": claimed})
            return
        except Exception as exc:
            if is_retryable(exc):
                raise  # Redis is away: the loop waits it out; the entry stays pending and is retried
            # Left pending: it is retried after claim_idle_ms, up to max_deliveries.
            log.exception(
                "handler failed; entry stays pending for retry", extra={**extra, "claimed": claimed}
            )
            return
        if handled is Handled.RETRY_LATER:
            log.info("entry left pending for retry", extra={**extra, "claimed": claimed})
            return
        if handled is Handled.TAKEN:
            self._taken.add(entry.entry_id)
            return
        await self.ack(entry)

    async def ack(self, entry: Entry) -> None:
        """Ack an entry (one a handler took on, `Handled.TAKEN`, once it is done)."""
        self._taken.discard(entry.entry_id)
        await self.bus.ack(self.stream, self.group, entry.entry_id)

    def let_go(self, entry: Entry) -> None:
        """An entry a handler took on and gave up: left pending, to be claimed (by any consumer)."""
        self._taken.discard(entry.entry_id)


class SharedReader:
    """Many single readers of different streams served by one XREAD: each `read` waits for its stream's
    next entries, and one task (`run`) reads for all of them at once. A gateway's sessions each tail
    their `:out`; the router writes every session's output in one script per tick, so one round trip
    answers them all (`Bus.read_when_woken`: a blocked XREAD wakes with the entries of the first stream
    written only, and the XREAD pipelined behind it reads the others), instead of one per session and
    tick.

    A reader that asks while the shared XREAD is already blocked (it was busy when the round began)
    looks once on its own, without blocking, so it never waits for a round that does not cover it. A
    reader whose stream stays quiet gets [] after `block_ms`, as from a blocking read of its own.
    """

    def __init__(self, bus: Bus, *, count: int = 100, block_ms: int = 200, retry_s: float = 0.1) -> None:
        self.bus = bus
        self.count = count
        self.block_ms = block_ms
        self.retry_s = retry_s
        self._lane = bus.lane()  # the rounds' own connection; a reader's look of its own uses the pool
        self._waiting: dict[str, _Waiting] = {}
        self._reading: set[str] = set()  # the streams the XREAD in flight covers
        self._asked = asyncio.Event()

    async def read(self, stream: str, cursor: str) -> list[Entry]:
        """The entries of `stream` after `cursor` (at most `count`); [] after `block_ms` without any.
        Raises what the read raised (Redis away: retryable). One reader per stream at a time."""
        if stream in self._waiting:
            raise RuntimeError(f"{stream} already has a reader")
        waiting = _Waiting(cursor, asyncio.get_running_loop().create_future(), time.monotonic())
        self._waiting[stream] = waiting
        self._asked.set()
        try:
            if self._reading and stream not in self._reading:
                entries = await self.bus.read({stream: cursor}, count=self.count)
                if entries:
                    return entries
            return await waiting.future
        finally:
            if self._waiting.get(stream) is waiting:
                del self._waiting[stream]
            if not waiting.future.done():
                # Left through the look of its own (or cancelled) while a round that began meanwhile may
                # cover it: cancelled, that round passes it by instead of answering nobody (an exception
                # set on it would be logged as never retrieved).
                waiting.future.cancel()
            elif not waiting.future.cancelled():
                waiting.future.exception()  # answered after the look of its own: nobody else will ask

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                if not self._waiting:
                    self._asked.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._asked.wait(), self.block_ms / 1000)
                    continue
                await asyncio.sleep(0)  # readers just answered ask again first, so this round covers them
                await self._round()
        finally:
            await self._lane.close()

    async def _round(self) -> None:
        asked = {stream: waiting for stream, waiting in self._waiting.items() if not waiting.future.done()}
        self._reading = set(asked)
        cursors = {stream: waiting.cursor for stream, waiting in asked.items()}
        try:
            if len(cursors) == 1:  # what wakes the read is all there is to read
                entries = await self.bus.read(
                    cursors, count=self.count, block_ms=self.block_ms, lane=self._lane
                )
            else:
                entries = await self.bus.read_when_woken(
                    cursors, cursors, count=self.count, block_ms=self.block_ms, lane=self._lane
                )
        except Exception as exc:
            for waiting in asked.values():
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            await asyncio.sleep(self.retry_s)  # readers decide whether to wait Redis out
            return
        finally:
            self._reading = set()
        by_stream: dict[str, list[Entry]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry)
        overdue = time.monotonic() - self.block_ms / 1000
        for stream, waiting in asked.items():
            got = by_stream.get(stream)
            if waiting.future.done() or (got is None and entries and waiting.since > overdue):
                continue  # another stream woke the read: this one is read again at once
            waiting.future.set_result(got or [])


@dataclass
class _Waiting:
    cursor: str
    future: asyncio.Future[list[Entry]]
    since: float


# A timer this late means the event loop was busy, not that Redis was slow: the write gets this long more.
_LOOP_LAG_S = 0.05


class SharedWriter:
    """Many sessions' appends coalesced into one round trip: an append made while no write is in flight
    goes at once; those made while one is (other sessions' frames, arriving unsynchronized) wait for it and
    then go together, in one `append_sessions` call for all of them, instead of one script call per frame
    and session. A gateway's sessions each append their user audio to `:in` through one.

    With `linger_s`, each write first waits that long for more appends: fewer, larger round trips (each
    costs the writer ~0.15 ms of CPU whatever it carries) for as much more latency.

    No append waits much longer than `max_wait_s` (live audio: late is as good as lost). Once the write
    in flight has taken that long (Redis paused, or partitioned: it would wait for the socket timeout),
    every append it carries or that waits for it is answered with a retryable `RedisTimeoutError`, its
    caller's to count as dropped, and an append made before that write ends is refused at once. The
    entries handed to the write go with it (whether it lands is unknown); those still waiting never go.
    So nothing queues up while Redis is away, and a caller's loop (a socket's receive loop) keeps reading.
    One timer watches the writes (it fires a few times per `max_wait_s` while writes go on, then stops):
    no timer per write or append. A timer that fires late (the event loop was busy: the write may have
    landed, its answer not read yet) gives the write one short grace first.

    A session's entries keep their order: a batch goes only after the one before it was written (or
    failed), and an entry is dropped rather than sent after a later one. What the write raised (Redis
    away: retryable) reaches every append of its batch. A caller cancelled while it waits does not cancel
    the write: its entries were handed over and go with the others.
    """

    def __init__(self, bus: Bus, *, linger_s: float = 0.0, max_wait_s: float = 0.5) -> None:
        if max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, not {max_wait_s}")
        self.bus = bus
        self.linger_s = linger_s
        self.max_wait_s = max_wait_s
        self._lane = bus.lane()  # one write in flight at a time: a connection of its own
        self._queued: dict[str, list[tuple[str, Envelope]]] = {}
        self._waiting: list[tuple[str, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._sending: list[tuple[str, asyncio.Future[bool]]] = []  # the appends of the write in flight
        self._since: float | None = None  # when the write in flight began (monotonic); None: none is
        self._given_up = False  # on the write in flight: appends are refused until it ends
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = 0.0  # when the timer is due (monotonic)
        self._graced = False  # the write in flight had its grace

    async def append(self, sid: str, items: Sequence[tuple[str, Envelope]]) -> bool:
        """Append `items` to session `sid`'s streams (unfenced); True once written. Raises a retryable
        error when they could not go within `max_wait_s` (dropped: see the class)."""
        if self._given_up:
            raise self._overdue()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.setdefault(sid, []).extend(items)
        self._waiting.append((sid, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="shared-writer")
        return await future

    async def _write_all(self) -> None:
        try:
            while self._queued:
                if self.linger_s:
                    await asyncio.sleep(self.linger_s)
                writes, self._queued = self._queued, {}
                self._sending, self._waiting = self._waiting, []
                self._since, self._graced = time.monotonic(), False
                if self._watch is None:
                    self._arm(self.max_wait_s)
                try:
                    lost = await self.bus.append_sessions(writes, lane=self._lane)
                except Exception as exc:
                    _settle(self._sending, exc=exc)
                else:
                    _settle(self._sending, lost=lost)
                finally:
                    self._since, self._given_up = None, False
                self._sending = []
        finally:
            self._writer = None
            for _, future in self._sending + self._waiting:  # cancelled itself (shutdown): none waits
                future.cancel()
            self._sending = []

    def _arm(self, delay_s: float) -> None:
        self._watch_at = time.monotonic() + delay_s
        self._watch = asyncio.get_running_loop().call_later(delay_s, self._check)

    def _check(self) -> None:
        """The timer: give up on the write in flight once it is overdue; until then, look again when it
        will be (a write that began since the timer was armed)."""
        self._watch = None
        if self._since is None:
            return  # armed again by the next write
        now = time.monotonic()
        if (left := self._since + self.max_wait_s - now) > 0:
            self._arm(left)
        elif now - self._watch_at > _LOOP_LAG_S and not self._graced:
            self._graced = True  # the loop was busy: let it read the write's answer, if it came, first
            self._arm(_LOOP_LAG_S)
        else:
            self._give_up()

    def _give_up(self) -> None:
        """The write in flight is overdue: its appends and those waiting for it are answered (retryable),
        the waiting ones' entries dropped. The write goes on; its entries go with it."""
        self._given_up = True
        exc = self._overdue()
        _settle(self._sending, exc=exc)
        _settle(self._waiting, exc=exc)
        self._sending, self._waiting, self._queued = [], [], {}

    def _overdue(self) -> RedisTimeoutError:
        return RedisTimeoutError(f"Redis did not take a write within {self.max_wait_s:g} s: appends dropped")


def _settle(
    batch: list[tuple[str, asyncio.Future[bool]]], *, lost: Collection[str] = (), exc: Exception | None = None
) -> None:
    """Answer a batch's appends: written unless their session was fenced off, or what the write raised."""
    for sid, future in batch:
        if future.done():  # its caller was cancelled
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(sid not in lost)


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
        "socket_timeout_s": settings.redis_socket_timeout_s,
        "session_maxlen": settings.session_stream_maxlen,
        "control_maxlen": settings.control_stream_maxlen,
        "key_times": SessionKeyTimes(settings.session_ttl_s, settings.session_stream_linger_s),
    }


__all__: Sequence[str] = (
    "Bus",
    "Entry",
    "Fence",
    "GroupConsumer",
    "Handled",
    "MemoryUse",
    "SessionKeyTimes",
    "SharedReader",
    "SharedWriter",
    "tail",
    "make_bus_kwargs",
)
