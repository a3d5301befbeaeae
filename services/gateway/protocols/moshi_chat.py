"""`GET /api/chat`: Moshi's own binary WebSocket protocol, so Kyutai's client and web UI work unchanged.

Every message's first byte is its kind: 0x00 handshake (server -> client, once the session has a
dialogue slot), 0x01 Ogg/Opus audio (both ways, as sphn.OpusStreamWriter/Reader make and read it),
0x02 UTF-8 text piece (server -> client), 0x03 control (client -> server: accepted, nothing to do for a
full-duplex model), 0x04 metadata (server -> client, right after the handshake: JSON, the session id and
the settings in force), 0x05 error with a UTF-8 reason (server -> client), 0x06 ping (answered with a
ping carrying the same payload).
Query parameters: `persona`, `voice`, `voice_mode`, `primer` (a per-session persona override; PersonaPlex's
`text_prompt` is the same), `client_secret` (from `POST /v1/realtime/client_secrets`; its voice and
instructions are the defaults), and the generation settings of Kyutai's web UI and Rust server
(`SAMPLING_PARAMS`), each over the persona's own for this session. A malformed or out-of-range value is
refused (error message, close 1008); an unknown parameter is ignored and logged once per process.
The session id is returned in the `x-chorus-session-id` response header of the upgrade.
docs/protocols.md has the conformance table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.datastructures import QueryParams
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

from services.gateway.auth import authenticate_socket
from services.gateway.conversation import Conversation
from services.gateway.limits import SocketLimits
from services.gateway.protocols.send_queue import SendQueue
from services.gateway.protocols.session_socket import (
    Ending,
    SocketClosed,
    as_refusal,
    close_quietly,
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
from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.audio import (
    SAMPLE_RATE,
    FloatAudio,
    InvalidOggOpus,
    OggOpusMeter,
    OpusDecoder,
    OpusEncoder,
    pcm16_to_float,
)
from shared.errors import ChorusError, ClientNotReading, InvalidRequest
from shared.messages import (
    EventName,
    OutputAudio,
    OutputText,
    PersonaSpec,
    Sampling,
    SessionEvent,
    VoiceMode,
    parse_voice_mode,
)

log = logging.getLogger(__name__)
router = APIRouter()

HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
PING_MAX_BYTES = 125  # a ping's payload is echoed back: bounded like a WebSocket ping's
CLIENT_ERROR_LOG_S = 10.0  # a socket's client errors are logged at most this often (each is still answered)

# Kyutai's query parameter -> the `Sampling` field it sets.
SAMPLING_PARAMS = {
    "text_temperature": "text_temperature",
    "text_topk": "text_top_k",
    "audio_temperature": "audio_temperature",
    "audio_topk": "audio_top_k",
    "pad_mult": "pad_mult",
    "repetition_penalty": "repetition_penalty",
    "repetition_penalty_context": "repetition_penalty_context",
    "text_seed": "text_seed",
    "audio_seed": "audio_seed",
}
_INTEGER_PARAMS = {"text_topk", "audio_topk", "repetition_penalty_context", "text_seed", "audio_seed"}
KNOWN_PARAMS = frozenset(
    {
        "persona",
        "voice",
        "voice_mode",
        "primer",
        "text_prompt",
        "adapter",
        "client_secret",
        "api_key",
        *SAMPLING_PARAMS,
    }
)
# A setting's plain ASCII form (what Kyutai's clients send): Python's int()/float() also take Unicode
# digits, `_` separators and surrounding spaces, which a client of the Rust server would be refused.
_PLAIN = {
    "an integer": re.compile(r"[+-]?[0-9]+", re.ASCII),
    "a number": re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII),
}
_DRAWN_SEED_BOUND = 2**53  # a JavaScript client reads the metadata's seeds exactly below this
_UNKNOWN_LOGGED_MAX = 256  # names of unknown parameters remembered (each logged once), bounded
_unknown_logged: set[str] = set()

Outgoing = tuple[int, bytes]  # kind, payload (PCM16 for audio: encoded at send time)


def _payload_size(item: Outgoing) -> int:
    return len(item[1])


def _voice_mode(value: str | None) -> VoiceMode:
    try:
        return parse_voice_mode(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def sampling_overrides(params: Mapping[str, str]) -> dict[str, Any]:
    """The `Sampling` fields the query string sets, each checked against its range (the message says
    which parameter and why)."""
    overrides: dict[str, Any] = {}
    for name, field in SAMPLING_PARAMS.items():
        raw = params.get(name)
        if raw is None:
            continue
        value = _number(name, raw)
        try:
            Sampling.model_validate({field: value})
        except ValidationError as exc:
            raise InvalidRequest(f"{name}={raw[:32]!r}: {exc.errors()[0]['msg']}") from None
        overrides[field] = value
    return overrides


def check_single(params: QueryParams) -> None:
    """Each setting given once, and the persona primer under one name: Chorus never picks one of two
    values silently (Kyutai's Rust server refuses a repeated field too)."""
    for name in KNOWN_PARAMS - {"api_key", "client_secret"}:  # those are authentication's
        if (count := len(params.getlist(name))) > 1:
            raise InvalidRequest(f"{name} is given {count} times: give it once")
    primer, text_prompt = params.get("primer"), params.get("text_prompt")
    if primer and text_prompt and primer != text_prompt:
        raise InvalidRequest("primer and text_prompt are the same setting: give one")


def _number(name: str, raw: str) -> float | int:
    kind = "an integer" if name in _INTEGER_PARAMS else "a number"
    try:
        value = int(raw) if name in _INTEGER_PARAMS else float(raw)
    except ValueError:
        raise InvalidRequest(f"{name}={raw[:32]!r}: expected {kind}") from None
    if not math.isfinite(value):
        raise InvalidRequest(f"{name}={raw[:32]!r}: expected a finite number")
    if not _PLAIN[kind].fullmatch(raw):
        raise InvalidRequest(f"{name}={raw[:32]!r}: expected {kind} in ASCII digits")
    return value


def _with_seeds(persona: PersonaSpec) -> PersonaSpec:
    """Seeds neither the persona nor the client chose, drawn now rather than by the worker: the metadata
    message tells them, and a session resumed after a failover keeps them."""
    sampling = persona.sampling
    drawn = {
        name: secrets.randbelow(_DRAWN_SEED_BOUND)
        for name in ("text_seed", "audio_seed")
        if getattr(sampling, name) is None
    }
    return persona.model_copy(update={"sampling": sampling.model_copy(update=drawn)}) if drawn else persona


def _log_unknown(params: Mapping[str, str]) -> None:
    for name in params:
        if name not in KNOWN_PARAMS and name not in _unknown_logged:
            if len(_unknown_logged) >= _UNKNOWN_LOGGED_MAX:
                return
            _unknown_logged.add(name)
            log.info("ignoring unknown /api/chat query parameter %r (logged once)", name[:64])


def metadata(session_id: str, persona: PersonaSpec, voice: str, mode: VoiceMode) -> bytes:
    """The metadata message's JSON: the session and the settings in force, under Kyutai's names (an audio
    setting left null is the dialogue worker's default)."""
    sampling = persona.sampling.model_dump()
    settings = {name: sampling[field] for name, field in SAMPLING_PARAMS.items()}
    return json.dumps(
        {"session_id": session_id, "persona": persona.id, "voice": voice, "voice_mode": mode, **settings}
    ).encode()


@router.websocket("/api/chat")
async def chat(websocket: WebSocket) -> None:
    with contextlib.ExitStack() as held:  # the socket's place among its key's open sockets, once taken
        await _chat(websocket, held)


async def _chat(websocket: WebSocket, held: contextlib.ExitStack) -> None:
    settings: GatewaySettings = websocket.app.state.settings
    params = websocket.query_params
    try:
        caller = await authenticate_socket(websocket)
        owner = caller.owner
        held.enter_context(await websocket.app.state.open_sockets.take(owner))
        check_single(params)
        asked = params.get("voice") or caller.voice
        voice = await starting_voice(websocket, owner, asked, caller.model, params.get("persona"))
        mode = _voice_mode(params.get("voice_mode"))
        primer = params.get("primer") or params.get("text_prompt") or caller.instructions
        sampling = sampling_overrides(params)
        _log_unknown(params)
        persona = await resolve_persona(
            websocket, owner, params.get("persona"), primer, sampling, adapter=params.get("adapter")
        )
        persona = _with_seeds(persona)
        conversation = open_conversation(websocket, owner, persona, voice, mode)
        await websocket.accept(headers=[(b"x-chorus-session-id", conversation.session_id.encode())])
    except Exception as exc:  # a check that reads Redis (a catalog voice, say) while it is away too
        if (refusal := as_refusal(exc)) is None:
            raise
        metrics.SESSIONS_REJECTED.labels(reason=refusal.code).inc()
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.send_bytes(bytes([ERROR]) + refusal.detail.encode())
        await close_quietly(websocket, refusal_close_code(refusal), refusal.code)
        return
    session = MoshiChatSession(websocket, conversation, settings.ws_send_queue_frames)
    session.metadata = metadata(conversation.session_id, persona, voice, mode)
    ending = await serve_and_stop(websocket, session.run, lambda: conversation)
    log.info("moshi chat closed", extra={**conversation.log_extra, "reason": ending.reason})


class MoshiChatSession:
    def __init__(self, websocket: WebSocket, conversation: Conversation, queue_frames: int) -> None:
        self.websocket = websocket
        self.conversation = conversation
        settings: GatewaySettings = websocket.app.state.settings
        self.queue: SendQueue[Outgoing] = SendQueue(
            queue_frames, settings.ws_send_queue_messages, settings.ws_send_queue_bytes, _payload_size
        )
        self.limits = SocketLimits(settings, "moshi")
        self.decoder = OpusDecoder()
        self.meter = OggOpusMeter()  # the audio the decoder is given, counted before it runs
        self.charged_ahead_s = 0.0  # audio charged to the pace that the decoder has not given yet
        self.encoder = OpusEncoder()
        self.early: deque[Message] = deque()  # received while waiting for the dialogue slot
        self.metadata = b"{}"  # sent right after the handshake
        self._error_logged_at, self._errors_unlogged = -math.inf, 0

    async def run(self) -> Ending:
        """Place the session, send the handshake once it has a slot, then serve it until either side ends
        it. Whatever is queued for the client (an error saying why, above all) is sent before returning."""
        key = functools.partial(watch_key, self.websocket.app.state.keys, self.conversation.owner)
        return await run_loops(
            self.conversation.log_extra,
            self.report,
            send=self._send_loop,
            drained=self.queue.drained,
            place=self._place,
            receive=self.receive_loop,
            emit=self.emit_loop,
            key=key,
        )

    async def _place(self) -> None:
        await place(self.websocket, self.conversation, self.early)
        self.queue.put((HANDSHAKE, b""), droppable=False)
        self.queue.put((METADATA, self.metadata), droppable=False)

    async def receive_loop(self) -> None:
        while True:
            message = self.early.popleft() if self.early else await receive_fairly(self.websocket)
            if message["type"] == "websocket.disconnect":
                raise SocketClosed(message.get("code"))
            if refusal := await self.limits.check(message):
                if refusal.tell:
                    self.error(refusal.error.detail)
                continue
            if (pages := self._audio_of(message)) is None:
                continue
            try:
                seconds = self.meter.push(pages)
            except InvalidOggOpus as exc:
                await self.limits.pace_undecodable()  # then told, as a refusal over the burst is
                self._undecodable(str(exc))
                continue
            # Waits while the client sends audio faster than its pace (backpressure), before decoding it:
            # charged what its packets say they carry, whether or not they decode.
            if refused := await self.limits.pace_audio(seconds):
                self.error(refused.detail)
                self._reset_decoder()  # it never saw these pages
                continue
            self.charged_ahead_s += seconds
            if (pcm := self._decode(pages)) is None:
                await self.limits.pace_undecodable()  # sphn refused what the meter passed: never free
                continue
            # A packet is charged in the page where it begins and decoded once it ends (maybe a message
            # later): what is decoded beyond what was charged ahead, which the meter should never let
            # happen, is paced too.
            self.charged_ahead_s -= len(pcm) / SAMPLE_RATE
            if self.charged_ahead_s < -1e-3:
                unpaced_s, self.charged_ahead_s = -self.charged_ahead_s, 0.0
                if refused := await self.limits.pace_audio(unpaced_s):
                    self.error(refused.detail)
                    continue
            if len(pcm):
                await self.conversation.send_audio(pcm)

    def _audio_of(self, message: Message) -> bytes | None:
        """The Ogg/Opus pages of a client audio message, or None after handling any other message."""
        data: bytes | None = message.get("bytes")
        if not data:
            self.error("expected binary messages whose first byte is the kind")
            return None
        if data[0] != AUDIO:
            self._other_kind(data)
            return None
        return data[1:]

    def _decode(self, pages: bytes) -> FloatAudio | None:
        """The audio of paced pages, or None after telling the client why there is none."""
        try:
            # Bounded: the pace refused more than its burst (2 s) before this, and sphn raises past ~5 s.
            return self.decoder.decode(pages)
        except Exception as exc:  # sphn raises plain exceptions on corrupt Ogg
            self._undecodable(str(exc))
            return None

    def _undecodable(self, reason: str) -> None:
        self.error(f"undecodable Ogg/Opus audio: {reason}")
        self._reset_decoder()

    def _reset_decoder(self) -> None:
        """A fresh decoder and meter, in step: both drop any page cut across messages."""
        self.decoder = OpusDecoder()
        self.meter.reset()
        self.charged_ahead_s = 0.0

    def _other_kind(self, data: bytes) -> None:
        """A client message that carries no audio: control is accepted (Moshi is full duplex: start, end of
        turn, pause and restart change nothing in its stream), a ping is answered, anything else refused."""
        if data[0] == CONTROL:
            log.debug("control message %r", data[1:2], extra=self.conversation.log_extra)
        elif data[0] == PING and len(data) - 1 <= PING_MAX_BYTES:
            self.queue.put((PING, data[1:]), droppable=False)
        elif data[0] == PING:
            self.error(f"ping payload over {PING_MAX_BYTES} bytes")
        else:
            self.error(f"unsupported message kind 0x{data[0]:02x} from client")

    def error(self, reason: str) -> None:
        """Tell the client; log it, but not a line per bad message (a client may send 100 a second)."""
        now = time.monotonic()
        if now - self._error_logged_at >= CLIENT_ERROR_LOG_S:
            more = self._errors_unlogged
            since = f" ({more} more since the last logged)" if more else ""
            log.info("client error: %s%s", reason, since, extra=self.conversation.log_extra)
            self._error_logged_at, self._errors_unlogged = now, 0
        else:
            self._errors_unlogged += 1
        self.queue.put((ERROR, reason.encode()), droppable=False)

    def report(self, error: ChorusError) -> None:
        """Why the session ends, as the protocol's error message (the caller logged it). A client that
        stopped reading is told by the close frame's reason alone."""
        if self.queue.closed is None:
            self.queue.put((ERROR, error.detail.encode()), droppable=False)

    async def emit_loop(self) -> None:
        """Pump the router's output into the send queue (the sender drains it to the socket)."""
        async for message in self.conversation.outputs():
            if isinstance(message, OutputAudio):
                self.queue.put((AUDIO, message.pcm), droppable=True)
            elif isinstance(message, OutputText):
                self.queue.put((TEXT, message.text.encode()), droppable=False)
            elif isinstance(message, SessionEvent) and self._handle_event(message):
                break

    def _handle_event(self, event: SessionEvent) -> bool:
        """True when the session is over."""
        if event.name == EventName.ENDED:
            return True
        if event.name == EventName.ERROR:
            self.error(event.detail or "session error")
        return False

    async def _send_loop(self) -> None:
        # Ends when the client leaves, or stops reading (the queue closed: the session ends with 1008).
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, ClientNotReading):
            while True:
                kind, payload = await self.queue.get()
                if kind == AUDIO:
                    # Encoded here, not when queued: dropped frames never break the Ogg stream.
                    opus = self.encoder.encode(pcm16_to_float(payload))
                    if opus:
                        await self.websocket.send_bytes(bytes([AUDIO]) + opus)
                else:
                    await self.websocket.send_bytes(bytes([kind]) + payload)
                dropped = self.queue.take_drop_report()
                if dropped:
                    reason = f"slow client: dropped {dropped} audio frames"
                    await self.websocket.send_bytes(bytes([ERROR]) + reason.encode())
