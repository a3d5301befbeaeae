"""Gateway limits: body size per route, REST requests per minute per owner, WebSocket message size/rate.

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

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.auth import ANONYMOUS, OWNER
from services.gateway.problems import outage_error, problem_response
from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.errors import ChorusError, PayloadTooLarge, RateLimited

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
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, routes: Mapping[tuple[str, str], BodyCap] | None = None
    ) -> None:
        self.app = app
        self.default = BodyCap(max_bytes)
        self.routes = dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.routes.get((scope["method"], scope["path"]), self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap.allowed:
            await self._refuse(cap, int(declared), scope, receive, send)
            return
        seen = 0
        started = refused = False

        async def bounded_receive() -> Message:
            # Past the limit: answer 413 now and tell the app the client left, so it stops reading.
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap.allowed and not refused:
                    refused = True
                    if not started:
                        await self._refuse(cap, seen, scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, bounded_receive, tracking_send)

    async def _refuse(self, cap: BodyCap, measured: int, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.LIMIT_REJECTIONS.labels(limit="body_size").inc()
        error = PayloadTooLarge(
            f"the request body is larger than the limit of {cap.limit} bytes",
            reason="too_large",
            measured=measured,
            limit=cap.limit,
            unit="bytes",
        )
        await problem_response(error, scope.get("path"))(scope, receive, send)


class RateLimits:
    """Request budgets counted in Redis, shared by every gateway: the `limits` library's sliding window
    counters (two counters per identity, no per-request entries)."""

    def __init__(self, redis: Redis, key_prefix: str, settings: GatewaySettings) -> None:
        # The gateway's own connection pool (its timeouts, password, reconnects): limits passes it on to
        # redis-py, though it types its options as plain values.
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=key_prefix,
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self.limiter = SlidingWindowCounterRateLimiter(storage)
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

    async def auth_failure(self, client_ip: str) -> ChorusError | None:
        """Count a missing or unknown credential from this IP: a 429 once over budget, or None."""
        what = "requests with a missing or unknown API key from your address"
        return await self._hit(self.auth_failures, client_ip, "auth_failures", what)

    async def _hit(self, item: RateLimitItem, identity: str, limit: str, what: str) -> ChorusError | None:
        """Without Redis nothing can be counted: the request is refused (503) rather than let through
        unmetered, like every route that needs Redis."""
        try:
            if await self.limiter.hit(item, identity):
                return None
            stats = await self.limiter.get_window_stats(item, identity)
        except Exception as exc:
            if (outage := outage_error(exc)) is None:
                raise
            log.warning("cannot count the request rate: %r", exc)
            return outage
        metrics.LIMIT_REJECTIONS.labels(limit=limit).inc()
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
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
        limits: RateLimits | None = (
            getattr(scope["app"].state, "rate_limits", None) if "app" in scope else None
        )
        if limits is not None:
            owner = scope.get("state", {}).get(OWNER, ANONYMOUS)
            refusal = await limits.request(owner)
            if refusal is not None:
                await problem_response(refusal, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TokenBucket:
    """Per-socket message rate: `rate` per second sustained, `burst` at once."""

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now if now is not None else time.monotonic()

    def take(self, now: float | None = None) -> bool:
        now = now if now is not None else time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class SocketLimits:
    """What a WebSocket receive loop asks of each message: `None` = accept, else why it was dropped."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.max_bytes = settings.ws_max_message_bytes
        self.bucket = TokenBucket(settings.ws_messages_per_second, 2 * settings.ws_messages_per_second)

    def check(self, message: Mapping[str, Any]) -> str | None:
        size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
        if size > self.max_bytes:
            metrics.LIMIT_REJECTIONS.labels(limit="ws_message_size").inc()
            return f"message of {size} bytes is larger than {self.max_bytes}; dropped"
        if not self.bucket.take():
            metrics.LIMIT_REJECTIONS.labels(limit="ws_message_rate").inc()
            return "too many messages per second; dropped"
        return None


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
