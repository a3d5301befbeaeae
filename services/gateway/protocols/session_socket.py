"""What both WebSocket protocols share: authenticating the socket, opening a Conversation with a
persona and voice, running the receive / emit loops in one TaskGroup that ends the session when either
side finishes, and stopping the conversation however the socket's life ends.

Every way out is accounted for: the client leaving (before, while or after the session gets a slot),
a protocol or placement error, an unexpected exception in a loop (logged with the session id, the client
told with a protocol error before the close), and the server shutting down. `serve_and_stop` guarantees
`conversation.stop(reason)` for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableSequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from services.gateway.adapters import check_adapter_served, confirm_adapter_kept
from services.gateway.admission import Admission
from services.gateway.auth import KeyRing
from services.gateway.conversation import Conversation
from services.gateway.fair_websocket import FAIR_RECEIVE
from services.gateway.problems import outage_error
from services.gateway.settings import GatewaySettings
from services.gateway.voices import check_native_voice_served, check_voice_usable, served_native_voice
from shared.errors import (
    ChorusError,
    ClientNotReading,
    InvalidRequest,
    LifetimeReached,
    Unauthorized,
)
from shared.messages import NATIVE_VOICES, PersonaSpec, VoiceMode, parse_voice
from shared.runtime import cancel_and_wait
from shared.voice_profiles import VoiceProfileStore

log = logging.getLogger(__name__)

SERVICE_RESTART = 1012  # the close code uvicorn gives a socket when the server shuts down
POLICY_VIOLATION = 1008  # a client that broke a socket limit it cannot be served past (it stopped reading)
CLOSE_TIMEOUT_S = 10.0  # a close frame waits this long for a client that does not read (uvicorn's too)


class SocketClosed(Exception):
    """The client went away, or the server closed the socket while shutting down: end the session quietly."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(code)
        self.reason = closed_reason(code)


# Close codes the server's WebSocket layer gives a socket whose client broke the protocol (RFC 6455): the
# session ends for that, not because its client left.
PROTOCOL_FAILURES = {1002: "protocol_error", 1007: "invalid_payload", 1009: "message_too_big"}


def closed_reason(code: int | None) -> str:
    if code == SERVICE_RESTART:
        return "shutdown"
    return PROTOCOL_FAILURES.get(code or 0, "client_closed")


@dataclass(frozen=True)
class Ending:
    """Why a socket's session ended, and the error the client was told (None: a normal end)."""

    reason: str
    error: ChorusError | None = None

    @property
    def close_code(self) -> int:
        if self.error is None or isinstance(self.error, LifetimeReached):
            return 1000  # a lifetime policy ends a session normally: the close reason says which
        if isinstance(self.error, (ClientNotReading, Unauthorized)):
            return POLICY_VIOLATION
        if self.error.retryable:
            return 1013  # try again later
        # What the client asked for cannot be served (a worker refused its adapter: 4xx), or a failure.
        return POLICY_VIOLATION if self.error.status < 500 else 1011


def as_refusal(exc: Exception) -> ChorusError | None:
    """What a handshake's failure tells the client: a ChorusError as it is, Redis or the data volume
    away as its outage (`service_unavailable`, retryable); None: a bug, which the caller raises."""
    return exc if isinstance(exc, ChorusError) else outage_error(exc)


def refusal_close_code(error: ChorusError) -> int:
    """The close code of a socket refused at open: 1013 (try again later) when waiting helps (over the
    auth failure budget, Redis away), else 1008 (a wrong key, voice or persona)."""
    return 1013 if error.retryable else POLICY_VIOLATION


Report = Callable[[ChorusError], None]  # queues a protocol error for the client


_QUOTED_VOICE_MAX = 64  # a longer voice named in an error is cut short: an error never echoes a megabyte


def check_voice(voice: str) -> str:
    try:
        return parse_voice(voice)
    except ValueError as exc:
        detail = str(exc)
        if len(voice) > _QUOTED_VOICE_MAX:
            cut = f"{voice[:_QUOTED_VOICE_MAX]!r}... ({len(voice)} characters)"
            detail = detail.replace(repr(voice), cut)
        raise InvalidRequest(detail) from None


async def check_voice_owned(conn: HTTPConnection, owner: str, voice: str) -> None:
    """A cloned voice must be the caller's own: another key's profile is refused at once, exactly like a
    missing one (the TTS worker checks again when it switches voices); a catalog voice must be in the
    TTS workers' catalog (`voices.check_voice_usable`). Sockets and the client secret route ask it."""
    store: VoiceProfileStore = conn.app.state.voices
    await check_voice_usable(store, conn.app.state.bus, owner, voice)


async def starting_voice(
    conn: HTTPConnection, owner: str, asked: str | None, model: str | None, persona_id: str | None
) -> str:
    """The voice a session starts with, checked (`check_voice_owned`): the one the client asked for (`?voice=`
    or its client secret's), else its model's own when the client named one of Moshi's models, else its
    persona's default voice, else the native voice of the model that runs (`served_native_voice`). A
    persona that is not the caller's names none here: the session's start refuses it (`resolve_persona`)."""
    if asked:
        voice = check_voice(asked)
    elif model in NATIVE_VOICES:
        voice = model
    else:
        persona_voice = await conn.app.state.personas.voice_of(owner, persona_id)
        voice = persona_voice or await served_native_voice(conn.app.state.bus)
    await check_voice_owned(conn, owner, voice)
    return voice


async def resolve_persona(
    websocket: WebSocket,
    owner: str,
    persona_id: str | None,
    primer: str | None = None,
    sampling: dict[str, Any] | None = None,
    adapter: str | None = None,
) -> PersonaSpec:
    """The persona a conversation runs with: a stored/built-in one by id, with per-session overrides (a
    primer; `sampling`: some of its fields, over the persona's own; a LoRA adapter: the caller's own)."""
    overrides: dict[str, Any] = {"primer": primer} if primer else {}
    if sampling:
        overrides["sampling"] = sampling
    if adapter:
        overrides["adapter"] = adapter
    persona: PersonaSpec = await websocket.app.state.resolve_persona(owner, persona_id, overrides)
    if persona.adapter is not None:
        await check_adapter_served(websocket, owner, persona.adapter)
    return persona


def open_conversation(
    websocket: WebSocket,
    owner: str,
    persona: PersonaSpec,
    voice: str,
    voice_mode: VoiceMode,
    *,
    session_id: str | None = None,
    idle_timeout_s: float | None = None,
) -> Conversation:
    """A Conversation under this gateway's settings; `idle_timeout_s` overrides CHORUS_IDLE_TIMEOUT_S (a
    realtime client's `idle_timeout_ms`, already bounded)."""
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
        reader=state.outputs,
        max_session_s=settings.max_session_s,
        idle_timeout_s=settings.idle_timeout_s if idle_timeout_s is None else idle_timeout_s,
        writer=state.inputs,
    )


async def place(websocket: WebSocket, conversation: Conversation, early: MutableSequence[Message]) -> None:
    """Start the conversation and wait until its session is ready, watching the socket meanwhile
    (`wait_ready_watching`: what the client sends meanwhile goes to `early`, ready or refused): refused at
    once when Redis is nearly full or too many conversations already wait for a slot, or when its adapter
    was deleted while it started (`confirm_adapter_kept`); NoCapacity after the placement wait."""
    admission: Admission = websocket.app.state.admission
    await admission.check_memory()
    await check_native_voice_served(websocket.app.state.bus, conversation.voice)
    async with admission.in_queue():
        await conversation.start()
        if (adapter := conversation.persona.adapter) is not None:
            await confirm_adapter_kept(websocket, conversation.owner, adapter)
        await wait_ready_watching(websocket, conversation, early)


async def receive_fairly(websocket: WebSocket) -> Message:
    """The next message; one that was already waiting only after letting every other task run once.
    Receiving does not yield while messages are already queued (uvicorn parses a whole TCP read,
    thousands of tiny messages, at once): a client flooding its socket would otherwise hold the event
    loop, and every other request, for as long as the flood lasts. The gateway's own protocol yields
    itself, and only when a message was already waiting (`FAIR_RECEIVE`): a receive that waits for the
    client costs no extra loop turn. Under another server this yields before every message."""
    if FAIR_RECEIVE not in (websocket.scope.get("extensions") or {}):
        await asyncio.sleep(0)
    return await websocket.receive()


async def wait_ready_watching(
    websocket: WebSocket, conversation: Conversation, early: MutableSequence[Message]
) -> None:
    """`conversation.wait_ready` while reading the socket: a client that leaves meanwhile ends the wait
    (`SocketClosed`) instead of holding a dialogue slot until the session is ready.

    What the client sent meanwhile goes to `early` in order, for the receive loop to handle first (audio
    before `ready` would not be heard; keeping it keeps what the client said), whether the session is
    ready or refused: a refused start's socket stays open, and what was sent while it was placed (a
    `session.update`, say) was lost with the refusal, never answered. At most a socket rate limit's burst
    is kept, what the receive loop accepts at once anyway, and at most two of the largest messages' worth
    of bytes; the rest is dropped.
    """
    settings: GatewaySettings = websocket.app.state.settings
    max_early = int(2 * settings.ws_messages_per_second)
    max_early_bytes = 2 * settings.ws_max_message_bytes
    early_bytes = dropped = 0

    async def watch() -> None:
        nonlocal dropped, early_bytes
        while True:
            message = await receive_fairly(websocket)
            if message["type"] == "websocket.disconnect":
                raise SocketClosed(message.get("code"))
            size = len(message.get("bytes") or b"") + len(message.get("text") or "")
            if len(early) < max_early and early_bytes + size <= max_early_bytes:
                early.append(message)
                early_bytes += size
            else:
                dropped += 1

    watcher = asyncio.create_task(watch(), name="ready_watch")
    ready = asyncio.create_task(
        conversation.wait_ready(settings.placement_wait_s, settings.session_ready_timeout_s),
        name="wait_ready",
    )
    try:
        await asyncio.wait({watcher, ready}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(watcher, ready)
    if dropped:
        log.info(
            "dropped %d messages sent before the session was ready", dropped, extra=conversation.log_extra
        )
    if not watcher.cancelled():
        watcher.result()  # the client left (or reading failed): that ends the session first
    ready.result()  # the session was refused, or did not get a slot in time


async def guarded(work: Awaitable[None], log_extra: dict[str, str], report: Report) -> Ending | None:
    """Await `work`: None when it returns, else why the session ends. Errors are reported to the client
    (`report` queues a protocol error) before the socket closes; unexpected ones are logged in full."""
    try:
        await work
    except SocketClosed as exc:
        return Ending(exc.reason)
    except WebSocketDisconnect as exc:
        return Ending(closed_reason(exc.code))
    except LifetimeReached as exc:
        extra = {**log_extra, "reason": exc.code}
        log.info("session ended by its lifetime policy: %s", exc.detail, extra=extra)
        report(exc)
        return Ending(exc.code, exc)
    except ChorusError as exc:
        log.warning("session failed: %s", exc.detail, extra=log_extra)
        report(exc)
        return Ending(exc.code, exc)
    except Exception as exc:
        log.exception("session failed unexpectedly", extra=log_extra)
        # The client learns what kind of failure it was, never our internals (those are in the log).
        error = outage_error(exc) or ChorusError("internal error; the session ended")
        report(error)
        return Ending("error", error)
    return None


async def watch_key(keys: KeyRing, owner: str) -> None:
    """Raises Unauthorized once no configured key belongs to `owner`: a key revoked in the keys file ends
    its open sessions too, within the file's reload period (each gateway re-reads the file itself)."""
    if not keys.enabled:
        await asyncio.Event().wait()  # nothing to revoke: until the other loops end
    while True:  # the keys file has no change event: it is looked at every reload period anyway
        if not keys.has_owner(owner):
            raise Unauthorized("the API key of this session was revoked")
        await asyncio.sleep(keys.reload_s)


Loop = Callable[[], Awaitable[None]]


async def run_loops(
    log_extra: dict[str, str],
    report: Report,
    *,
    send: Loop,
    drained: Callable[[], Awaitable[object]],
    receive: Loop,
    emit: Loop,
    key: Loop,
    place: Loop | None = None,
) -> Ending:
    """Serve a socket with one TaskGroup for every task it starts: the `send` loop (draining the send
    queue to the client) throughout; `place` first, if given; then the receive and emit loops and the `key`
    watch, the first of which to finish (client gone, session ended, its key revoked, an error) cancels
    the others. What is queued for the client (an error saying why, above all) is sent before returning
    (`drained`, bounded).

    Returns why the session ended: a refused placement, or the first loop's end. The receive loop only
    ends by an exception, the emit loop returns when the session is over (`session_ended`), the `key` watch
    raises when the key is revoked (`watch_key`). A cancellation from outside (the server shutting down)
    cancels every task and propagates; stopping the conversation is the caller's `finally`.

    Every task is cancelled with `cancel_and_wait` before the group exits: the group cancels only once,
    and one cancel can be lost on Python 3.11, which would hold the socket's handler forever.
    """
    async with asyncio.TaskGroup() as group:
        sender = group.create_task(_sending(send, log_extra), name="send_loop")
        try:
            ending = await guarded(place(), log_extra, report) if place is not None else None
            if ending is None:
                loops = {"receive_loop": receive, "emit_loop": emit, "key_watch": key}
                ending = await _first_ending(group, log_extra, report, loops)
            if not sender.done():
                await drained()
        finally:
            await cancel_and_wait(sender)
    return ending


async def _first_ending(
    group: asyncio.TaskGroup, log_extra: dict[str, str], report: Report, loops: dict[str, Loop]
) -> Ending:
    endings: list[Ending] = []

    async def run(body: Loop) -> None:
        endings.append(await guarded(body(), log_extra, report) or Ending("session_ended"))

    tasks = [group.create_task(run(body), name=name) for name, body in loops.items()]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(*tasks)  # also when we are cancelled: no loop outlives the socket
    return endings[0]


async def _sending(send: Loop, log_extra: dict[str, str]) -> None:
    """The send loop, which ends quietly when the client leaves or stops reading; a failure of its own
    is logged (nothing more reaches the client, the other loops still end the session)."""
    try:
        await send()
    except Exception:
        log.exception("sending to the client failed", extra=log_extra)


async def serve_and_stop(
    websocket: WebSocket,
    serve: Callable[[], Awaitable[Ending]],
    conversation: Callable[[], Conversation | None],
) -> Ending:
    """Serve a socket's session, then stop its conversation (once one was opened) and close the socket,
    whatever ended it: the client, an error, or the handler's cancellation when the server shuts down."""
    ending = Ending("error")  # an exception nobody classified: serve itself failed
    try:
        ending = await serve()
    except asyncio.CancelledError:
        ending = Ending("shutdown")
        raise
    finally:
        opened = conversation()
        if opened is not None:
            await end_conversation(opened, ending.reason)
        await close_quietly(websocket, ending.close_code, ending.reason)
    return ending


async def end_conversation(conversation: Conversation, reason: str) -> None:
    """`conversation.stop(reason)`: shielded from the handler's cancellation (a server shutting down still
    frees the dialogue slot) and bounded (`Conversation.stop`); a failure is logged, never raised into the
    socket's close."""
    try:
        await conversation.stop(reason)
    except Exception:
        log.exception("could not stop the session", extra=conversation.log_extra)


async def close_quietly(websocket: WebSocket, code: int = 1000, reason: str = "") -> None:
    """Close with a code and reason, bounded: a close frame waits behind everything already sent, and a
    client that does not read would hold the handler forever (then the connection just ends)."""
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await websocket.close(code, reason[:120])
