"""Gateway limits: body size per route, REST requests per minute per owner, WebSocket message size/rate.

Concurrent sessions per key live with the owner's session set (`shared.sessions`). Every refusal
counts in `chorus_limit_rejections_total{limit=...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter
from limits import RateLimitItem, RateLimitItemPerMinute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.auth import ANONYMOUS, OWNER
from services.gateway.problems import outage_error, problem_response
from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.audio import FRAME_SEC, SAMPLE_RATE
from shared.bus import Bus
from shared.errors import ChorusError, PayloadTooLarge, RateLimited, RequestTimeout
from shared.rate_windows import RateWindows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BodyCap:
    """A route's body limit: `limit` bytes, what a 413 names, plus `framing` let through around them
    (a multipart upload's boundaries and small fields)."""

    limit: int
    framing: int = 0

    @property
    def allowed(self) -> int:
        return self.limit + self.framing


class BodySizeLimit:
    """Refuses request bodies over their route's cap with a 413 problem: by Content-Length, else while
    streaming, so a refused body is never parsed.

    Every route gets `max_bytes` (JSON bodies: small), except the (method, path) pairs in `routes`, which
    carry their own cap: the voice upload's is the upload setting, and it applies nowhere else.

    A body of the default cap must also arrive within `timeout_s` (else a 408 problem): a client trickling
    64 KiB of JSON a byte at a time held its request, and its socket, for days. The uploads' routes bound
    their own bodies' time (`uploads.py`: the stall and whole-body bounds).

    Not Starlette's `max_body_size` (FastAPI's per-route one is the same middleware): its 413 carries no
    measured size, limit or unit and is counted nowhere, and per route it runs inside the app, after the
    rate limit has counted the request.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float,
        routes: Mapping[tuple[str, str], BodyCap] | None = None,
    ) -> None:
        self.app = app
        self.default = BodyCap(max_bytes)
        self.timeout_s = timeout_s  # a body of the default cap; the routes' (uploads) bound their own time
        self.routes = dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.routes.get((scope["method"], scope["path"]), self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap.allowed:
            await self._refuse(self._too_large(cap, int(declared)), scope, receive, send)
            return
        seen = 0
        started = refused = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s if cap is self.default else None  # on the loop's clock

        async def bounded_receive() -> Message:
            # Past the limit or the deadline: answer now; the app is told the client left (it stops reading).
            # The deadline is the body's: a receive after its end (a streamed answer's wait for the client
            # to leave) has none.
            nonlocal seen, refused, deadline
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                refusal: ChorusError = self._too_slow()
            else:
                if message["type"] != "http.request":
                    return message
                if not message.get("more_body", False):
                    deadline = None
                seen += len(message.get("body", b""))
                if seen <= cap.allowed or refused:
                    return message
                refusal = self._too_large(cap, seen)
            if not refused:
                refused = True
                if not started:
                    await self._refuse(refusal, scope, receive, send)
            return {"type": "http.disconnect"}

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, bounded_receive, tracking_send)

    @staticmethod
    def _too_large(cap: BodyCap, measured: int) -> ChorusError:
        metrics.LIMIT_REJECTIONS.labels(limit="body_size").inc()
        return PayloadTooLarge(
            f"the request body is larger than the limit of {cap.limit} bytes",
            reason="too_large",
            measured=measured,
            limit=cap.limit,
            unit="bytes",
        )

    def _too_slow(self) -> ChorusError:
        metrics.LIMIT_REJECTIONS.labels(limit="body_time").inc()
        return RequestTimeout(
            f"the request body did not arrive within {self.timeout_s:g} s",
            reason="body_too_slow",
            limit=self.timeout_s,
            unit="s",
        )

    @staticmethod
    async def _refuse(error: ChorusError, scope: Scope, receive: Receive, send: Send) -> None:
        await problem_response(error, scope.get("path"))(scope, receive, send)


def client_network(client_ip: str) -> str:
    """Whom an auth-failure budget belongs to: an IPv4 address, or an IPv6 address's /64 (one subscriber
    is given a whole /64: counting single addresses would give it 2^64 budgets)."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip  # not an address (a test client's name): counted as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # IPv4 through a dual-stack socket
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class RateLimits:
    """The gateway's request budgets, counted in windows shared by every gateway (`shared.rate_windows`)."""

    def __init__(self, bus: Bus, settings: GatewaySettings) -> None:
        self.windows = RateWindows(bus)
        per_minute = settings.requests_per_minute
        self.requests = RateLimitItemPerMinute(per_minute, namespace="requests") if per_minute else None
        self.auth_failures = RateLimitItemPerMinute(
            settings.auth_failures_per_minute, namespace="auth_failures"
        )

    async def request(self, owner: str) -> ChorusError | None:
        """Count an authenticated owner's REST request: why it is refused, or None."""
        if self.requests is None:
            return None
        return await self._hit(self.requests, owner or "anonymous", "requests_per_minute", "requests")

    async def left(self, owner: str) -> list[dict[str, Any]]:
        """What is left of `owner`'s request budget, as a realtime `rate_limits.updated` lists it (nothing
        when the gateway sets no budget, or cannot count without Redis)."""
        if self.requests is None:
            return []
        try:
            stats = await self.windows.limiter.get_window_stats(self.requests, owner or "anonymous")
        except Exception as exc:
            if outage_error(exc) is None:
                raise
            return []
        reset_s = max(0.0, stats.reset_time - time.time())
        return [
            {
                "name": "requests",
                "limit": self.requests.amount,
                "remaining": stats.remaining,
                "reset_seconds": reset_s,
            }
        ]

    async def auth_failure(self, client_ip: str) -> ChorusError | None:
        """Count a missing or unknown credential from this client: a 429 once over budget, or None."""
        what = "requests with a missing or unknown API key from your address"
        return await self._hit(self.auth_failures, client_network(client_ip), "auth_failures", what)

    async def _hit(self, item: RateLimitItem, identity: str, limit: str, what: str) -> ChorusError | None:
        """Without Redis nothing can be counted: the request is refused (503) rather than let through
        unmetered, like every route that needs Redis."""
        try:
            if await self.windows.hit(item, identity):
                return None
            reset_at = await self.windows.reset_at(item, identity)
        except Exception as exc:
            if (outage := outage_error(exc)) is None:
                raise
            log.warning("cannot count the request rate: %r", exc)
            return outage
        metrics.LIMIT_REJECTIONS.labels(limit=limit).inc()
        retry_after = max(1, math.ceil(reset_at - time.time()))
        return RateLimited(f"more than {item.amount} {what} per minute", retry_after_s=retry_after)


class RequestRateLimit:
    """REST requests per minute per authenticated owner. Runs inside `auth.Authentication`, so it only
    ever counts owners whose key was verified (unknown keys are counted per IP there)."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.settings.requests_per_minute
            or not scope["path"].startswith("/v1/")
        ):
            await self.app(scope, receive, send)
            return
        limits: RateLimits = scope["app"].state.rate_limits
        refusal = await limits.request(scope.get("state", {}).get(OWNER, ANONYMOUS))
        if refusal is not None:
            await problem_response(refusal, scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)


class OpenSockets:
    """WebSockets open on this gateway per owner, at most `limit` each (0: unlimited). One event loop
    takes and frees them: no lock needed.

    A socket past the limit waits up to `grace_s` for one of its owner's sockets to close before it is
    refused: a client that closes a socket and opens the next at once has its close acknowledged by the
    protocol before the closed socket's handler has finished and given its place back."""

    def __init__(self, limit: int, grace_s: float = 1.0) -> None:
        self.limit = limit
        self.grace_s = grace_s
        self.count: Counter[str] = Counter()
        self._freed = asyncio.Event()  # set (and replaced) each time a place is given back

    async def take(self, owner: str) -> contextlib.AbstractContextManager[None]:
        """Count a socket of `owner` (RateLimited past the limit once the grace is over); the returned
        context frees it."""
        deadline = time.monotonic() + self.grace_s
        while self.limit and self.count[owner] >= self.limit:
            if (left := deadline - time.monotonic()) <= 0:
                metrics.LIMIT_REJECTIONS.labels(limit="ws_sockets_per_key").inc()
                raise RateLimited(
                    f"this API key has {self.limit} WebSockets open on this gateway already; close one first",
                    limit=self.limit,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), left)
        self.count[owner] += 1
        return self._held(owner)

    @contextlib.contextmanager
    def _held(self, owner: str) -> Iterator[None]:
        try:
            yield
        finally:
            self.count[owner] -= 1
            if self.count[owner] <= 0:
                del self.count[owner]
            self._freed.set()
            self._freed = asyncio.Event()


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
    DROP_READ_FACTOR = 10  # dropped messages are read at most this many times the message rate

    def __init__(self, settings: GatewaySettings, protocol: str) -> None:
        self.protocol = protocol
        self.max_bytes = settings.ws_max_message_bytes
        self.message_rate = settings.ws_messages_per_second
        self.messages = AsyncLimiter(2 * self.message_rate, 2.0)
        # Messages past the rate are dropped, but each was read and parsed (~10 µs): a flood read as fast
        # as it comes costs a core. Past DROP_READ_FACTOR times the rate the socket is not read until the
        # drops are back within it (TCP slows the client), a second's worth of them as a burst.
        self.drops = AsyncLimiter(self.DROP_READ_FACTOR * self.message_rate, 1.0)
        burst = settings.ws_audio_burst_s
        self.audio = AsyncLimiter(burst, burst / settings.ws_audio_pace)
        self._rate_error_at = -math.inf
        self.audio_paced_s = 0.0  # seconds charged to the audio pace so far

    async def check(self, message: Mapping[str, Any]) -> Refusal | None:
        """`None` = serve it. Every message counts against the rate (oversized ones too); past the rate
        it is dropped, and the client is told at most once a second (the rest are only counted); past
        DROP_READ_FACTOR times the rate, the next is not read until it is within that (backpressure)."""
        if not self.messages.has_capacity(1):
            await self.drops.acquire(1)
            return self._rate_limited()
        await self.messages.acquire(1)  # there is capacity: returns at once
        size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
        if size > self.max_bytes:
            metrics.LIMIT_REJECTIONS.labels(limit="ws_message_size").inc()
            detail = f"message of {size} bytes is larger than {self.max_bytes}; dropped"
            return Refusal(PayloadTooLarge(detail))
        return None

    async def _charge(self, seconds: float) -> None:
        """Take `seconds` (at most a burst) from the audio pace, waiting for them when they are not there."""
        self.audio_paced_s += seconds
        if self.audio.has_capacity(seconds):
            await self.audio.acquire(seconds)
            return
        started = time.monotonic()
        await self.audio.acquire(seconds)
        metrics.WS_AUDIO_PACING_WAIT.labels(protocol=self.protocol).observe(time.monotonic() - started)

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

    async def pace_undecodable(self) -> None:
        """Charge a message refused as not audio at all (before or by the decoder) one frame of audio:
        checking it cost about 1 ms at most, and the pace bounds how many a socket sends (about 19 a
        second at the default pace, where the message rate allows 100). Not a full burst, as a message
        over the burst is: the socket is not read while it waits, so a client that sent many and left
        would keep its session until the waits ran out."""
        await self.pace_audio(FRAME_SEC)

    async def pace_oversized(self, chars: int, paced_s: float = 0.0) -> None:
        """Charge a refused text message over the control events' bound by its size, as if it were base64
        PCM16 at 24 kHz (4 characters, 3 bytes, 1.5 samples), less the `paced_s` of audio it was charged
        already; a full burst at most."""
        seconds = chars * 3 / 4 / (2 * SAMPLE_RATE) - paced_s
        if seconds > 0:
            metrics.LIMIT_REJECTIONS.labels(limit="ws_event_size").inc()
            await self._charge(min(seconds, self.audio.max_rate))

    async def pace_audio(self, seconds: float) -> ChorusError | None:
        """Wait until `seconds` more input audio is within this socket's pace: backpressure (the socket is
        not read meanwhile, so TCP flow control slows the client; other sockets and the event loop go on).
        `None` = send it on. A message carrying more than the burst could never fit: it is refused, and
        still charged a full burst, so refusing is paced too (the gateway decodes no faster than the pace)."""
        burst = self.audio.max_rate
        await self._charge(min(seconds, burst))
        if seconds <= burst:
            return None
        metrics.LIMIT_REJECTIONS.labels(limit="ws_audio_burst").inc()
        metrics.WS_AUDIO_REFUSED.labels(protocol=self.protocol).inc(seconds)
        return PayloadTooLarge(
            f"one message carries {seconds:.2f} s of audio, more than the {burst:g} s a socket may send at "
            "once; send audio in smaller messages as it is captured"
        )
