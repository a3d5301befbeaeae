"""uvicorn's HTTP protocol (httptools, uvicorn[standard]'s), bounded for hostile clients.

uvicorn bounds neither a request's head (its line and headers) in time or size, nor what happens to a
connection once a request was answered before its body arrived. Each was a way to hold a socket for as
long as a client liked (slowloris), and the head's size a way to make the gateway buffer, slowly, as much
as a client sent. `BoundedHttpProtocol` closes them:

- **The head's time** (`head_timeout_s`, CHORUS_REQUEST_HEAD_TIMEOUT_S): from the connection, or from the
  first byte after a kept-alive response (any byte: an empty line between requests too, which the parser
  skips without starting a request, and which stopped uvicorn's keep-alive timer for good), to the end of
  the headers. Past it: a 408 problem.
- **The head's size**: `HEAD_MAX_BYTES` on the wire, counted as the bytes arrive (httptools buffers a
  header until its end, quadratically: one endless header value took ~90 MB and a core for the whole
  head time), and `HEAD_MAX_FIELDS` headers. Past either: a 431 problem, before the parser is fed more.
  A chunked body's trailers (headers after its last chunk) are buffered the same way: the reads after a
  chunk's header that bring none of its data are counted against the same bound.
- **A request the parser refuses** (a malformed line or header): a 400 problem, where uvicorn wrote plain
  text.
- **A WebSocket upgrade** over HTTP/1.0 (RFC 6455 asks for 1.1; uvicorn rewrote it as 1.1 and took it), or
  pipelined behind a request not answered yet (that request's keep-alive timer would close the WebSocket
  5 s later): a 400 problem.
- **A request answered before its body arrived** (a 401, a 413, an upload's 408): uvicorn kept the
  connection to read the rest of the body, and the client's next byte stopped its keep-alive timer for
  good. The connection ends after the answer.
- **A client that stops reading its answers** (`stall_timeout_s`, CHORUS_RESPONSE_STALL_TIMEOUT_S):
  uvicorn has no write timeout, so a client that pipelined requests and read none of the answers held
  its socket, the answers buffered for it and the handler waiting to write the next, for good (asyncio's
  `close()` waits for the buffer to empty, too). Whenever answer bytes wait in the transport (past its
  high-water mark, after a response is complete, or left below the low-water mark), the wait is watched:
  when none of them has left for that long, the connection is reset (the kernel's queue dropped too). A
  slow reader that makes any progress is left alone.

Every refusal ends the connection the same way (`_end_after`): the answer, after the answers still owed
to requests the client pipelined before it (in order: it is theirs to be first), then FIN. What the
client still sends is read and dropped, up to `DRAIN_MAX_BYTES` (closing with it unread would reset the
connection, and the client's kernel could drop the answer unread; past that, reading pauses), and the
socket closes when the client does, or after uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import sys
import termios

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.gateway.fair_websocket import problem_answer
from shared import metrics
from shared.errors import ChorusError, HeadTooLarge, InvalidRequest, RequestTimeout

# Generous for any real client (a 30 KB cookie passes); websockets refuses an upgrade's single line over
# 8 KiB itself, with a 414 or 431, and an upgrade of over 128 headers.
HEAD_MAX_BYTES = 64 * 1024
HEAD_MAX_FIELDS = 256
DRAIN_MAX_BYTES = 1024 * 1024  # read and dropped after a refusal, at most (then reading pauses)

log = logging.getLogger(__name__)

# The bytes in a socket's kernel send queue (Linux's SIOCOUTQ); elsewhere only the transport's count.
_SEND_QUEUE_IOCTL: int | None = getattr(termios, "TIOCOUTQ", None)


class HeadRefused(Exception):
    """Raised in a parser callback: the head is refused (`BoundedHttpProtocol.refusal` says why)."""


class BoundedHttpProtocol(HttpToolsProtocol):
    head_timeout_s = 10.0  # `configured` sets the gateway's settings
    stall_timeout_s = 30.0
    refusal: ChorusError | None = None  # why the head was refused, raised as `HeadRefused` mid-parse
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0  # on the wire, since the head's clock started
    _heads_started = 0
    _head_fields = 0
    _chunk_gap: int | None = None  # bytes read since a chunk's header without its data (None: not waiting)
    _ending = False  # the answer that ends the connection is written or owed: input is dropped
    _owed: bytes | None = None  # that answer, while earlier requests' answers are still being written
    _drained = 0
    _stall_timer: asyncio.TimerHandle | None = None
    _stall_buffered = 0  # bytes the client had not taken when the stall's clock (re)started

    @classmethod
    def configured(cls, head_timeout_s: float, stall_timeout_s: float) -> type[BoundedHttpProtocol]:
        """This protocol with the gateway's bounds (uvicorn makes one per connection from the class)."""
        return type(
            cls.__name__, (cls,), {"head_timeout_s": head_timeout_s, "stall_timeout_s": stall_timeout_s}
        )

    # --- the head: its clock and its size -----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # a client that connects and sends nothing is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_stall_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._ending:
            self._drain(len(data))
            return
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._start_head_timer()  # a byte between requests: the next head's clock starts
        if self._head_timer is not None:
            room = HEAD_MAX_BYTES - self._head_bytes
            self._head_bytes += min(len(data), room + 1)
            if len(data) > room:
                head = self._heads_started
                super().data_received(data[:room])  # the head may end within its bound
                if self._ending or self.transport.is_closing() or self.transport.get_protocol() is not self:
                    return  # refused, or upgraded to a WebSocket (which takes no more from here)
                if self._heads_started != head:  # it ended, and a pipelined one began: count that one on
                    self.data_received(data[room:])
                    return
                if self._head_timer is not None:  # it did not end
                    self._refuse(
                        self._too_large(
                            f"the request line and headers are over {HEAD_MAX_BYTES} bytes",
                            HEAD_MAX_BYTES,
                            "bytes",
                        )
                    )
                    return
                data = data[room:]
        super().data_received(data)
        if self._chunk_gap is not None and not self._ending:
            self._count_chunk_gap(len(data))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_fields = 0
        if self._head_timer is None:  # pipelined behind a request whose head ended in the same read
            self._start_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > HEAD_MAX_FIELDS:
            self.refusal = self._too_large(
                f"the request has over {HEAD_MAX_FIELDS} headers", HEAD_MAX_FIELDS, "headers"
            )
            raise HeadRefused  # the parser stops; uvicorn answers through `send_400_response`
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    # A chunk's header, then its data (`on_body`); after the last chunk's (size 0), its trailers, then the
    # chunk's end. Only reads wholly after a chunk's header are counted (-1: the one that brought it).
    def on_chunk_header(self) -> None:
        self._chunk_gap = -1

    def on_body(self, body: bytes) -> None:
        self._chunk_gap = None
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self._chunk_gap = None

    def _count_chunk_gap(self, size: int) -> None:
        assert self._chunk_gap is not None
        self._chunk_gap = 0 if self._chunk_gap < 0 else self._chunk_gap + size
        if self._chunk_gap > HEAD_MAX_BYTES:
            self._chunk_gap = None
            self._refuse(
                self._too_large(
                    f"the body's trailers are over {HEAD_MAX_BYTES} bytes", HEAD_MAX_BYTES, "bytes"
                )
            )

    def _start_head_timer(self) -> None:
        self._heads_started += 1
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._ending:
            return
        metrics.LIMIT_REJECTIONS.labels(limit="http_head_time").inc()
        self._refuse(
            RequestTimeout(
                f"the request line and headers did not arrive within {self.head_timeout_s:g} s",
                reason="head_too_slow",
                limit=self.head_timeout_s,
                unit="s",
            )
        )

    @staticmethod
    def _too_large(detail: str, limit: int, unit: str) -> HeadTooLarge:
        metrics.LIMIT_REJECTIONS.labels(limit="http_head_size").inc()
        return HeadTooLarge(detail, limit=limit, unit=unit)

    # --- refusals, and how a connection ends ---------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        del msg  # uvicorn's "Invalid HTTP request received." (it logged it)
        self._refuse(self.refusal or InvalidRequest("the HTTP request could not be parsed"))

    def handle_websocket_upgrade(self) -> None:
        self._stop_head_timer()  # stopped with the headers already; the socket is the WebSocket's now
        if self.scope.get("http_version") != "1.1":
            refusal = "a WebSocket upgrade needs HTTP/1.1"
        elif self.cycle is not None and not self.cycle.response_complete:
            refusal = "a WebSocket upgrade cannot follow a request not answered yet on the same connection"
        else:
            super().handle_websocket_upgrade()
            return
        metrics.SESSIONS_REJECTED.labels(reason="malformed_upgrade").inc()
        self._refuse(InvalidRequest(refusal))

    def _refuse(self, error: ChorusError) -> None:
        """Answer with the problem and end the connection; after the answers still owed, if any."""
        answer = problem_answer(error)
        self._stop_head_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.more_body:  # a whole request before this one: its answer comes first
                self._ending, self._owed = True, answer
                return
            cycle.disconnected = True  # the error is in its own body: it gets no more of it, nor an answer
            cycle.message_event.set()
        self._end_after(answer)

    def on_response_complete(self) -> None:
        self._watch_stall()  # the answer may still be waiting in the transport: watched until it leaves
        if self.transport.is_closing() or self.pipeline:
            super().on_response_complete()  # the next pipelined request runs
        elif self._owed is not None:
            self.server_state.total_requests += 1
            answer, self._owed = self._owed, None
            self._end_after(answer)
        elif self.cycle.more_body:  # answered before its body arrived
            self.server_state.total_requests += 1
            self._end_after(b"")
        else:
            super().on_response_complete()

    def _end_after(self, answer: bytes) -> None:
        self._stop_head_timer()
        self._ending = True
        self.flow.resume_reading()
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.transport.close)

    def _drain(self, size: int) -> None:
        self._drained += size
        if self._drained > DRAIN_MAX_BYTES:
            self.flow.pause_reading()

    # --- answers that do not leave: a client that stops reading -------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_stall()

    def resume_writing(self) -> None:
        # The buffer drained to its low-water mark: the client reads. What is left (up to the mark) is
        # watched afresh: no answer may come to re-arm the watch.
        self._watch_stall()
        super().resume_writing()

    def _watch_stall(self) -> None:
        """Start the stall's clock over while answer bytes wait in the transport."""
        self._stop_stall_timer()
        if self.transport.get_write_buffer_size():
            self._stall_buffered = self._unread()
            self._stall_timer = self.loop.call_later(self.stall_timeout_s, self._check_stall)

    def _unread(self) -> int:
        """Answer bytes the client has not taken: in the transport, and in the kernel's send queue. The
        kernel's counts because it holds megabytes and wakes the transport only once much of it is
        free: a slow reader's progress shows there first."""
        unread = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _SEND_QUEUE_IOCTL is not None and sock is not None:
            with contextlib.suppress(OSError):
                queued = fcntl.ioctl(sock.fileno(), _SEND_QUEUE_IOCTL, b"\0" * 4)
                unread += int.from_bytes(queued, sys.byteorder, signed=True)
        return unread

    def _stop_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _check_stall(self) -> None:
        self._stall_timer = None
        unread = self._unread()
        if unread < self._stall_buffered:  # the client took some: watch what is left
            self._watch_stall()
            return
        metrics.LIMIT_REJECTIONS.labels(limit="http_write_stall").inc()
        log.warning(
            "connection dropped: its client read none of its answers for %g s (%d bytes waiting)",
            self.stall_timeout_s,
            unread,
            extra={"client": f"{self.client[0]}:{self.client[1]}" if self.client else None},
        )
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset: the kernel drops its send queue too (a close would keep it queued)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
