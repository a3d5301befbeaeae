"""`GET /v1/realtime`: OpenAI Realtime-compatible JSON events over a WebSocket.

This module is the socket's wiring: client events are parsed and applied here; the conversation's output
becomes responses in `response_carver` (Moshi speaks continuously, so a response is a stretch of its
speech, closed after `CHORUS_REALTIME_RESPONSE_END_FRAMES` quiet frames); the loops run in
`session_socket.run_loops`. The dialogue session starts on the first `input_audio_buffer.append`, so a
`session.update` sent first (instructions -> persona primer, voice) shapes the whole conversation.
`turn_detection.idle_timeout_ms` sets the session's idle timeout (`lifetime.py`), within the gateway's.

A client that connects with `OpenAI-Beta: realtime=v1` is answered in the beta dialect
(`realtime_events.wire`); audio is decoded and encoded in the session's formats (`realtime_audio`); the
conversation's items are kept for retrieve / delete / truncate (`realtime_items`). What Moshi cannot do
(text turns, function calls) is refused with an `error` whose code says so. docs/protocols.md has the
conformance table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

from fastapi import APIRouter, WebSocket
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

from services.gateway.adapters import check_adapter_owned, check_adapter_served, owner_lock
from services.gateway.auth import authenticate_socket
from services.gateway.conversation import Conversation
from services.gateway.lifetime import Lifetime
from services.gateway.limits import RateLimits, SocketLimits
from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.realtime_audio import RealtimeAudio
from services.gateway.protocols.realtime_items import ConversationItems, Item
from services.gateway.protocols.response_carver import ResponseCarver, new_id
from services.gateway.protocols.send_queue import SendQueue
from services.gateway.protocols.session_socket import (
    Ending,
    SocketClosed,
    as_refusal,
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
    starting_voice,
    watch_key,
)
from services.gateway.settings import MIN_IDLE_TIMEOUT_S, GatewaySettings
from shared import metrics
from shared.audio import FRAME_SEC
from shared.errors import (
    ChorusError,
    ClientNotReading,
    IdleTimeout,
    InvalidRequest,
    LifetimeReached,
    RateLimited,
    error_for_code,
    excerpt,
)
from shared.messages import EventName, SessionEvent, model_of_voice, native_voice_for
from shared.sessions import start_of

log = logging.getLogger(__name__)
router = APIRouter()

MIN_IDLE_TIMEOUT_MS = round(MIN_IDLE_TIMEOUT_S * 1000)  # shorter ones would end a session between two words
MAX_IDLE_TIMEOUT_MS = 24 * 3600 * 1000  # the bound when the gateway sets neither limit
REFUSAL_HELD_S = 5.0  # a start refused for what it asks is not tried again sooner (`RealtimeSession.refused`)
# A start refused for now (a full fleet, the key's session limit) is tried again at most this often.
RETRY_HELD_S = 1.0
REFUSAL_TOLD_EVERY_S = 1.0  # a held refusal's `error`: at most one this often; the audio between is dropped


@dataclasses.dataclass
class HeldRefusal:
    """A conversation start's refusal, answered again without a new start while it holds."""

    error: ChorusError
    request: tuple[str | None, ...]  # what the refused start asked for (`_start_request`)
    until: float  # monotonic
    told_at: float


_NO_CONVERSATION_CHECK_S = 0.25  # how often a socket without a conversation yet checks the lifetime policies


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    with contextlib.ExitStack() as held:  # the socket's place among its key's open sockets, once taken
        await _realtime(websocket, held)


async def _realtime(websocket: WebSocket, held: contextlib.ExitStack) -> None:
    settings: GatewaySettings = websocket.app.state.settings
    await websocket.accept()
    try:
        caller = await authenticate_socket(websocket)
        held.enter_context(await websocket.app.state.open_sockets.take(caller.owner))
        opening = await _checked_query(websocket, caller.owner)
        # Asked for (`?voice=`, else a client secret's: still the owner's own profile?), else as the model
        # or the persona says.
        requested_model = websocket.query_params.get("model") or caller.model
        persona_id = websocket.query_params.get("persona")
        asked = opening.voice or caller.voice
        voice = await starting_voice(websocket, caller.owner, asked, requested_model, persona_id)
    except Exception as exc:  # a check that reads Redis (a catalog voice, say) while it is away too
        if (refusal := as_refusal(exc)) is None:
            raise
        metrics.SESSIONS_REJECTED.labels(reason=refusal.code).inc()
        # A refused client may have left already (key guessers do not wait): nothing to tell then.
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.send_text(ev.wire(_error_event(refusal)))
        await close_quietly(websocket, refusal_close_code(refusal), refusal.code)
        return
    # The model asked for: OpenAI's names (or any other) mean moshiko, never echoed back (the query string
    # is the client's, of any length). A native voice, once chosen, decides (`session_object`).
    model = native_voice_for(requested_model)
    session = RealtimeSession(websocket, settings, caller.owner, model)
    session.instructions = caller.instructions or ""  # a client secret's session config, if any
    session.voice = voice
    session.adapter = opening.adapter
    session.send(ev.SessionCreated(session=session.session_object()))
    ending = await serve_and_stop(websocket, session.run, lambda: session.conversation)
    log.info("realtime session closed", extra={**session.log_extra, "reason": ending.reason})


@dataclass(frozen=True)
class _Opening:
    """What the socket's query string asks of its session, checked as `session.update` would check it."""

    voice: str | None
    adapter: str | None


_QUERY_SETTINGS = ("voice", "adapter", "persona", "model")


async def _checked_query(websocket: WebSocket, owner: str) -> _Opening:
    """`?adapter=` refused at the handshake for what `session.update` refuses it (another key's adapter;
    `?voice=` likewise, by `starting_voice`), and each setting given once: never one of two
    values picked silently. Whether a worker serves the adapter, and `?persona=`, are the start's (its
    first audio) to say: a fleet restarting refuses no socket."""
    params = websocket.query_params
    for name in _QUERY_SETTINGS:
        if (count := len(params.getlist(name))) > 1:
            raise InvalidRequest(f"{name} is given {count} times: give it once")
    voice = params.get("voice") or None  # checked with the voice the session starts with (`starting_voice`)
    adapter = params.get("adapter") or None
    if adapter is not None:  # the caller's own; whether a worker serves it is the start's to say
        await check_adapter_owned(websocket.app.state.adapters, owner, adapter)
    return _Opening(voice, adapter)


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
        self.adapter: str | None = None  # `?adapter=` (checked at the handshake) or `chorus_adapter`
        self.adapter_switched_at = -math.inf  # when `chorus_adapter` last changed mid-session (monotonic)
        self.idle_timeout_s = settings.idle_timeout_s  # a client's `idle_timeout_ms` may shorten it
        # Opened by the first audio; from then on, however the socket ends, the conversation is stopped.
        self.conversation: Conversation | None = None
        self.queue: SendQueue[str] = SendQueue(
            settings.ws_send_queue_frames, settings.ws_send_queue_messages, settings.ws_send_queue_bytes, len
        )
        self.limits = SocketLimits(settings, "realtime")
        self.started = asyncio.Event()  # set once the conversation is ready (it has a dialogue slot)
        self.early: deque[Message] = deque()  # received while waiting for the dialogue slot
        self.opened_at = self.audio_at = time.monotonic()  # the lifetime policies' clocks until it starts
        self.items = ConversationItems()
        self.carver = ResponseCarver(settings.realtime_response_end_frames, self.items)
        self.audio = RealtimeAudio()
        self.beta = "realtime=v1" in websocket.headers.get("openai-beta", "")  # the beta dialect
        self.chorus_events = True  # `session.chorus_events: false` turns Chorus's own events off
        self.appended_since_commit = False
        # The last start's refusal: while the session asks for the same (`_start_request`), later audio
        # is answered so at once, without a new session start (one per append, 12 a second, otherwise),
        # and told at most once a second. When retrying cannot help (an adapter wider than the worker
        # serves, say) for REFUSAL_HELD_S (a fleet may hold another worker that can take it); when it may
        # (no capacity, the key's session limit), for RETRY_HELD_S.
        self.refused: HeldRefusal | None = None

    def adapter_in_use(self) -> str | None:
        """The session's LoRA adapter: its conversation's (a persona's own, or `chorus_adapter`), else the
        one `chorus_adapter` asked for before the conversation starts."""
        return self.conversation.persona.adapter if self.conversation is not None else self.adapter

    def session_object(self) -> ev.SessionObject | ev.BetaSessionObject:
        idle_ms = round(self.idle_timeout_s * 1000) or None
        if self.beta:
            return ev.BetaSessionObject(
                id=self.session_id,
                instructions=self.instructions,
                voice=self.voice,
                input_audio_format=ev.beta_format(self.audio.input),
                output_audio_format=ev.beta_format(self.audio.output),
                turn_detection={"type": "server_vad", "idle_timeout_ms": idle_ms},
                chorus_adapter=self.adapter_in_use(),
            )
        return ev.SessionObject(
            id=self.session_id,
            model=model_of_voice(self.voice) or self.model,  # the model that serves it
            instructions=self.instructions,
            audio={
                "input": {
                    "format": ev.ga_format(self.audio.input),
                    "turn_detection": {"type": "server_vad", "idle_timeout_ms": idle_ms},
                },
                "output": {"format": ev.ga_format(self.audio.output), "voice": self.voice},
            },
            chorus_adapter=self.adapter_in_use(),
        )

    def send(self, event: ev.ServerEvent) -> None:
        chorus_only = isinstance(event, ev.ChorusEvent) or (
            self.beta and isinstance(event, ev.InputAudioBufferTimeoutTriggered)  # a chorus.event in beta
        )
        if chorus_only and not self.chorus_events:
            return
        if isinstance(event, ev.OutputAudioDelta) and self.audio.output != "pcm16":
            encoded = self.audio.encode_output(ev.decode_audio(event.delta))
            if not encoded:
                return  # the resampler is still filling: the next delta carries this audio
            event = event.model_copy(update={"delta": ev.encode_audio(encoded)})
        elif isinstance(event, ev.ResponseDone):
            self.audio.end_output()
        # Only audio may be dropped for a slow client: a lost event would break its transcript or state.
        self.queue.put(ev.wire(event, beta=self.beta), droppable=isinstance(event, ev.OutputAudioDelta))

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
        # A refused message over the control events' bound is charged to the audio pace by its size
        # (`pace_oversized`): reading it cost up to tens of ms, and the message rate alone would let a
        # socket send 100 of them a second. Audio it was paced for already counts.
        large = len(text) > ev.MAX_CONTROL_EVENT_CHARS
        event = ev.parse_client_event(text)
        if isinstance(event, ev.ErrorDetail):
            if large:
                await self.limits.pace_oversized(len(text))
            self.send(ev.ErrorEvent(error=event))
            return
        paced_before = self.limits.audio_paced_s
        try:
            await self.dispatch(event)
        except ChorusError as exc:
            if large:
                await self.limits.pace_oversized(len(text), self.limits.audio_paced_s - paced_before)
            self.error(exc.detail, exc.code, ev.echoed_event_id(event.event_id))

    async def dispatch(self, event: ev.ClientEvent) -> None:
        if isinstance(event, ev.SessionUpdateEvent):
            await self.update_session(event.session)
        elif isinstance(event, ev.InputAudioBufferAppend):
            await self.append_audio(event.audio)
        elif isinstance(event, ev.InputAudioBufferClear):
            if self.conversation:
                self.conversation.clear_input()
            self.appended_since_commit = False
            self.send(ev.InputAudioBufferCleared())
        elif isinstance(event, ev.InputAudioBufferCommit):
            self.commit()
        elif isinstance(event, ev.ConversationItemCreate):
            await self.create_item(event.item)
        else:
            await self.dispatch_output(event)

    async def dispatch_output(self, event: ev.ClientEvent) -> None:
        """The client events about Moshi's side of the conversation and its items."""
        if isinstance(event, ev.ResponseCreate):
            self.create_response(event.response)
        elif isinstance(event, ev.ResponseCancel):
            await self.cancel_response(event.response_id)
        elif isinstance(event, ev.OutputAudioBufferClear):
            response_id = await self.cancel_response(None)
            self.send(ev.OutputAudioBufferCleared(response_id=response_id))
        elif isinstance(event, ev.ConversationItemTruncate):
            speaking = self.carver.responding and self.items.get(event.item_id).status == "in_progress"
            # Refused (raises) before anything changes: the response and its audio go on.
            events = self.carver.truncate(event.item_id, event.content_index, event.audio_end_ms)
            if speaking:
                self.queue.drop_audio()
            await self.send_output(events)
        elif isinstance(event, ev.ConversationItemRetrieve):
            self.send(ev.ConversationItemRetrieved(item=self.items.get(event.item_id).wire()))
        elif isinstance(event, ev.ConversationItemDelete):
            self.items.delete(event.item_id)
            self.send(ev.ConversationItemDeleted(item_id=event.item_id))

    async def cancel_response(self, response_id: str | None) -> str:
        """Ends the response in progress (`response_id`, if given, must be its id) and drops its audio not
        sent yet: not one more delta of it reaches the client. Returns its id."""
        current = self.carver.response_id
        if current is None or response_id not in (None, current):
            named = f" {excerpt(response_id)}" if response_id is not None else ""
            raise ev.ResponseNotActive(f"no response{named} in progress to cancel")
        self.queue.drop_audio()
        await self.send_output(self.carver.cancel())
        return current

    def create_response(self, params: ev.ResponseParams | None) -> None:
        """Moshi answers when it wants to: a `response.create` is accepted and the next stretch of its
        speech is the response. One in progress is refused, as OpenAI's server does."""
        if params is not None:
            ev.refuse_what_moshi_cannot_do(params.tools, params.output_modalities, params.modalities)
        if self.carver.responding:
            raise ev.ActiveResponse(f"response {self.carver.response_id} is in progress")

    def commit(self) -> None:
        """`input_audio_buffer.commit`: the audio appended since the last commit becomes a user item (Moshi
        has heard it already: it listens continuously)."""
        if not self.appended_since_commit:
            raise ev.CommitEmpty("no audio was appended since the last commit")
        self.appended_since_commit = False
        self.add_user_item(new_id("item"))

    def add_user_item(self, item_id: str) -> None:
        item = Item(item_id, "user")
        previous = self.items.add(item)
        self.send(ev.InputAudioBufferCommitted(item_id=item_id, previous_item_id=previous))
        self.send(ev.ConversationItemAdded(previous_item_id=previous, item=item.wire()))

    async def create_item(self, item: ev.ItemIn) -> None:
        """A user message of `input_audio` is heard (appended, then committed); text, other roles and
        function calls are refused: Moshi hears audio only, and calls no functions."""
        if item.type in ("function_call", "function_call_output"):
            raise ev.FunctionCallsNotSupported("Moshi cannot call functions")
        if item.type != "message" or item.role != "user":
            raise ev.TextInputNotSupported(
                f"only a user message of input_audio can be added, not a {excerpt(item.role or '', 32)} "
                f"{excerpt(item.type, 32)}"
            )
        audio = [part.audio for part in item.content if part.type == "input_audio" and part.audio]
        if len(audio) != len(item.content) or not audio:
            raise ev.TextInputNotSupported("Moshi hears audio only: send content of type input_audio")
        if item.id is not None and item.id in self.items:  # its audio is not heard either
            raise InvalidRequest(f"item id {excerpt(item.id)} is already in this conversation")
        decoded = [self.input_bytes(part) for part in audio]  # all checked before any is heard
        # ... and paced as one message: a refusal (over the burst) hears none of it, where part by part
        # the first parts were heard, and started a conversation, before a later one was refused.
        if refused := await self.limits.pace_audio(sum(self.audio.input_seconds(d) for d in decoded)):
            raise refused
        for data in decoded:
            await self.hear(data)
        self.appended_since_commit = False
        self.add_user_item(item.id or new_id("item"))

    async def update_session(self, config: ev.SessionConfig) -> None:
        config.refuse_what_moshi_cannot_do()
        input_codec, output_codec = config.codecs()
        voice = config.requested_voice()
        if voice is not None:
            voice = check_voice(voice)
            await check_voice_owned(self.websocket, self.owner, voice)
            self._check_native_voice_served(voice)
        sets_idle, idle_ms = config.idle_timeout_update()
        idle_s = idle_timeout_s(idle_ms, self.settings) if sets_idle else self.idle_timeout_s
        changes_primer = config.instructions is not None and config.instructions != self.instructions
        if changes_primer and self.conversation is not None:
            raise InvalidRequest(
                "instructions can only be set before the first audio is appended "
                "(they prime the model when the conversation starts)"
            )
        # The last check that can refuse the update: a refused update changes nothing.
        if config.chorus_adapter is not None:
            await self._set_adapter(config.chorus_adapter)
        if config.instructions is not None:
            self.instructions = config.instructions
        if voice is not None:
            self.voice = voice
            if self.conversation is not None:
                await self.conversation.update(voice=voice)
        self.idle_timeout_s = idle_s
        if self.conversation is not None:
            self.conversation.lifetime.idle_s = idle_s
        self.audio.set_formats(input_codec, output_codec)
        if config.chorus_events is not None:
            self.chorus_events = config.chorus_events
        self.send(ev.SessionUpdated(session=self.session_object()))

    def _check_native_voice_served(self, voice: str) -> None:
        """A native voice is its model's own: mid-session only the model serving the session can speak it
        (it was accepted and announced while the other model's audio kept playing)."""
        served = self.conversation.served_model if self.conversation is not None else None
        wanted = model_of_voice(voice)
        if served and wanted and wanted != served:
            raise InvalidRequest(
                f"this session runs on {served}, whose voice is {served}: {voice} needs its own model, "
                f"chosen when a session starts; switch to {served}, a profile: or a catalog: voice"
            )

    async def _set_adapter(self, adapter: str) -> None:
        """`chorus_adapter`: the session's LoRA adapter; mid-session its rows switch from the worker's
        next step (docs/personas.md). Mid-session the same adapter asked for again is sent again: the worker
        may have refused it before its `error` event reached this socket (`_tell_adapter_in_use` then sets
        the adapter back), and one it runs already it ignores."""
        if self.conversation is None:
            if adapter != self.adapter:
                await check_adapter_served(self.websocket, self.owner, adapter)  # again at the start
                self.adapter = adapter
            return
        # The conversation's adapter, not `self.adapter`: a persona's own is the one running when no
        # `chorus_adapter` was asked for before the start; asking for it is no switch.
        running = self.conversation.persona.adapter
        if adapter != running:
            self._check_switch_rate()
        # Checked and written to the session hash under the owner's adapter lock: a delete at the same
        # moment either sees the session run it (409) or has deleted it before this check.
        async with owner_lock(self.websocket).held(self.owner):
            await check_adapter_served(self.websocket, self.owner, adapter)
            if adapter != running:
                self.adapter_switched_at = time.monotonic()
            await self.conversation.update(adapter=adapter)
        self.adapter = adapter

    async def _tell_adapter_in_use(self) -> None:
        """After the worker refused an update (an `error` event): a refused `chorus_adapter` switch leaves
        the session on the adapter it had, which the worker wrote back to the session hash before the event.
        A client whose last session.updated named the one refused gets a new one naming the one in use."""
        conversation = self.conversation
        assert conversation is not None
        start = start_of(await conversation.store.get(conversation.session_id))
        if start is None or start.persona.adapter == conversation.persona.adapter:
            return
        self.adapter = start.persona.adapter
        conversation.persona = conversation.persona.model_copy(update={"adapter": self.adapter})
        self.send(ev.SessionUpdated(session=self.session_object()))

    def _check_switch_rate(self) -> None:
        """A switch may load the adapter on the worker, which pauses every session on it meanwhile (the
        load runs where the steps do): one session may not make it do so back to back."""
        interval = self.settings.adapter_switch_interval_s
        wait_s = self.adapter_switched_at + interval - time.monotonic()
        if wait_s > 0:
            raise RateLimited(
                f"chorus_adapter may change once every {interval:g} s mid-session: retry in {wait_s:.1f} s",
                reason="adapter_switch_rate",
                limit=interval,
                retry_after_s=math.ceil(wait_s),
            )

    async def append_audio(self, audio_b64: str) -> None:
        await self.append_bytes(self.input_bytes(audio_b64))

    def input_bytes(self, audio_b64: str) -> bytes:
        """A client's base64 audio, checked for the input format; raises `InvalidRequest`."""
        data = ev.decode_audio(audio_b64)
        if self.audio.input == "pcm16" and len(data) % 2:
            raise InvalidRequest("audio must be PCM16: an even number of bytes")
        return data

    async def append_bytes(self, data: bytes) -> None:
        if not data:
            return
        # Waits while the client sends audio faster than its pace (backpressure).
        if refused := await self.limits.pace_audio(self.audio.input_seconds(data)):
            raise refused
        await self.hear(data)

    async def hear(self, data: bytes) -> None:
        """Audio already paced, sent on (the conversation started by the first)."""
        if not data:
            return
        self.audio_at = time.monotonic()
        if self.conversation is None:
            if self._refuse_again():
                return  # refused, and the client was told within the last second: the audio is dropped
            await self.start_conversation()
        assert self.conversation is not None
        self.appended_since_commit = True
        await self.conversation.send_pcm16(self.audio.decode_input(data))

    def _start_request(self) -> tuple[str | None, ...]:
        """What a conversation start asks for: a start refused for it is refused again while it holds."""
        return (self.persona_id, self.instructions, self.voice, self.adapter)

    def _refuse_again(self) -> bool:
        """The last start's refusal while it holds (`refused`): raised again, or, told less than
        REFUSAL_TOLD_EVERY_S ago, True (drop the audio, counted). False: no refusal holds, start."""
        held, now = self.refused, time.monotonic()
        if held is None:
            return False
        if held.request != self._start_request() or now > held.until:
            self.refused = None
            return False
        if now - held.told_at < REFUSAL_TOLD_EVERY_S:
            metrics.WS_ERRORS_SUPPRESSED.labels(protocol="realtime").inc()
            return True
        held.told_at = now
        raise error_for_code(held.error.code, held.error.detail, **held.error.extra)

    async def start_conversation(self) -> None:
        persona = await resolve_persona(
            self.websocket, self.owner, self.persona_id, self.instructions or None, adapter=self.adapter
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
            await place(self.websocket, conversation, self.early)
        except ChorusError as exc:
            # Refused (no capacity, no slot in time): the socket stays open, the next audio tries again,
            # as a new session: every worker remembers the refused id as stopped, and its `:out` ends.
            self.conversation = None
            self.session_id = new_id("sess")
            await end_conversation(conversation, exc.code)
            now = time.monotonic()
            held_s = RETRY_HELD_S if exc.retryable else REFUSAL_HELD_S  # no_capacity is retryable
            self.refused = HeldRefusal(exc, self._start_request(), until=now + held_s, told_at=now)
            raise
        self.started.set()

    # --- server events -----------------------------------------------------------------------

    async def emit_loop(self) -> None:
        await self._wait_for_a_conversation()
        assert self.conversation is not None
        try:
            async for message in self.conversation.outputs():
                if isinstance(message, SessionEvent) and message.name == EventName.ENDED:
                    break
                await self.send_output(self.carver.on_output(message, self._heard_ms()))
                if isinstance(message, SessionEvent) and message.name == EventName.ERROR:
                    await self._tell_adapter_in_use()
        except LifetimeReached as reached:
            await self.send_output(self.carver.finish())
            if isinstance(reached, IdleTimeout):
                self.send(self._timeout_triggered())
            raise  # the error event and the close follow (`run_loops`)
        await self.send_output(self.carver.finish())

    async def send_output(self, events: list[ev.ServerEvent]) -> None:
        """The carver's events, each followed by what OpenAI's server sends after it: a user item when the
        user stops speaking (server VAD commits), the caller's rate limits after a response."""
        for event in events:
            if isinstance(event, ev.ResponseDone):
                self.close_item(event.response)
            self.send(event)
            if isinstance(event, ev.ResponseCreated):
                self.open_item(event.response.id)
            elif isinstance(event, ev.SpeechStopped):
                self.appended_since_commit = False
                self.add_user_item(event.item_id)
            elif isinstance(event, ev.ResponseDone):
                self.send(await self.rate_limits())

    def open_item(self, response_id: str) -> None:
        """A response's one item and its one audio part, as OpenAI's server announces them."""
        item, previous = self.carver.speaking()
        wire = item.wire()
        self.send(ev.ResponseOutputItemAdded(response_id=response_id, item=wire))
        self.send(ev.ConversationItemAdded(previous_item_id=previous, item=wire))
        part = {"type": "audio", "transcript": ""}
        self.send(ev.ResponseContentPartAdded(response_id=response_id, item_id=item.id, part=part))

    def close_item(self, response: ev.ResponseObject) -> None:
        item = response.output[0]
        part = {"type": "audio", "transcript": item["content"][0]["transcript"]}
        self.send(ev.ResponseContentPartDone(response_id=response.id, item_id=item["id"], part=part))
        self.send(ev.ResponseOutputItemDone(response_id=response.id, item=item))

    async def rate_limits(self) -> ev.RateLimitsUpdated:
        limits: RateLimits = self.websocket.app.state.rate_limits
        return ev.RateLimitsUpdated(
            rate_limits=[ev.RateLimit(**limit) for limit in await limits.left(self.owner)]
        )

    async def _wait_for_a_conversation(self) -> None:
        """Until the first audio has started the conversation. A socket without one holds no dialogue slot,
        but one of its key's sockets: the lifetime policies hold meanwhile (not while a start is being
        placed: its own timeouts do), the maximum length from the socket's opening (where OpenAI's session
        begins), the idle timeout from the last audio appended (a refused start's included)."""
        while not self.started.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.started.wait(), _NO_CONVERSATION_CHECK_S)
            if self.conversation is None and not self.started.is_set():
                now, max_s = time.monotonic(), self.settings.max_session_s
                waiting = Lifetime(max_s, self.idle_timeout_s, started_at=self.opened_at)
                waiting.quiet_frames = int((now - self.audio_at) / FRAME_SEC)
                if (reached := waiting.reached(now)) is not None:
                    raise reached  # the error event and the close follow (`run_loops`)

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
                if dropped and self.chorus_events:
                    await self.websocket.send_text(
                        ev.ChorusEvent(
                            name="audio_dropped",
                            detail=f"slow client: dropped {dropped} audio deltas",
                            data={"frames": dropped},
                        ).model_dump_json()
                    )
