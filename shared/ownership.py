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
- **Control** (`follow_control`): a session's `update`, `stop` and `flush` go on its own control stream
  (`{prefix}s:{sid}:ctl`), and a worker reads only the streams of the sessions it owns, all in one
  blocking XREAD (`SessionControl`): its control work grows with its own sessions, not the fleet's. A
  session is followed from the moment it is taken, from a cursor read at that moment: what was sent
  before is already in what the worker serves (the gateway writes the hash before it sends an `update`,
  and marks a session ended before it sends its `stop`, so an ended session is never taken), what comes
  after is read. Stops read are remembered, so a session stopped while it was being placed is let go.

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

from shared.bus import Bus, Entry, Fence
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


# The last id of a session's control stream ('0-0' for none): where its new owner starts reading it.
# Read in the same script as the take, so a stop sent before it found the session ended (the take refused
# it) and an update sent before it is in the hash (the gateway writes the hash first).
_CONTROL_CURSOR = """
local function control_cursor(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last > 0 then return last[1][1] end
  return '0-0'
end
"""

# KEYS: hash, lease, my owned set, owners registry, the session's control stream. ARGV: field, my token,
# my worker id, session id. Returns {outcome} or {'taken', control cursor}.
_TAKE = (
    _CONTROL_CURSOR
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if redis.call('HGET', KEYS[1], 'state') == 'ended' then return {'ended'} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'lease'} end
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= '' and holder ~= ARGV[2] then return {'owned'} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[3])
return {'taken', control_cursor(KEYS[5])}
"""
)

# Move up to ARGV[4] sessions of a dead worker to this one: each only if its hash still names the dead
# worker and it has not ended (two live workers never both take one). Forgets the dead worker once its
# set is empty. KEYS: owners registry, the dead worker's owned set (or this worker's leftovers), my owned
# set. ARGV: field, dead token, my token, limit, session hash key prefix, dead worker id, my worker id,
# then the session control stream key's head and tail (around the session id). Returns the session ids
# taken, each followed by its control cursor.
_TAKE_OVER = (
    _CONTROL_CURSOR
    + """
local taken = {}
while #taken < 2 * tonumber(ARGV[4]) do
  local sid = redis.call('SPOP', KEYS[2])
  if not sid then break end
  local hash = ARGV[5] .. sid
  if redis.call('HGET', hash, ARGV[1]) == ARGV[2] and redis.call('HGET', hash, 'state') ~= 'ended' then
    redis.call('HSET', hash, ARGV[1], ARGV[3])
    redis.call('SADD', KEYS[3], sid)
    taken[#taken + 1] = sid
    taken[#taken + 1] = control_cursor(ARGV[8] .. sid .. ARGV[9])
  end
end
if ARGV[6] ~= ARGV[7] and redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[1], ARGV[6]) end
if #taken > 0 then redis.call('SADD', KEYS[1], ARGV[7]) end
return taken
"""
)


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


class SessionControl:
    """The control streams of the sessions one worker owns, read together in one blocking XREAD, each from
    its own cursor. `follow` adds a session (waking a read in flight, so its first entry is not held up by
    the others' block), `unfollow` drops it; the cursors outlive Redis outages."""

    def __init__(self, bus: Bus, *, block_ms: int = 500) -> None:
        self.bus = bus
        self.block_ms = block_ms  # capped below the socket timeout by `Bus.read`
        self.cursors: dict[str, str] = {}  # session id -> id of the last entry read (or the take's cursor)
        self._added = asyncio.Event()

    def follow(self, sid: str, cursor: str) -> None:
        """Read the session's control entries after `cursor` (kept if it is followed already)."""
        if sid not in self.cursors:
            self.cursors[sid] = cursor
            self._added.set()

    def unfollow(self, sid: str) -> None:
        self.cursors.pop(sid, None)

    def advance(self, sid: str, entry_id: str) -> None:
        """An entry was handled: the next read starts after it (unless the session was let go meanwhile)."""
        if sid in self.cursors:
            self.cursors[sid] = entry_id

    async def read(self, count: int = 100) -> list[tuple[str, Entry]]:
        """The next entries of the followed sessions, with their session ids; [] after `block_ms` or when
        a session was added meanwhile (the caller reads again, the new one included)."""
        self._added.clear()
        if not self.cursors:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._added.wait(), self.block_ms / 1000)
            return []
        sid_of = {self.bus.names.session_control(sid): sid for sid in self.cursors}
        streams = {stream: self.cursors[sid] for stream, sid in sid_of.items()}
        reading = asyncio.ensure_future(self.bus.read(streams, count=count, block_ms=self.block_ms))
        added = asyncio.ensure_future(self._added.wait())
        try:
            await asyncio.wait({reading, added}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            added.cancel()
            if not reading.done():
                # A session joined: cancel the read (redis-py drops that connection; nothing was consumed:
                # the cursors did not move) and read again with it.
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        if reading.cancelled():
            return []
        return [(sid_of[entry.stream], entry) for entry in reading.result()]


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
        self.control = SessionControl(bus)
        self._moved_in: set[str] = set()  # sessions taken over (not placed) that this worker serves
        # Held from a take-over script to `_moved_in` knowing its sessions, and by `admit`'s take: a start
        # read meanwhile would find the session this worker's already and serve it a second time, afresh.
        self._moving = asyncio.Lock()
        self._take = bus.redis.register_script(_TAKE)
        self._take_over = bus.redis.register_script(_TAKE_OVER)
        self._set_leftovers_aside = bus.redis.register_script(_SET_LEFTOVERS_ASIDE)

    # --- placement ---------------------------------------------------------------------------------

    async def take(self, sid: str) -> TakeOutcome:
        """Own a session that is live and owned by nobody (or already by this worker)."""
        if sid in self.stops:
            return TakeOutcome.ENDED
        names = self.bus.names
        reply = await self._take(
            keys=[
                names.session(sid),
                names.session_lease(sid),
                names.owned(self.group, self.worker_id),
                names.owners(self.group),
                names.session_control(sid),
            ],
            args=[self.fence.field, self.fence.token, self.worker_id, sid],
        )
        outcome = TakeOutcome(reply[0].decode())
        if outcome is TakeOutcome.TAKEN:
            self.control.follow(sid, reply[1].decode())
        return outcome

    async def admit(self, start: SessionStart) -> SessionStart | None:
        """Placement of a `start` this worker read: take the session. Returns what to serve (the start as
        the session hash has it now: an update may have raced it), None when it is not this worker's to
        serve (over, or owned by another); a lapsed lease is finalized on the way."""
        sid = start.session_id
        async with self._moving:
            taken = await self.take(sid)
            moved_in = sid in self._moved_in  # its start came after a takeover (the take was ours already)
        if taken is TakeOutcome.LEASE_LAPSED:
            await self.end_lapsed(sid)
        if taken is not TakeOutcome.TAKEN:
            log.info("start not taken: %s", taken, extra={"session_id": sid, "group": self.group})
            return None
        if moved_in:
            return None
        return start_of(await self.store.get(sid)) or start

    async def release(self, sid: str) -> None:
        """This worker serves the session no more (it ended, or moved)."""
        self.control.unfollow(sid)
        self._moved_in.discard(sid)
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

    async def anything_to_take(self) -> bool:
        """Whether `take_over` would find sessions to move: a dead worker owns some, or this worker's
        leftovers are not all taken."""
        leftovers = self.bus.names.leftovers(self.group, self.worker_id)
        return bool(await self.bus.redis.exists(leftovers)) or bool(await self.dead_owners())

    async def take_over(self, limit: int) -> list[Takeover]:
        """Move up to `limit` sessions of dead workers (and this worker's leftovers) to this one."""
        names = self.bus.names
        control_head, _, control_tail = names.session_control("\n").partition("\n")
        sources = [(dead, names.owned(self.group, dead)) for dead in await self.dead_owners()]
        sources.append((self.worker_id, names.leftovers(self.group, self.worker_id)))
        takeovers: list[Takeover] = []
        for dead, source in sources:
            if len(takeovers) >= limit:
                break
            async with self._moving:
                reply = await self._take_over(
                    keys=[names.owners(self.group), source, names.owned(self.group, self.worker_id)],
                    args=[
                        self.fence.field,
                        self.token_of(dead),
                        self.fence.token,
                        limit - len(takeovers),
                        names.session(""),
                        dead,
                        self.worker_id,
                        control_head,
                        control_tail,
                    ],
                )
                self._moved_in.update(raw.decode() for raw in reply[::2])
            for raw_sid, raw_cursor in zip(reply[::2], reply[1::2], strict=True):
                takeover = await self._takeover(raw_sid.decode(), raw_cursor.decode(), dead)
                if takeover is not None:
                    takeovers.append(takeover)
        return takeovers

    async def _takeover(self, sid: str, cursor: str, dead: str) -> Takeover | None:
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
        self.control.follow(sid, cursor)
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
                # Looked for first, outside the lock: held, it holds a worker's placement and rollovers too.
                if capacity() > 0 and await self.anything_to_take():
                    async with placing or contextlib.nullcontext():
                        room = capacity()
                        for takeover in await self.take_over(room) if room > 0 else []:
                            await on_takeover(takeover)
                await sleep_unless_stopped(stop, poll_s)

        await keep_running(f"{self.group} failover", loop, stop)

    def start_loops(
        self,
        tasks: asyncio.TaskGroup,
        stop: asyncio.Event,
        *,
        apply: Callable[[ControlMessage], Awaitable[None]],
        sessions: Callable[[], Iterable[str]],
        on_over: Callable[[str, Liveness], Awaitable[None]],
        capacity: Callable[[], int],
        on_takeover: Callable[[Takeover], Awaitable[None]],
        check_s: float,
        poll_s: float,
        placing: asyncio.Lock | None = None,
    ) -> None:
        """The loops every owner runs beside its own work: its sessions' control streams (`apply`), their
        liveness (`on_over`) and the failover of dead workers' sessions (`on_takeover`)."""
        tasks.create_task(self.follow_control(stop, apply), name=f"{self.group} control")
        tasks.create_task(
            self.watch(stop, sessions=sessions, on_over=on_over, check_s=check_s),
            name=f"{self.group} liveness",
        )
        tasks.create_task(
            self.follow_failures(
                stop, capacity=capacity, on_takeover=on_takeover, poll_s=poll_s, placing=placing
            ),
            name=f"{self.group} failover",
        )

    async def follow_control(
        self, stop: asyncio.Event, apply: Callable[[ControlMessage], Awaitable[None]]
    ) -> None:
        """Read the control streams of the sessions this worker owns (`SessionControl`): stops are
        remembered, every message goes to `apply`. Nothing is applied twice or skipped, Redis outages
        included (a session's cursor moves past an entry once `apply` returned)."""

        async def loop() -> None:
            while not stop.is_set():
                for sid, entry in await self.control.read():
                    await self._apply_control(sid, entry, apply)

        await keep_running(f"{self.group} control", loop, stop)

    async def _apply_control(
        self, sid: str, entry: Entry, apply: Callable[[ControlMessage], Awaitable[None]]
    ) -> None:
        try:
            message = CONTROL.decode(entry.fields)
        except MalformedMessage as exc:
            log.warning("malformed control entry skipped: %s", exc.detail, extra={"session_id": sid})
        else:
            if isinstance(message, SessionStop):
                self.stops.remember(sid)
            try:
                await apply(message)
            except Exception as exc:
                if is_retryable(exc):
                    raise
                log.exception("control message failed", extra={"session_id": sid})
        self.control.advance(sid, entry.entry_id)


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
