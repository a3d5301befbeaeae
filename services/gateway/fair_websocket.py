"""uvicorn's WebSocket protocol with two changes for hostile clients.

Fair: uvicorn parses everything one read returned (up to 256 KiB) in a single `data_received` call. For
a client sending tiny messages that is ~37,000 frames, ~150 ms of parsing during which no other request
is served: one socket could delay every other client by that much on each read. Here a large read is
parsed a slice at a time, the rest on the next turns of the loop, with the socket's reading paused
meanwhile (so what waits is bounded by one read). Order is kept; what waits is parsed before the
connection's end is handled.

Bounded after inflating: with per-message deflate the client picks the ratio (a 1 MiB message of zeros
is ~1 KiB on the wire), so one read's worth of wire bytes could become ~250 MiB of messages waiting for
the app. The next slice is parsed only once the app has taken every message waiting: what waits is what
one slice (`SLICE_BYTES` on the wire) inflates to. A connection lost with slices still unparsed has them
parsed only while nothing waits; the rest, which nobody would read, is dropped.

Graceful: a frame the parser refuses (over the size limit, or malformed) fails the connection with a close
code and reason. uvicorn then closes the TCP connection at once; a client still sending (the rest of its
oversized message) then gets a reset, and its kernel drops the close frame unread: the client never
learns why. Here the gateway half-closes instead (the close frame, then FIN), discards what the client
still sends, and closes when the client does, or after uvicorn's close timeout.

Cheap when not flooded: a socket's next message is parsed and queued while the app handles the last one,
and the app yields to other tasks before taking a message that was already waiting. uvicorn pauses the
socket's reading after every message and resumes it when the app takes it (two `epoll_ctl` calls per
message, ~6 µs), and the gateway yielded a loop turn before every receive; a real-time client sends one
message per 80 ms, which the app is already waiting for. Here reading is paused only when a message
arrives while another still waits for the app (so what waits is bounded by one message more than
uvicorn's one read), and the yield happens only when a message was already waiting (a flood: then it
keeps one socket from holding the loop). The app finds the yield done here by the scope's
`FAIR_RECEIVE` extension.

Quiet refusals: an upgrade answered with an HTTP response (the Host and Origin checks' 421 and 403
problems) is a complete handshake, but uvicorn does not mark it so and logs "ASGI callable returned
without completing handshake." at ERROR for each: anyone could fill the log with alarms. It is marked
complete here once the response is sent.

Refused before it was a request: an upgrade whose request line or a header line is over 8 KiB, or with
over 128 headers (a long `?text_prompt=` is enough), is refused by the websockets parser itself, which
queues a 414 or 431 and the end of the stream, but hands no request on. uvicorn writes the parser's output
only when answering a request, so the response was logged as sent and never written, and the connection
stayed open until the client left (a client hung in its handshake; anyone could hold sockets). Here it is
written and the connection half-closed, as after a refused frame. A request the parser refuses without
an answer (one with a body: a `Content-Length` other than 0, or a `Transfer-Encoding`) gets a 400
problem here, so that no refusal is a bare close. An upgrade over HTTP/1.0 (RFC 6455 asks for 1.1) was
taken: uvicorn writes the request out again as HTTP/1.1 before this protocol parses it. It is refused with
a 400 problem by `http_protocol.BoundedHttpProtocol`, the HTTP protocol that hands upgrades over.

No compression of Opus: per-message deflate (negotiated when the client offers it, as browsers do) spends
CPU on every message of Moshi's protocol, whose audio is Ogg/Opus and does not compress (about 5 % of the
gateway's event loop). `/api/chat` declines it. Elsewhere (`/v1/realtime`'s base64 JSON) it is kept, but
Huffman-only: what deflate gains on base64 audio is its 6-bit alphabet (to ~76 % of the size), which
Huffman coding alone gets; zlib's default string matching finds almost nothing more in audio (~75 %) and
costs 6x the CPU (~450 µs per 80 ms delta against ~70: 5.7 against 0.9 ms per session-second).
"""

from __future__ import annotations

import asyncio
import zlib
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request

from services.gateway.problems import problem_response
from shared import metrics
from shared.errors import ChorusError, InvalidRequest

FAIR_RECEIVE = "chorus.fair_receive"  # scope extension: `receive` yields before a message already waiting
SLICE_BYTES = 4 * 1024  # ~600 of the smallest frames: ~2 ms of parsing
UNCOMPRESSED_PATHS = frozenset({"/api/chat"})  # Opus in binary messages: deflate gains nothing
# uvicorn's own offer (window, memory), its compression Huffman-only: base64 gains nothing from matching.
HUFFMAN_DEFLATE = ServerPerMessageDeflateFactory(
    server_max_window_bits=12,
    client_max_window_bits=12,
    compress_settings={"memLevel": 5, "level": 1, "strategy": zlib.Z_HUFFMAN_ONLY},
)


def unparsed_upgrade_answer(refusal: BaseException) -> bytes:
    """The 400 problem for an upgrade the handshake parser refused without an answer (module docstring),
    saying what the parser found (websockets' reason: `unsupported request body`, ...)."""
    reason = str(refusal.__cause__ or refusal)[:64]  # it may quote the client's bytes: cut as elsewhere
    return problem_answer(InvalidRequest(f"the WebSocket upgrade request could not be taken: {reason}"))


def problem_answer(error: ChorusError) -> bytes:
    """The problem's HTTP response as REST answers it (`problems.problem_response`), written out whole
    for a connection about to be closed (no app runs to send it)."""
    response = problem_response(error)
    status = f"HTTP/1.1 {response.status_code} {HTTPStatus(response.status_code).phrase}".encode()
    headers = [name + b": " + value for name, value in response.raw_headers]
    return b"\r\n".join([status, *headers, b"connection: close", b"", bytes(response.body)])


class FairWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backlog = bytearray()  # read, not parsed yet
        self._next_slice: asyncio.Handle | None = None
        self._slices_held = False  # the backlog waits for the app to take the messages waiting
        self._failed = False

    def handle_connect(self, event: Request) -> None:
        if urlsplit(event.path).path in UNCOMPRESSED_PATHS:
            self.conn.available_extensions = []  # before the handshake answers the client's offer
        elif self.conn.available_extensions:  # uvicorn's `ws_per_message_deflate` (on by default)
            self.conn.available_extensions = [HUFFMAN_DEFLATE]
        super().handle_connect(event)
        if self.response.status_code == 101:  # a refused upgrade (400, 426) was answered: no app, no scope
            self.scope["extensions"] = {**(self.scope.get("extensions") or {}), FAIR_RECEIVE: {}}

    def data_received(self, data: bytes) -> None:
        if self._backlog or len(data) > SLICE_BYTES:
            self._backlog += data
            if self._next_slice is None:
                self._feed_slice()
        else:
            super().data_received(data)

    def _feed_slice(self) -> None:
        self._next_slice = None
        self._parse_slice()
        if self._backlog and not self.transport.is_closing():
            self.transport.pause_reading()  # again: uvicorn resumes reading when its app's queue is empty
            if self.queue.empty():
                self._next_slice = asyncio.get_running_loop().call_soon(self._feed_slice)
            else:  # `receive` parses the next slice once the app has taken what waits
                self._slices_held = True
        elif not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()  # unless uvicorn paused it (it resumes it then)

    def _parse_slice(self) -> None:
        piece = bytes(self._backlog[:SLICE_BYTES])
        del self._backlog[:SLICE_BYTES]
        super().data_received(piece)
        if self.conn.parser_exc is not None:
            self._backlog.clear()  # the connection failed: the rest is not parsed

    def send_receive_event_to_app(self) -> None:
        if self.queue.empty() and not self.read_paused:
            self.read_paused = True  # the app takes it on its next turn: reading goes on meanwhile
            super().send_receive_event_to_app()
            self.read_paused = False
        else:
            super().send_receive_event_to_app()  # uvicorn pauses reading while messages wait

    async def receive(self) -> Any:
        if not self.queue.empty():
            await asyncio.sleep(0)  # messages were waiting (a flood): every other task runs first
        message = await super().receive()
        if self._slices_held and self.queue.empty() and not self.transport.is_closing():
            self._slices_held = False
            self._next_slice = asyncio.get_running_loop().call_soon(self._feed_slice)
        return message

    def connection_lost(self, exc: Exception | None) -> None:
        if self._next_slice is not None:
            self._next_slice.cancel()
            self._next_slice = None
        while self._backlog and self.queue.empty():
            self._parse_slice()
        self._backlog.clear()  # what would wait behind unread messages: nobody reads it now
        super().connection_lost(exc)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True  # answered with an HTTP response: nothing left to complete

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.handshake_exc is not None and not self.handshake_initiated and not self.close_sent:
            # Refused before it was a request (no app runs): uvicorn would never write the parser's answer.
            metrics.SESSIONS_REJECTED.labels(reason="malformed_upgrade").inc()
            self._backlog.clear()  # the parser discards the rest
            queued = b"".join(self.conn.data_to_send())
            if not queued.startswith(b"HTTP/"):
                queued = unparsed_upgrade_answer(self.conn.handshake_exc) + queued
            self._half_close(queued)

    def handle_parser_exception(self) -> None:
        if self._failed:
            return  # the close was sent; the parser now discards what the client sends
        self._failed = True
        assert self.conn.close_sent is not None
        close = self.conn.close_sent
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason})
        self._half_close()

    def _half_close(self, answer: bytes | None = None) -> None:
        """Write the answer (by default what the parser queued), then FIN (the client reads it all, even
        while still sending); close when the client does, or after the close timeout."""
        self.transport.write(b"".join(self.conn.data_to_send()) if answer is None else answer)
        self.close_sent = True
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # the client is already gone (ENOTCONN): nothing left to half-close
                self.transport.close()
                return
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
