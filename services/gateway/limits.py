"""Gateway limits: request body size, REST requests per minute per key, WebSocket message size/rate.

Concurrent sessions per key live with the session set (services/gateway/sessions.py). Every refusal
counts in `chorus_limit_rejections_total{limit=...}`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.auth import ANONYMOUS, owner_of, presented_key
from services.gateway.problems import outage_error, problem_response
from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.bus import Bus
from shared.errors import ChorusError, PayloadTooLarge, RateLimited

log = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with a 413 problem: by Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        started = refused = False

        async def bounded_receive() -> Message:
            # Past the limit: answer 413 now and tell the app the client left, so it stops reading.
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not refused:
                    refused = True
                    if not started:
                        await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, bounded_receive, tracking_send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.LIMIT_REJECTIONS.labels(limit="body_size").inc()
        error = PayloadTooLarge(
            f"request body is larger than {self.max_bytes} bytes", max_bytes=self.max_bytes
        )
        await problem_response(error, scope.get("path"))(scope, receive, send)


# INCR + EXPIRE on first hit: one fixed one-minute window per key.
_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RequestRateLimit:
    """Fixed-window REST requests per minute per API key, counted in Redis (shared by every gateway)."""

    WINDOW_S = 60

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.settings.requests_per_minute
        if scope["type"] != "http" or not limit or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        key = presented_key(conn)
        owner = owner_of(key) if key else ANONYMOUS
        bus: Bus | None = getattr(scope["app"].state, "bus", None) if "app" in scope else None
        if bus is not None:
            refusal = await self._count(bus, owner, limit)
            if refusal is not None:
                await problem_response(refusal, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _count(self, bus: Bus, owner: str, limit: int) -> ChorusError | None:
        """Count this request in the owner's window: why it is refused, or None.

        Without Redis the window cannot be counted: the request is refused (503) rather than let through
        unmetered, like every route that needs Redis.
        """
        window = int(time.time() // self.WINDOW_S)
        counter = bus.names.rate_window(owner, window)
        try:
            hits = int(await bus.redis.eval(_HIT, 1, counter, str(self.WINDOW_S + 5)))
        except Exception as exc:
            if (outage := outage_error(exc)) is None:
                raise
            log.warning("cannot count the request rate: %r", exc)
            return outage
        if hits <= limit:
            return None
        metrics.LIMIT_REJECTIONS.labels(limit="requests_per_minute").inc()
        retry_after = max(1, math.ceil((window + 1) * self.WINDOW_S - time.time()))
        return RateLimited(f"more than {limit} requests per minute", retry_after_s=retry_after)


@dataclass(frozen=True)
class Refusal:
    """Why a socket's message was not served, and whether the client is told (`tell`) or the message is
    dropped silently (it was told less than a second ago)."""

    error: ChorusError
    tell: bool = True


class SocketLimits:
    """What a WebSocket receive loop asks of each message (`check`) and of the audio it carries
    (`pace_audio`), for one socket.

    Both rates are leaky buckets (aiolimiter's `AsyncLimiter`: float amounts, a burst, and an awaitable
    wait on the running loop): messages per second (a burst of 2 s worth), and seconds of input audio per
    second of wall clock (`ws_audio_pace`, a burst of `ws_audio_burst_s`).
    """

    RATE_ERROR_INTERVAL_S = 1.0  # at most one rate-limit error per socket per this

    def __init__(self, settings: GatewaySettings, protocol: str) -> None:
        self.protocol = protocol
        self.max_bytes = settings.ws_max_message_bytes
        self.message_rate = settings.ws_messages_per_second
        self.messages = AsyncLimiter(2 * self.message_rate, 2.0)
        burst = settings.ws_audio_burst_s
        self.audio = AsyncLimiter(burst, burst / settings.ws_audio_pace)
        self._rate_error_at = -math.inf

    async def check(self, message: Mapping[str, Any]) -> Refusal | None:
        """`None` = serve it. Every message counts against the rate (oversized ones too); past the rate
        it is dropped, and the client is told at most once a second (the rest are only counted)."""
        if not self.messages.has_capacity(1):
            return self._rate_limited()
        await self.messages.acquire(1)  # there is capacity: returns at once
        size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
        if size > self.max_bytes:
            metrics.LIMIT_REJECTIONS.labels(limit="ws_message_size").inc()
            detail = f"message of {size} bytes is larger than {self.max_bytes}; dropped"
            return Refusal(PayloadTooLarge(detail))
        return None

    def _rate_limited(self) -> Refusal:
        metrics.LIMIT_REJECTIONS.labels(limit="ws_message_rate").inc()
        now = time.monotonic()
        tell = now - self._rate_error_at >= self.RATE_ERROR_INTERVAL_S
        if tell:
            self._rate_error_at = now
        else:
            metrics.WS_ERRORS_SUPPRESSED.labels(protocol=self.protocol).inc()
        detail = (
            f"more than {self.message_rate:g} messages per second; dropped "
            "(this error is sent at most once a second)"
        )
        return Refusal(RateLimited(detail), tell=tell)

    async def pace_audio(self, seconds: float) -> ChorusError | None:
        """Wait until `seconds` more input audio is within this socket's pace: backpressure (the socket is
        not read meanwhile, so TCP flow control slows the client; other sockets and the event loop go on).
        `None` = send it on. A message carrying more than the burst could never fit: it is refused, and
        still charged a full burst, so refusing is paced too (the gateway decodes no faster than the pace)."""
        burst = self.audio.max_rate
        charge = min(seconds, burst)
        if self.audio.has_capacity(charge):
            await self.audio.acquire(charge)
        else:
            started = time.monotonic()
            await self.audio.acquire(charge)
            waited = time.monotonic() - started
            metrics.WS_AUDIO_PACING_WAIT.labels(protocol=self.protocol).observe(waited)
        if seconds <= burst:
            return None
        metrics.LIMIT_REJECTIONS.labels(limit="ws_audio_burst").inc()
        metrics.WS_AUDIO_REFUSED.labels(protocol=self.protocol).inc(seconds)
        return PayloadTooLarge(
            f"one message carries {seconds:.2f} s of audio, more than the {burst:g} s a socket may send at "
            "once; send audio in smaller messages as it is captured"
        )


class HttpMetrics:
    """Counts requests by method, route template (never the raw path: bounded labels) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics.HTTP_REQUESTS.labels(
                method=scope["method"], route=_route_template(scope), status=str(status)
            ).inc()


def _route_template(scope: Scope) -> str:
    route = scope.get("route")  # set by Starlette's router on the scope it was handed
    return str(getattr(route, "path", "unmatched"))
