"""`GET /v1/realtime`: OpenAI Realtime-compatible JSON events over a WebSocket.

This module is the socket's wiring: client events are parsed and applied here; the conversation's output
becomes responses in `response_carver` (Moshi speaks continuously, so a response is a stretch of its
speech, closed after `CHORUS_REALTIME_RESPONSE_END_FRAMES` quiet frames); the loops run in
`session_socket.run_loops`. The dialogue session starts on the first `input_audio_buffer.append`, so a
`session.update` sent first (instructions -> persona primer, voice) shapes the whole conversation.
`turn_detection.idle_timeout_ms` sets the session's idle timeout (`lifetime.py`), within the gateway's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
from collections import deque

from fastapi import APIRouter, WebSocket
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

from services.gateway.adapters import check_adapter_owned
from services.gateway.auth import authenticate_socket
from services.gateway.conversation import Conversation
from services.gateway.limits import SocketLimits
from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.response_carver import ResponseCarver, new_id
from services.gateway.protocols.send_queue import SendQueue
from services.gateway.protocols.session_socket import (
    Ending,
    SocketClosed,
    check_voice,
    check_voice_owned,
    close_quietly,
    end_conversation,
    open_conversation,
    place,
    receive_fairly,
    refusal_close_code,
    resolve_persona,
    run_loops,
    serve_and_stop,
    watch_key,
)
from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.audio import FRAME_SEC, SAMPLE_RATE, pcm16_to_float
from shared.errors import ChorusError, ClientNotReading, IdleTimeout, InvalidRequest, LifetimeReached
from shared.messages import EventName, SessionEvent, native_voice_for

log = logging.getLogger(__name__)
router = APIRouter()

MIN_IDLE_TIMEOUT_MS = 1000  # shorter ones would end a session between two words
MAX_IDLE_TIMEOUT_MS = 24 * 3600 * 1000  # the bound when the gateway sets neither limit


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    with contextlib.ExitStack() as held:  # the socket's place among its key's open sockets, once taken
        await _realtime(websocket, held)


async def _realtime(websocket: WebSocket, held: contextlib.ExitStack) -> None:
    settings: GatewaySettings = websocket.app.state.settings
    await websocket.accept()
    try:
        caller = await authenticate_socket(websocket)
        held.enter_context(websocket.app.state.open_sockets.take(caller.owner))
        if caller.voice is not None:  # a client secret's: still the owner's own profile?
            await check_voice_owned(websocket, caller.owner, check_voice(caller.voice))
    except ChorusError as exc:
        metrics.SESSIONS_REJECTED.labels(reason=exc.code).inc()
        # A refused client may have left already (key guessers do not wait): nothing to tell then.
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.send_text(_error_event(exc).model_dump_json())
        await close_quietly(websocket, refusal_close_code(exc), exc.code)
        return
    model = websocket.query_params.get("model") or caller.model or "moshiko"
    session = RealtimeSession(websocket, settings, caller.owner, model)
    session.instructions = caller.instructions or ""  # a client secret's session config, if any
    session.voice = caller.voice or session.voice
    session.send(ev.SessionCreated(session=session.session_object()))
    ending = await serve_and_stop(websocket, session.run, lambda: session.conversation)
    log.info("realtime session closed", extra={**session.log_extra, "reason": ending.reason})


def idle_timeout_s(value_ms: int | None, settings: GatewaySettings) -> float:
    """The idle timeout a client's `idle_timeout_ms` asks for, in seconds (None: the gateway's own). A
    client may shorten the gateway's idle timeout, never lengthen it past that or the maximum length."""
    if value_ms is None:
        return settings.idle_timeout_s
    limits_ms = [round(s * 1000) for s in (settings.idle_timeout_s, settings.max_session_s) if s]
    most_ms = min(limits_ms, default=MAX_IDLE_TIMEOUT_MS)
    if not MIN_IDLE_TIMEOUT_MS <= value_ms <= most_ms:
        raise InvalidRequest(
            f"turn_detection.idle_timeout_ms must be from {MIN_IDLE_TIMEOUT_MS} to {most_ms} "
            f"(or null: the server's own), not {value_ms}"
        )
    return value_ms / 1000


def _error_event(error: ChorusError) -> ev.ErrorEvent:
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return ev.ErrorEvent(error=ev.ErrorDetail(type=kind, code=error.code, message=error.detail))


class RealtimeSession:
    def __init__(self, websocket: WebSocket, settings: GatewaySettings, owner: str, model: str) -> None:
        self.websocket = websocket
        self.settings = settings
        self.owner = owner
        self.model = model
        self.session_id = new_id("sess")
        self.instructions = ""
        self.voice = native_voice_for(model)
        self.persona_id = websocket.query_params.get("persona")
        self.adapter = websocket.query_params.get("adapter")  # or `chorus_adapter` in session.update
        self.idle_timeout_s = settings.idle_timeout_s  # a client's `idle_timeout_ms` may shorten it
        # Opened by the first audio; from then on, however the socket ends, the conversation is stopped.
        self.conversation: Conversation | None = None
        self.queue: SendQueue[str] = SendQueue(
            settings.ws_send_queue_frames, settings.ws_send_queue_messages, settings.ws_send_queue_bytes, len
        )
        self.limits = SocketLimits(settings, "realtime")
        self.started = asyncio.Event()  # set once the conversation is ready (it has a dialogue slot)
        self.early: deque[Message] = deque()  # received while waiting for the dialogue slot
        self.carver = ResponseCarver(settings.realtime_response_end_frames)

    def session_object(self) -> ev.SessionObject:
        return ev.SessionObject(
            id=self.session_id,
            model=self.model,
            instructions=self.instructions,
            audio={
                "input": {
                    "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                    "turn_detection": {
                        "type": "server_vad",
                        "idle_timeout_ms": round(self.idle_timeout_s * 1000) or None,
                    },
                },
                "output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": self.voice},
            },
        )

    def send(self, event: ev.ServerEvent) -> None:
        # Only audio may be dropped for a slow client: a lost event would break its transcript or state.
        self.queue.put(event.model_dump_json(), droppable=isinstance(event, ev.OutputAudioDelta))

    def send_all(self, events: list[ev.ServerEvent]) -> None:
        for event in events:
            self.send(event)

    @property
    def log_extra(self) -> dict[str, str]:
        return {"session_id": self.session_id}

    def error(self, message: str, code: str, client_event_id: str | None = None) -> None:
        self.send(ev.ErrorEvent(error=ev.ErrorDetail(code=code, message=message, event_id=client_event_id)))

    def report(self, error: ChorusError) -> None:
        """Why the session ends, as an `error` event (the caller logged it). A client that stopped reading
        is told by the close frame's reason alone."""
        if self.queue.closed is None:
            self.send(_error_event(error))

    async def run(self) -> Ending:
        """Serve the socket until either side ends it; what is queued for the client (an error saying
        why, above all) is sent before returning. The conversation starts with the first audio."""
        return await run_loops(
            self.log_extra,
            self.report,
            send=self._send_loop,
            drained=self.queue.drained,
            receive=self.receive_loop,
            emit=self.emit_loop,
            key=functools.partial(watch_key, self.websocket.app.state.keys, self.owner),
        )

    # --- client events -----------------------------------------------------------------------

    async def receive_loop(self) -> None:
        while True:
            message = self.early.popleft() if self.early else await receive_fairly(self.websocket)
            if message["type"] == "websocket.disconnect":
                raise SocketClosed(message.get("code"))
            if refusal := await self.limits.check(message):
                if refusal.tell:
                    self.error(refusal.error.detail, refusal.error.code)
                continue
            text = message.get("text")
            if text is None:
                self.error("send JSON text messages", "invalid_message")
                continue
            await self.handle_text(text)

    async def handle_text(self, text: str) -> None:
        event = ev.parse_client_event(text)
        if isinstance(event, ev.ErrorDetail):
            self.send(ev.ErrorEvent(error=event))
            return
        try:
            await self.dispatch(event)
        except ChorusError as exc:
            self.error(exc.detail, exc.code, ev.echoed_event_id(event.event_id))

    async def dispatch(self, event: ev.ClientEvent) -> None:
        if isinstance(event, ev.SessionUpdateEvent):
            await self.update_session(event.session)
        elif isinstance(event, ev.InputAudioBufferAppend):
            await self.append_audio(event.audio)
        elif isinstance(event, ev.InputAudioBufferClear):
            if self.conversation:
                self.conversation.clear_input()
            self.send(ev.InputAudioBufferCleared())
        elif isinstance(event, ev.ResponseCancel):
            self.send_all(self.carver.cancel())
        # input_audio_buffer.commit and response.create: Moshi listens and answers continuously.

    async def update_session(self, config: ev.SessionConfig) -> None:
        problem = config.input_format_problem()
        if problem:
            raise InvalidRequest(problem)
        voice = config.requested_voice()
        if voice is not None:
            voice = check_voice(voice)
            await check_voice_owned(self.websocket, self.owner, voice)
        sets_idle, idle_ms = config.idle_timeout_update()
        idle_s = idle_timeout_s(idle_ms, self.settings) if sets_idle else self.idle_timeout_s
        if config.instructions is not None:
            if self.conversation is not None and config.instructions != self.instructions:
                raise InvalidRequest(
                    "instructions can only be set before the first audio is appended "
                    "(they prime the model when the conversation starts)"
                )
            self.instructions = config.instructions
        if config.chorus_adapter is not None:
            await self._set_adapter(config.chorus_adapter)
        if voice is not None:
            self.voice = voice
            if self.conversation is not None:
                await self.conversation.update(voice=voice)
        self.idle_timeout_s = idle_s
        if self.conversation is not None:
            self.conversation.lifetime.idle_s = idle_s
        self.send(ev.SessionUpdated(session=self.session_object()))

    async def _set_adapter(self, adapter: str) -> None:
        """`chorus_adapter`: before the first audio only (a session's rows run with one adapter)."""
        if self.conversation is not None and adapter != self.adapter:
            raise InvalidRequest("chorus_adapter can only be set before the first audio is appended")
        await check_adapter_owned(self.websocket.app.state.adapters, self.owner, adapter)
        self.adapter = adapter

    async def append_audio(self, audio_b64: str) -> None:
        try:
            pcm = base64.b64decode(audio_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"audio is not valid base64: {exc}") from None
        if len(pcm) % 2:
            raise InvalidRequest("audio must be PCM16: an even number of bytes")
        if not pcm:
            return
        # Waits while the client sends audio faster than its pace (backpressure).
        if refused := await self.limits.pace_audio(len(pcm) / (2 * SAMPLE_RATE)):
            raise refused
        if self.conversation is None:
            await self.start_conversation()
        assert self.conversation is not None
        await self.conversation.send_audio(pcm16_to_float(pcm))

    async def start_conversation(self) -> None:
        persona = await resolve_persona(
            self.websocket, self.owner, self.persona_id, self.instructions or None, self.adapter
        )
        conversation = open_conversation(
            self.websocket,
            self.owner,
            persona,
            self.voice,
            "auto",
            session_id=self.session_id,
            idle_timeout_s=self.idle_timeout_s,
        )
        self.conversation = conversation
        try:
            self.early.extend(await place(self.websocket, conversation))
        except ChorusError as exc:
            # Refused (no capacity, no slot in time): the socket stays open, the next audio tries again,
            # as a new session: every worker remembers the refused id as stopped, and its `:out` ends.
            self.conversation = None
            self.session_id = new_id("sess")
            await end_conversation(conversation, exc.code)
            raise
        self.started.set()

    # --- server events -----------------------------------------------------------------------

    async def emit_loop(self) -> None:
        await self.started.wait()
        assert self.conversation is not None
        try:
            async for message in self.conversation.outputs():
                if isinstance(message, SessionEvent) and message.name == EventName.ENDED:
                    break
                self.send_all(self.carver.on_output(message, self._heard_ms()))
        except LifetimeReached as reached:
            self.send_all(self.carver.finish())
            if isinstance(reached, IdleTimeout):
                self.send(self._timeout_triggered())
            raise  # the error event and the close follow (`run_loops`)
        self.send_all(self.carver.finish())

    def _heard_ms(self) -> int:
        """The user audio appended so far, in ms: the clock of the Realtime speech events."""
        assert self.conversation is not None
        return int(self.conversation.frames_sent * FRAME_SEC * 1000)

    def _timeout_triggered(self) -> ev.InputAudioBufferTimeoutTriggered:
        """The silent stretch that ended the session, in the appended audio's offsets."""
        assert self.conversation is not None
        end_ms = self._heard_ms()
        start_ms = max(0, end_ms - self.conversation.lifetime.quiet_ms)
        return ev.InputAudioBufferTimeoutTriggered(
            audio_start_ms=start_ms, audio_end_ms=end_ms, item_id=new_id("item")
        )

    async def _send_loop(self) -> None:
        # Ends when the client leaves, or stops reading (the queue closed: the session ends with 1008).
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, ClientNotReading):
            while True:
                await self.websocket.send_text(await self.queue.get())
                dropped = self.queue.take_drop_report()
                if dropped:
                    await self.websocket.send_text(
                        ev.ChorusEvent(
                            name="audio_dropped",
                            detail=f"slow client: dropped {dropped} audio deltas",
                            data={"frames": dropped},
                        ).model_dump_json()
                    )
