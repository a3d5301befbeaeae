"""How a worker owns sessions: one protocol for the dialogue, TTS and router workers.

- **Taking** (placement): a worker reads a `start` through its service's consumer group and `take`s the
  session: atomically, only while the session is live and nobody owns it, its hash field (`fence.field`,
  e.g. `dialogue_owner`) gets this worker's token and the session joins this worker's owned set
  (`{prefix}owned:{group}:{worker}`). The start is then acked: ownership lives in the hash, not in a
  pending entry, so a trimmed control stream loses nothing.
- **Fencing**: every write to a session's streams goes through `Bus.append_sessions` with the worker's
  `fence`: a worker that was paused or cut off, whose sessions moved meanwhile, cannot publish for them.
- **Failover**: a worker whose presence expired is dead; every `failover_poll_s` the live workers of its
  group `take_over` its owned sessions (atomically, each to exactly one of them, up to their free capacity)
  and serve them from the `start` kept in the session hash, continuing each stream's `seq`.
- **Liveness** (`check`): a session is live while its hash exists, does not say ended, names this worker,
  and its lease (renewed by the gateway serving the client's socket) is held. A lapsed lease means the
  client is gone without a word (its gateway died): the first owner to see it `finalize`s the session,
  and everyone ends it through the `stop` that follows.
- **Stops** seen on the control tail are remembered, so a late `start` cannot revive a session.

Each loop here runs under `shared.retry.keep_running`: a Redis outage is waited out, not fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from shared.bus import Bus, Fence, tail
from shared.errors import MalformedMessage
from shared.messages import CONTROL, Codec, ControlMessage, SessionStart, SessionStop
from shared.retry import is_retryable, keep_running, sleep_unless_stopped
from shared.sessions import SessionInfo, SessionState, SessionStore, start_of

log = logging.getLogger(__name__)

RECENT_STOPS = 1000


class Liveness(enum.StrEnum):
    LIVE = "live"
    ENDED = "ended"  # the hash says so (its stop may still be on the way)
    GONE = "gone"  # no hash: it expired, or Redis lost it (a restart without persistence)
    LEASE_LAPSED = "lease_expired"  # nobody serves its client any more (the gateway died)
    MOVED = "moved"  # another worker owns it now (this one was paused or cut off from Redis)


class TakeOutcome(enum.StrEnum):
    TAKEN = "taken"
    GONE = "gone"
    ENDED = "ended"
    LEASE_LAPSED = "lease"
    OWNED = "owned"  # by another worker


# KEYS: hash, lease, my owned set, owners registry. ARGV: field, my token, my worker id, session id.
_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HGET', KEYS[1], 'state') == 'ended' then return 'ended' end
if redis.call('EXISTS', KEYS[2]) == 0 then return 'lease' end
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= '' and holder ~= ARGV[2] then return 'owned' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[3])
return 'taken'
"""

# Move up to ARGV[4] sessions of a dead worker to this one: each only if its hash still names the dead
# worker and it has not ended (two live workers never both take one). Forgets the dead worker once its
# set is empty. KEYS: owners registry, the dead worker's owned set (or this worker's leftovers), my owned
# set. ARGV: field, dead token, my token, limit, session hash key prefix, dead worker id, my worker id.
# Returns the session ids taken.
_TAKE_OVER = """
local taken = {}
while #taken < tonumber(ARGV[4]) do
  local sid = redis.call('SPOP', KEYS[2])
  if not sid then break end
  local hash = ARGV[5] .. sid
  if redis.call('HGET', hash, ARGV[1]) == ARGV[2] and redis.call('HGET', hash, 'state') ~= 'ended' then
    redis.call('HSET', hash, ARGV[1], ARGV[3])
    redis.call('SADD', KEYS[3], sid)
    taken[#taken + 1] = sid
  end
end
if ARGV[6] ~= ARGV[7] and redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[1], ARGV[6]) end
if #taken > 0 then redis.call('SADD', KEYS[1], ARGV[7]) end
return taken
"""


# KEYS: my owned set, my leftovers set. Moves what a worker owns when it starts to its leftovers.
_SET_LEFTOVERS_ASIDE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
  redis.call('DEL', KEYS[1])
end
return redis.call('SCARD', KEYS[2])
"""


@dataclass(frozen=True)
class Takeover:
    """A session moved to this worker from a dead one."""

    start: SessionStart
    previous_worker: str
    info: SessionInfo


class RecentStops:
    """Session ids stopped recently (bounded), whether or not this worker owned them."""

    def __init__(self, size: int = RECENT_STOPS) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def remember(self, sid: str) -> None:
        self._ids[sid] = None
        self._ids.move_to_end(sid)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, sid: object) -> bool:
        return sid in self._ids


class SessionOwnership:
    """One worker's sessions of one placement group (`dialogue-moshiko`, `tts`, `router`)."""

    def __init__(
        self,
        bus: Bus,
        store: SessionStore,
        *,
        service: str,
        group: str,
        worker_id: str,
        field: str,
        token_of: Callable[[str], str] = lambda worker_id: worker_id,
    ) -> None:
        self.bus = bus
        self.store = store
        self.service = service  # presence lives under this service's name
        self.group = group
        self.worker_id = worker_id
        self.token_of = token_of  # the hash field's value for a worker of this group
        self.fence = Fence(field, token_of(worker_id))
        self.stops = RecentStops()
        self._take = bus.redis.register_script(_TAKE)
        self._take_over = bus.redis.register_script(_TAKE_OVER)
        self._set_leftovers_aside = bus.redis.register_script(_SET_LEFTOVERS_ASIDE)

    # --- placement ---------------------------------------------------------------------------------

    async def take(self, sid: str) -> TakeOutcome:
        """Own a session that is live and owned by nobody (or already by this worker)."""
        if sid in self.stops:
            return TakeOutcome.ENDED
        names = self.bus.names
        result = await self._take(
            keys=[
                names.session(sid),
                names.session_lease(sid),
                names.owned(self.group, self.worker_id),
                names.owners(self.group),
            ],
            args=[self.fence.field, self.fence.token, self.worker_id, sid],
        )
        return TakeOutcome(result.decode() if isinstance(result, bytes) else result)

    async def admit(self, start: SessionStart) -> SessionStart | None:
        """Placement of a `start` this worker read: take the session. Returns what to serve (the start as
        the session hash has it now: an update may have raced it), None when it is not this worker's to
        serve (over, or owned by another); a lapsed lease is finalized on the way."""
        sid = start.session_id
        taken = await self.take(sid)
        if taken is TakeOutcome.LEASE_LAPSED:
            await self.end_lapsed(sid)
        if taken is not TakeOutcome.TAKEN:
            log.info("start not taken: %s", taken, extra={"session_id": sid, "group": self.group})
            return None
        return start_of(await self.store.get(sid)) or start

    async def release(self, sid: str) -> None:
        """This worker serves the session no more (it ended, or moved)."""
        await self.bus.redis.srem(self.bus.names.owned(self.group, self.worker_id), sid)

    # --- failover ----------------------------------------------------------------------------------

    async def dead_owners(self) -> list[str]:
        """Workers of this group that own sessions but whose presence expired."""
        names = self.bus.names
        owners = sorted(m.decode() for m in await self.bus.redis.smembers(names.owners(self.group)))
        owners = [w for w in owners if w != self.worker_id]
        if not owners:
            return []
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for worker in owners:
                pipe.exists(names.worker(self.service, worker))
            alive = await pipe.execute()
        return [worker for worker, present in zip(owners, alive, strict=True) if not present]

    async def set_leftovers_aside(self) -> int:
        """At start, before taking anything: sessions already in this worker's owned set belong to an
        earlier process with the same worker id (a restarted container), dead with them. They are taken
        over like a dead worker's (`take_over`). Returns how many there are."""
        names = self.bus.names
        keys = [names.owned(self.group, self.worker_id), names.leftovers(self.group, self.worker_id)]
        return int(await self._set_leftovers_aside(keys=keys))

    async def take_over(self, limit: int) -> list[Takeover]:
        """Move up to `limit` sessions of dead workers (and this worker's leftovers) to this one."""
        names = self.bus.names
        sources = [(dead, names.owned(self.group, dead)) for dead in await self.dead_owners()]
        sources.append((self.worker_id, names.leftovers(self.group, self.worker_id)))
        takeovers: list[Takeover] = []
        for dead, source in sources:
            if len(takeovers) >= limit:
                break
            sids = await self._take_over(
                keys=[names.owners(self.group), source, names.owned(self.group, self.worker_id)],
                args=[
                    self.fence.field,
                    self.token_of(dead),
                    self.fence.token,
                    limit - len(takeovers),
                    names.session(""),
                    dead,
                    self.worker_id,
                ],
            )
            for raw in sids:
                takeover = await self._takeover(raw.decode(), dead)
                if takeover is not None:
                    takeovers.append(takeover)
        return takeovers

    async def _takeover(self, sid: str, dead: str) -> Takeover | None:
        try:
            info = await self.store.get(sid)
            start = start_of(info)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            info, start, problem = None, None, str(exc)
        else:
            problem = "its hash holds no start"
        if info is None or start is None:
            log.error("cannot take over a session: %s", problem, extra={"session_id": sid, "dead": dead})
            await self.release(sid)
            return None
        log.info("taking over a session of a dead worker", extra={"session_id": sid, "dead": dead})
        return Takeover(start, dead, info)

    # --- liveness ------------------------------------------------------------------------------------

    async def check(self, sids: Iterable[str]) -> dict[str, Liveness]:
        """Each session's liveness, in one round trip."""
        sids = list(sids)
        if not sids:
            return {}
        names = self.bus.names
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(names.session(sid), "state", self.fence.field)
                pipe.exists(names.session_lease(sid))
            replies = await pipe.execute()
        result = {}
        for i, sid in enumerate(sids):
            (state, holder), lease = replies[2 * i], replies[2 * i + 1]
            if state is None:
                result[sid] = Liveness.GONE
            elif state.decode() == SessionState.ENDED:
                result[sid] = Liveness.ENDED
            elif holder is not None and holder.decode() != self.fence.token:
                result[sid] = Liveness.MOVED
            elif not lease:
                result[sid] = Liveness.LEASE_LAPSED
            else:
                result[sid] = Liveness.LIVE
        return result

    async def end_lapsed(self, sid: str) -> None:
        """Nobody renews this session's lease: end it for everyone (the first owner to notice wins)."""
        if await self.store.finalize(sid, Liveness.LEASE_LAPSED.value):
            log.warning("session lease lapsed: ending it", extra={"session_id": sid})

    # --- the loops ---------------------------------------------------------------------------------------

    async def watch(
        self,
        stop: asyncio.Event,
        *,
        sessions: Callable[[], Iterable[str]],
        on_over: Callable[[str, Liveness], Awaitable[None]],
        check_s: float,
    ) -> None:
        """Every `check_s`: sessions that are not live any more are handed to `on_over` (after a lapsed
        lease is finalized for everyone)."""

        async def loop() -> None:
            while not stop.is_set():
                for sid, liveness in (await self.check(sessions())).items():
                    if liveness is Liveness.LEASE_LAPSED:
                        await self.end_lapsed(sid)
                    if liveness is not Liveness.LIVE:
                        await on_over(sid, liveness)
                await sleep_unless_stopped(stop, check_s)

        await keep_running(f"{self.group} session check", loop, stop)

    async def follow_failures(
        self,
        stop: asyncio.Event,
        *,
        capacity: Callable[[], int],
        on_takeover: Callable[[Takeover], Awaitable[None]],
        poll_s: float,
        placing: asyncio.Lock | None = None,
    ) -> None:
        """Every `poll_s`: take over sessions of dead workers, up to `capacity()` at a time. `placing`: a
        lock the worker's own placement holds too, so the two never count the same free slot."""

        async def loop() -> None:
            while not stop.is_set():
                async with placing or contextlib.nullcontext():
                    room = capacity()
                    for takeover in await self.take_over(room) if room > 0 else []:
                        await on_takeover(takeover)
                await sleep_unless_stopped(stop, poll_s)

        await keep_running(f"{self.group} failover", loop, stop)

    async def follow_control(
        self, stop: asyncio.Event, apply: Callable[[ControlMessage], Awaitable[None]], *, start: str
    ) -> None:
        """Tail chorus:control from `start`: stops are remembered, every message goes to `apply`.
        The cursor survives Redis outages (nothing is applied twice or skipped)."""
        cursor = start

        async def loop() -> None:
            nonlocal cursor
            async for message, entry in tail(
                self.bus, self.bus.names.control, CONTROL, start=cursor, stop=stop
            ):
                if isinstance(message, SessionStop):
                    self.stops.remember(message.session_id)
                try:
                    await apply(message)
                except Exception as exc:
                    if is_retryable(exc):
                        raise
                    log.exception("control message failed", extra={"session_id": message.session_id})
                cursor = entry.entry_id

        await keep_running(f"{self.group} control tail", loop, stop)


async def next_seq(bus: Bus, stream: str, codec: Codec[Any]) -> int:
    """The `seq` after the last entry of a stream (0 for none): a worker taking a session over continues
    its numbering, and readers drop repeats by it."""
    last = await bus.last_id(stream)
    if last == "0-0":
        return 0
    entries = await bus.range(stream, last, last)
    try:
        return codec.decode(entries[0].fields).seq + 1 if entries else 0
    except MalformedMessage:
        return 0
