"""Live session state in Redis: the `chorus:session:{sid}` hash, its lease, its transcript list, and the
owner's set of live sessions.

A session's life as every process sees it (docs/architecture.md, "Session lifecycle"):
- `create`: the gateway writes the hash (with the `start` itself, so a worker taking it over after a
  failure needs nothing else) and the lease, before the `start` goes on `chorus:control`;
- `renew_leases`: the gateway keeps the lease of every session whose socket it serves alive;
- `finalize`: whoever ends it (the gateway, or a worker that found its lease lapsed) marks it ended,
  once, and tells every owner with a `stop`.

Redis holds only live, rebuildable state; the durable transcript belongs to `shared.transcripts`.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.bus import Bus
from shared.errors import RateLimited
from shared.messages import ProfileId, Sampling, SessionStart, SessionStop, VoiceMode, VoiceName

TRANSCRIPT_MAX_UTTERANCES = 2000  # the live list (session detail, re-priming); storage keeps them all

# Mark a session ended unless it is gone or already ended; drop its lease. Returns its owner ('' = no
# auth) when this call ended it, nil otherwise: exactly one caller finalizes a session.
_FINALIZE = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'state') == 'ended' then
  return false
end
redis.call('HSET', KEYS[1], 'state', 'ended', 'ended_at', ARGV[1], 'end_reason', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2])
return redis.call('HGET', KEYS[1], 'owner') or ''
"""

# Add a session to its owner's set only while the set is below the limit, atomically (two sockets racing
# for the last slot), and with it its hash (state `placing`) unless it has one: a member without a hash is
# pruned as expired (`live_session_ids`), and another session's start must not prune one still starting.
_REGISTER = """
if ARGV[2] ~= '0' and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], 'state', 'placing', 'owner', ARGV[3],
    'started_at', ARGV[4], 'updated_at', ARGV[4], unpack(ARGV, 6))
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 1
"""


class SessionState(enum.StrEnum):
    PLACING = "placing"
    ACTIVE = "active"
    RESUMING = "resuming"
    ENDED = "ended"


_JSON_FIELDS = ("start", "sampling", "utterance")


class SessionInfo(BaseModel):
    """The session hash, parsed once: every reader of `chorus:session:{sid}` gets this, not raw strings.

    Fields nobody declared are sorted here too: `*worker` and `*_owner` fields name who serves the
    session (`workers`, `owners`), any other all-digit field is a counter (`counters`), the rest is
    ignored. A field that does not parse (a voice written by hand) raises `ValueError` (pydantic's
    ValidationError): no unchecked value reaches a worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_id: str
    state: SessionState | None = None
    owner: str = Field(default="", description="Hash of the API key that owns it ('' = no auth).")
    voice: VoiceName | None = Field(default=None, description="The latest voice (updates change it).")
    voice_mode: VoiceMode | None = None
    persona_id: str = ""
    started_at: float | None = None
    updated_at: float | None = None
    resumed_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    start: SessionStart | None = Field(default=None, description="The start as the gateway wrote it.")
    sampling: Sampling | None = Field(default=None, description="The latest sampling, once updated.")
    adapter: ProfileId | None = Field(default=None, description="The latest LoRA adapter, once updated.")
    adapter_served: ProfileId | None = Field(
        default=None,
        description="The adapter the worker last switched the session's rows to (absent: the start's). "
        "Until it switches, a switch the gateway wrote to `adapter` may be refused: the rows keep this one.",
    )
    utterance: dict[str, Any] | None = Field(
        default=None, description="The dialogue's unfinished utterance (kept for a worker taking over)."
    )
    transcript_error: str | None = Field(
        default=None,
        description="Why the durable transcript could not begin (`storage_failed`): the session runs "
        "without one, and its export says so.",
    )
    workers: dict[str, str] = Field(default_factory=dict)
    owners: dict[str, str] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def from_hash(cls, sid: str, raw: Mapping[str, str]) -> SessionInfo:
        known = set(cls.model_fields) - {"session_id", "workers", "owners", "counters"}
        fields: dict[str, Any] = {k: v for k, v in raw.items() if k in known and v != ""}
        for name in _JSON_FIELDS:
            if name in fields:
                fields[name] = json.loads(fields[name])
        workers = {k: v for k, v in raw.items() if k.endswith("worker")}
        owners = {k: v for k, v in raw.items() if k.endswith("_owner")}
        counters = {k: int(v) for k, v in raw.items() if v.isdigit() and k not in workers and k not in owners}
        return cls(session_id=sid, workers=workers, owners=owners, counters=counters, **fields)

    @property
    def ended(self) -> bool:
        return self.state is SessionState.ENDED


def start_of(info: SessionInfo | None) -> SessionStart | None:
    """The session's `start` as the gateway wrote it, with what updates changed since (voice, mode,
    sampling, adapter): what a worker taking the session over serves. None for a hash without one."""
    if info is None or info.start is None:
        return None
    start = info.start
    changes: dict[str, Any] = {}
    if info.voice:
        changes["voice"] = info.voice
    if info.voice_mode:
        changes["voice_mode"] = info.voice_mode
    if info.sampling:
        # An update that names no seed keeps the session's own (as the worker serving it does).
        kept = start.persona.sampling
        seeds = {
            name: getattr(kept, name)
            for name in ("text_seed", "audio_seed")
            if getattr(info.sampling, name) is None
        }
        sampling = info.sampling.model_copy(update=seeds)
        changes["persona"] = start.persona.model_copy(update={"sampling": sampling})
    if info.adapter:
        persona = changes.get("persona", start.persona)
        changes["persona"] = persona.model_copy(update={"adapter": info.adapter})
    # Every value was validated when the hash was parsed.
    return start.model_copy(update=changes) if changes else start


def _state(raw: bytes | None) -> SessionState | None:
    return SessionState(raw.decode()) if raw is not None else None


class SessionStore:
    def __init__(self, bus: Bus, ttl_s: int) -> None:
        self.bus = bus
        self.ttl_s = ttl_s
        self._finalize = bus.redis.register_script(_FINALIZE)
        self._register = bus.redis.register_script(_REGISTER)

    # --- the hash --------------------------------------------------------------------------------

    async def create(self, start: SessionStart, *, lease_s: float, **fields: str | float) -> None:
        """The session hash (state `placing`, the start itself) and its first lease, in one transaction."""
        sid = start.session_id
        now = time.time()
        mapping = {
            "state": SessionState.PLACING,
            "owner": start.owner,
            "voice": start.voice,
            "voice_mode": start.voice_mode,
            "persona_id": start.persona.id,
            "started_at": now,
            "updated_at": now,
            "start": start.model_dump_json(),
            **fields,
        }
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.bus.names.session(sid), mapping={k: str(v) for k, v in mapping.items()})
            pipe.expire(self.bus.names.session(sid), self.ttl_s)
            pipe.set(self.bus.names.session_lease(sid), b"1", px=int(lease_s * 1000))
            await pipe.execute()

    async def open(self, start: SessionStart, *, lease_s: float, **fields: str | float) -> None:
        """`create` the session (with `fields`), then hand its `start` to the workers (in that order: a
        worker that reads the start must find the hash)."""
        await self.create(start, lease_s=lease_s, **fields)
        await self.bus.append_control(start)

    async def update(self, sid: str, **fields: str | int | float) -> None:
        """Set fields and refresh the TTL (live sessions keep refreshing it; dead ones age out)."""
        key = self.bus.names.session(sid)
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={k: str(v) for k, v in {**fields, "updated_at": time.time()}.items()})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def get(self, sid: str) -> SessionInfo | None:
        """The session hash, parsed; None when there is none (never created, or expired)."""
        raw = await self.bus.redis.hgetall(self.bus.names.session(sid))
        if not raw:
            return None
        return SessionInfo.from_hash(sid, {k.decode(): v.decode() for k, v in raw.items()})

    # --- lease and end -------------------------------------------------------------------------------

    async def renew_leases(self, sids: Iterable[str], lease_s: float) -> dict[str, SessionState | None]:
        """Extend the leases of sessions still running (one round trip for all); returns each session's
        state, None when its hash is gone. An ended or gone session's lease is not renewed."""
        sids = list(sids)
        if not sids:
            return {}
        names = self.bus.names
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hget(names.session(sid), "state")
            states = [_state(s) for s in await pipe.execute()]
        running = [
            sid for sid, state in zip(sids, states, strict=True) if state not in (None, SessionState.ENDED)
        ]
        if running:
            async with self.bus.redis.pipeline(transaction=False) as pipe:
                for sid in running:
                    pipe.set(names.session_lease(sid), b"1", px=int(lease_s * 1000))
                    pipe.expire(names.session(sid), self.ttl_s)
                    pipe.expire(names.session_transcript(sid), self.ttl_s)  # its words last as long
                await pipe.execute()
        return dict(zip(sids, states, strict=True))

    async def finalize(self, sid: str, reason: str, *, owner: str | None = None) -> bool:
        """End a session for everyone: mark it ended (once), drop its lease, take it out of its owner's
        live set and append a `stop` (workers find it ended when they read the stop). True when this call
        ended it. `owner`: the API key owner, when the caller knows it (the hash may be gone)."""
        names = self.bus.names
        ended_owner = await self._finalize(
            keys=[names.session(sid), names.session_lease(sid)], args=[time.time(), reason, self.ttl_s]
        )
        ended = ended_owner is not None
        who = owner if owner is not None else (ended_owner.decode() if ended else None)
        if who is not None:
            await self.bus.redis.srem(names.owner_sessions(who), sid)
        if ended or owner is not None:
            await self.bus.append_control(SessionStop(session_id=sid, reason=reason))
        return ended

    # --- the owner's live sessions -------------------------------------------------------------------

    async def live_session_ids(self, owner: str) -> list[str]:
        """An owner's live sessions; prunes ids whose hash expired or ended."""
        key = self.bus.names.owner_sessions(owner)
        ids = sorted(m.decode() for m in await self.bus.redis.smembers(key))
        live = []
        for sid in ids:
            state = _state(await self.bus.redis.hget(self.bus.names.session(sid), "state"))
            if state is None or state is SessionState.ENDED:
                await self.bus.redis.srem(key, sid)
            else:
                live.append(sid)
        return live

    async def using_adapter(self, owner: str, adapter_id: str) -> list[str]:
        """The owner's live sessions that run `adapter_id` or may still: the latest update's (else the
        start's), or the one the worker serves until it has switched (`adapter_served`, else the start's: a
        switch in flight may be refused, and the rows keep it). Their hashes read in one round trip.
        Nothing is pruned: a session counted before its hash is written has no adapter yet (its start
        checks the adapter again once it has)."""
        names = self.bus.names
        ids = sorted(m.decode() for m in await self.bus.redis.smembers(names.owner_sessions(owner)))
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.hgetall(names.session(sid))
            hashes = await pipe.execute()
        users = []
        for sid, raw in zip(ids, hashes, strict=True):
            info = SessionInfo.from_hash(sid, {k.decode(): v.decode() for k, v in raw.items()})
            start = start_of(info)
            if info.ended or start is None or info.start is None:
                continue
            served = info.adapter_served or info.start.persona.adapter
            if adapter_id in (start.persona.adapter, served):
                users.append(sid)
        return users

    async def register(
        self, owner: str, sid: str, limit: int, described: dict[str, str] | None = None
    ) -> list[str]:
        """Count a new session against its owner's limit (0 = unlimited); RateLimited when full. Returns the
        owner's live sessions, this one among them (read for the count: no second look needed). Its hash
        is begun with it (state `placing`, and what `described` says of it: voice, persona..., so that
        `/v1/sessions` shows them at once; `create` writes the rest): counted without one, it would look
        expired to another session of the owner starting meanwhile, be pruned from the set, and a delete of
        its adapter would miss it (`using_adapter`)."""
        live = await self.live_session_ids(owner)
        keys = [self.bus.names.owner_sessions(owner), self.bus.names.session(sid)]
        args = [sid, str(limit), owner, time.time(), self.ttl_s]
        args += [item for pair in (described or {}).items() for item in pair]
        if not await self._register(keys=keys, args=args):
            raise RateLimited(f"this API key already has {limit} live sessions", limit=limit)
        return [*live, sid]

    # --- the live transcript ---------------------------------------------------------------------------

    async def append_utterance(self, sid: str, utterance: dict[str, Any]) -> None:
        """Append one finished utterance to the live list (bounded; storage keeps every one)."""
        key = self.bus.names.session_transcript(sid)
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, json.dumps(utterance))
            pipe.ltrim(key, -TRANSCRIPT_MAX_UTTERANCES, -1)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def transcript(self, sid: str, *, last: int | None = None) -> list[dict[str, Any]]:
        """The live transcript, or its `last` utterances only."""
        if last is not None and last <= 0:
            return []
        start = -last if last is not None else 0
        raw = await self.bus.redis.lrange(self.bus.names.session_transcript(sid), start, -1)
        return [json.loads(item) for item in raw]

    # --- what workers record and read in the hash ------------------------------------------------------

    async def save_progress(self, went_live: Iterable[str], utterances: Mapping[str, str | None]) -> None:
        """A dialogue tick's hash updates, in one round trip: `active` for the sessions that went live, and
        each session's utterance in progress (JSON; None: none, the field goes) for a worker taking the
        session over."""
        names, now = self.bus.names, str(time.time())
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for sid in went_live:
                pipe.hset(names.session(sid), mapping={"state": SessionState.ACTIVE, "updated_at": now})
            for sid, utterance in utterances.items():
                if utterance is not None:
                    pipe.hset(names.session(sid), "utterance", utterance)
                else:
                    pipe.hdel(names.session(sid), "utterance")
            await pipe.execute()

    async def count(self, sid: str, counter: str, by: int = 1) -> None:
        """Add to a counter of the session hash (the session detail's `counters`)."""
        key = self.bus.names.session(sid)
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, counter, by)
            pipe.expire(key, self.ttl_s)  # a hash gone meanwhile is not left behind for good
            await pipe.execute()

    async def clear_utterance(self, sid: str) -> None:
        """Forget the utterance in progress a dead worker left in the hash (it was recorded)."""
        await self.bus.redis.hdel(self.bus.names.session(sid), "utterance")

    async def dialogue_worker(self, sid: str) -> str:
        """The dialogue worker serving the session ('' before one took it)."""
        worker = await self.bus.redis.hget(self.bus.names.session(sid), "dialogue_worker")
        return worker.decode() if worker else ""

    async def tts_workers(self, sids: Sequence[str]) -> list[str]:
        """The TTS worker named in each session's hash ('' where none is yet), in one round trip."""
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hget(self.bus.names.session(sid), "tts_worker")
            named: list[bytes | None] = await pipe.execute()
        return [worker.decode() if worker else "" for worker in named]
