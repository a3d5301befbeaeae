"""What both WebSocket protocols share: authenticating the socket, opening a Conversation with a
persona and voice, and running the receive / emit loops in one TaskGroup that ends the session when
either side finishes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from services.gateway.admission import Admission
from services.gateway.conversation import Conversation
from services.gateway.settings import GatewaySettings
from shared.errors import ChorusError, InvalidRequest
from shared.messages import NATIVE_VOICES, VOICE_PATTERN, PersonaSpec, VoiceMode

log = logging.getLogger(__name__)


class SocketClosed(Exception):
    """The client went away: end the session quietly."""


def check_voice(voice: str) -> str:
    if not re.match(VOICE_PATTERN, voice):
        raise InvalidRequest(f"unknown voice {voice!r}: use {' or '.join(NATIVE_VOICES)} or profile:<id>")
    return voice


async def resolve_persona(
    websocket: WebSocket, owner: str, persona_id: str | None, primer: str | None = None
) -> PersonaSpec:
    """The persona a conversation runs with: a stored/built-in one by id, with per-session overrides."""
    resolver = getattr(websocket.app.state, "resolve_persona", None)
    if resolver is not None:
        persona: PersonaSpec = await resolver(owner, persona_id, {"primer": primer} if primer else {})
        return persona
    if persona_id not in (None, "", "default"):
        raise InvalidRequest(f"unknown persona {persona_id!r}")
    return PersonaSpec(primer=primer or "")


def open_conversation(
    websocket: WebSocket,
    owner: str,
    persona: PersonaSpec,
    voice: str,
    voice_mode: VoiceMode,
    *,
    session_id: str | None = None,
) -> Conversation:
    settings: GatewaySettings = websocket.app.state.settings
    state = websocket.app.state
    return Conversation(
        state.bus,
        owner=owner,
        persona=persona,
        voice=voice,
        voice_mode=voice_mode,
        session_id=session_id,
        session_ttl_s=settings.session_ttl_s,
        max_sessions=settings.max_sessions_per_key,
        lease_s=settings.session_lease_s,
        leases=state.leases,
        transcripts=state.transcripts,
    )


async def place(websocket: WebSocket, conversation: Conversation) -> None:
    """Start the conversation and wait until its session is ready: refused at once when Redis is nearly
    full or too many conversations already wait for a slot; NoCapacity after the placement wait."""
    settings: GatewaySettings = websocket.app.state.settings
    admission: Admission = websocket.app.state.admission
    await admission.check_memory()
    async with admission.in_queue():
        await conversation.start()
        await conversation.wait_ready(settings.placement_wait_s, settings.session_ready_timeout_s)


async def run_loops(
    conversation: Conversation, receive: Callable[[], Awaitable[None]], emit: Callable[[], Awaitable[None]]
) -> str:
    """Run both loops; the first to finish (client gone, session ended) cancels the other.

    Returns why the session ended. The session is always stopped (its dialogue slot freed).
    """
    reason = "client_closed"

    async def guarded(name: str, loop: Callable[[], Awaitable[None]]) -> None:
        nonlocal reason
        try:
            await loop()
            if name == "emit":
                reason = "session_ended"
        except (SocketClosed, WebSocketDisconnect):
            reason = "client_closed"
        except ChorusError as exc:
            reason = exc.code
            log.warning("session failed: %s", exc.detail, extra=conversation.log_extra)
        finally:
            for task in tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    tasks: list[asyncio.Task[None]] = []
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.TaskGroup() as group:
            tasks.append(group.create_task(guarded("receive", receive), name="receive_loop"))
            tasks.append(group.create_task(guarded("emit", emit), name="emit_loop"))
    await conversation.stop(reason)
    return reason


async def close_quietly(websocket: WebSocket, code: int = 1000, reason: str = "") -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code, reason[:120])
