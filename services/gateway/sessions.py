"""`/v1/sessions`: the caller's live sessions, their state, and their transcripts.

Each owner's live session ids sit in a Redis set (`{prefix}owner:{owner}:sessions`, `shared.sessions`)
written when a session starts and ends; it bounds the listing and enforces concurrent sessions per key.
Transcripts come from durable storage (`shared.transcripts`), written while the session runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from services.gateway.auth import current_owner
from services.gateway.problems import V1_ERRORS, problem_responses
from services.gateway.settings import GatewaySettings
from shared.bus import Bus
from shared.errors import NotFound, excerpt
from shared.messages import valid_id
from shared.sessions import SessionInfo, SessionStore
from shared.transcripts import TranscriptLog, TranscriptUnreadable

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
Owner = Annotated[str, Depends(current_owner)]

_ERRORS = {**V1_ERRORS, **problem_responses(404)}


async def clean_transcripts_forever(transcripts: TranscriptLog, settings: GatewaySettings) -> None:
    """Hourly retention sweep; a failed sweep is logged and retried next time."""
    while True:
        try:
            removed = await transcripts.sweep(settings.transcript_retention_s)
            if removed:
                log.info("expired transcripts", extra={"removed": removed})
        except Exception:
            log.exception("transcript cleanup failed")
        await asyncio.sleep(3600)


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
    ended_at: float | None = Field(default=None, description="None while the session runs")
    end_reason: str | None = Field(
        default=None, description="Why it ended: `client_closed`, `session_expired`, `idle_timeout`, ..."
    )


class SessionList(BaseModel):
    items: list[SessionSummary]


class TranscriptExport(BaseModel):
    session_id: str
    persona_id: str
    voice: str
    started_at: float | None
    ended_at: float | None = Field(description="None while the session runs (or if every process died)")
    end_reason: str | None = None
    turns: list[dict[str, Any]] = Field(description="One entry per utterance, in order")


def _bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


def _checked(sid: str) -> str:
    """A path's session id, refused (404) unless it has our ids' form, before it becomes part of a Redis
    key or a storage path: `x:transcript` would name another key of the session (a list, not a hash)."""
    if not valid_id(sid):
        raise NotFound(f"no session {excerpt(sid)}")
    return sid


async def _owned(request: Request, owner: str, sid: str) -> SessionInfo:
    settings = request.app.state.settings
    info = await SessionStore(_bus(request), settings.session_ttl_s).get(_checked(sid))
    if info is None or info.owner != owner:
        raise NotFound(f"no session {excerpt(sid)}")
    return info


def _summary(info: SessionInfo) -> dict[str, Any]:
    return {
        "id": info.session_id,
        "state": info.state or "",
        "voice": info.voice or "",
        "voice_mode": info.voice_mode or "",
        "persona_id": info.persona_id,
        "started_at": info.started_at,
    }


@router.get("", summary="List the caller's live sessions", responses=_ERRORS)
async def list_sessions(request: Request, owner: Owner) -> SessionList:
    store = SessionStore(_bus(request), request.app.state.settings.session_ttl_s)
    items = [
        # A hash that expired since the listing: a summary without details, as the id was listed.
        SessionSummary(**_summary(await store.get(sid) or SessionInfo(session_id=sid)))
        for sid in await store.live_session_ids(owner)
    ]
    return SessionList(items=items)


@router.get(
    "/{session_id}", summary="A session's state, workers, counters and transcript so far", responses=_ERRORS
)
async def get_session(session_id: str, request: Request, owner: Owner) -> SessionDetail:
    info = await _owned(request, owner, session_id)
    store = SessionStore(_bus(request), request.app.state.settings.session_ttl_s)
    return SessionDetail(
        **_summary(info),
        workers={**info.workers, **info.owners},
        counters=info.counters,
        transcript=await store.transcript(session_id),
        ended_at=info.ended_at,
        end_reason=info.end_reason,
    )


@router.get(
    "/{session_id}/transcript",
    summary="A session's transcript, complete so far (while it runs) or whole (after it ended)",
    responses=_ERRORS,
)
async def get_transcript(session_id: str, request: Request, owner: Owner) -> TranscriptExport:
    transcripts: TranscriptLog = request.app.state.transcripts
    try:
        document = await transcripts.document(_checked(session_id))
    except TranscriptUnreadable:
        raise NotFound(f"no transcript for {excerpt(session_id)}") from None
    except NotFound:
        return await _unstored_transcript(request, owner, session_id)
    if document.get("owner", "") != owner:
        raise NotFound(f"no transcript for {excerpt(session_id)}")
    return TranscriptExport.model_validate(document)


async def _unstored_transcript(request: Request, owner: str, sid: str) -> TranscriptExport:
    """A session with no stored transcript: one still opening (its header not written yet) has an empty
    one, as it would a moment later; one whose header storage refused says so; any other has none."""
    try:
        info = await _owned(request, owner, sid)
    except NotFound:
        raise NotFound(f"no transcript for {excerpt(sid)}") from None
    if info.transcript_error:
        raise NotFound(
            f"no transcript for {excerpt(sid)}: it could not be stored when the session began "
            f"({info.transcript_error}; the gateway logged why), and the session runs without one"
        )
    if info.ended:
        raise NotFound(f"no transcript for {excerpt(sid)}")  # deleted past the key's quota
    return TranscriptExport(
        session_id=sid,
        persona_id=info.persona_id,
        voice=info.voice or "",
        started_at=info.started_at,
        ended_at=None,
        turns=[],
    )
