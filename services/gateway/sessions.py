"""`/v1/sessions`: the caller's live sessions, their state, and transcript exports after they end.

Each owner's live session ids sit in a Redis set (`{prefix}owner:{owner}:sessions`) written by
`Conversation.start/stop`; it bounds the listing and enforces concurrent sessions per key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from services.gateway.auth import current_owner
from services.gateway.problems import V1_ERRORS, problem_responses
from services.gateway.settings import GatewaySettings
from shared.bus import Bus
from shared.errors import NotFound, RateLimited
from shared.sessions import SessionState, SessionStore
from shared.storage import Storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
Owner = Annotated[str, Depends(current_owner)]

_ERRORS = {**V1_ERRORS, **problem_responses(404)}

# Add a member only while the set is below the limit, atomically (two sockets racing for the last slot).
_ADD_BOUNDED = """
if ARGV[2] ~= '0' and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


def owner_sessions_key(bus: Bus, owner: str) -> str:
    return bus.names.owner_sessions(owner)


async def live_session_ids(bus: Bus, owner: str) -> list[str]:
    """The owner's live sessions; prunes ids whose hash expired or ended (a gateway that crashed)."""
    key = owner_sessions_key(bus, owner)
    ids = sorted(m.decode() for m in await bus.redis.smembers(key))
    live = []
    for sid in ids:
        state = await bus.redis.hget(bus.names.session(sid), "state")
        if state is None or state.decode() == SessionState.ENDED:
            await bus.redis.srem(key, sid)
        else:
            live.append(sid)
    return live


async def register_session(bus: Bus, owner: str, sid: str, limit: int) -> None:
    """Count a new session against its owner's limit (0 = unlimited); RateLimited when full."""
    await live_session_ids(bus, owner)
    added = await bus.redis.eval(_ADD_BOUNDED, 1, owner_sessions_key(bus, owner), sid, str(limit))
    if not added:
        raise RateLimited(f"this API key already has {limit} live sessions", limit=limit)


async def unregister_session(bus: Bus, owner: str, sid: str) -> None:
    await bus.redis.srem(owner_sessions_key(bus, owner), sid)


def transcript_key(sid: str) -> str:
    return f"transcripts/{sid}.json"


async def export_transcript(bus: Bus, storage: Storage, store: SessionStore, sid: str) -> None:
    """Write the durable JSON export of an ended session (owner inside, for isolation on read)."""
    info = await store.get(sid)
    document = {
        "session_id": sid,
        "owner": info.get("owner", ""),
        "persona_id": info.get("persona_id", ""),
        "voice": info.get("voice", ""),
        "started_at": _float(info.get("started_at")),
        "ended_at": _float(info.get("ended_at")) or time.time(),
        "exported_at": time.time(),
        "turns": await store.transcript(sid),
    }
    await storage.put(transcript_key(sid), json.dumps(document).encode())


async def cleanup_transcripts(storage: Storage, retention_s: float, now: float | None = None) -> int:
    """Delete exports older than the retention; returns how many went."""
    now = now if now is not None else time.time()
    removed = 0
    for key in await storage.list("transcripts/"):
        try:
            document = json.loads(await storage.get(key))
        except (NotFound, ValueError):
            continue
        if now - float(document.get("exported_at", 0)) > retention_s:
            await storage.delete(key)
            removed += 1
    return removed


async def clean_transcripts_forever(storage: Storage, settings: GatewaySettings) -> None:
    """Hourly retention sweep; a failed sweep is logged and retried next time."""
    while True:
        try:
            removed = await cleanup_transcripts(storage, settings.transcript_retention_s)
            if removed:
                log.info("expired transcript exports", extra={"removed": removed})
        except Exception:
            log.exception("transcript cleanup failed")
        await asyncio.sleep(3600)


def _float(value: str | None) -> float | None:
    return float(value) if value else None


class SessionSummary(BaseModel):
    id: str
    state: str
    voice: str
    voice_mode: str
    persona_id: str
    started_at: float | None


class SessionDetail(SessionSummary):
    workers: dict[str, str]
    counters: dict[str, int]
    transcript: list[dict[str, Any]]


class SessionList(BaseModel):
    items: list[SessionSummary]


class TranscriptExport(BaseModel):
    session_id: str
    persona_id: str
    voice: str
    started_at: float | None
    ended_at: float | None
    turns: list[dict[str, Any]]


def _bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


async def _owned(request: Request, owner: str, sid: str) -> dict[str, str]:
    settings = request.app.state.settings
    info = await SessionStore(_bus(request), settings.session_ttl_s).get(sid)
    if not info or info.get("owner", "") != owner:
        raise NotFound(f"no session {sid!r}")
    return info


def _summary(sid: str, info: dict[str, str]) -> dict[str, Any]:
    return {
        "id": sid,
        "state": info.get("state", ""),
        "voice": info.get("voice", ""),
        "voice_mode": info.get("voice_mode", ""),
        "persona_id": info.get("persona_id", ""),
        "started_at": _float(info.get("started_at")),
    }


@router.get("", summary="List the caller's live sessions", responses=_ERRORS)
async def list_sessions(request: Request, owner: Owner) -> SessionList:
    bus = _bus(request)
    store = SessionStore(bus, request.app.state.settings.session_ttl_s)
    items = [
        SessionSummary(**_summary(sid, await store.get(sid))) for sid in await live_session_ids(bus, owner)
    ]
    return SessionList(items=items)


@router.get(
    "/{session_id}", summary="A session's state, workers, counters and transcript so far", responses=_ERRORS
)
async def get_session(session_id: str, request: Request, owner: Owner) -> SessionDetail:
    info = await _owned(request, owner, session_id)
    store = SessionStore(_bus(request), request.app.state.settings.session_ttl_s)
    workers = {k: v for k, v in info.items() if k.endswith("worker") or k.endswith("_owner")}
    counters = {k: int(v) for k, v in info.items() if v.isdigit() and k not in workers}
    return SessionDetail(
        **_summary(session_id, info),
        workers=workers,
        counters=counters,
        transcript=await store.transcript(session_id),
    )


@router.get(
    "/{session_id}/transcript",
    summary="The JSON transcript export of an ended session",
    responses=_ERRORS,
)
async def get_transcript(session_id: str, request: Request, owner: Owner) -> TranscriptExport:
    storage: Storage = request.app.state.storage
    if not session_id.replace("_", "").isalnum():
        raise NotFound(f"no transcript for {session_id!r}")
    document = json.loads(await storage.get(transcript_key(session_id)))
    if document.get("owner", "") != owner:
        raise NotFound(f"no transcript for {session_id!r}")
    return TranscriptExport.model_validate(document)
