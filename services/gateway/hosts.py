"""Which Host names the gateway answers and which browser origins may drive it.

- Host (every request but the probes): localhost, 127.0.0.1, ::1, the bind and published addresses and
  `CHORUS_ALLOWED_HOSTS`; anything else is a 421 problem. A web page that rebinds its own DNS name to
  127.0.0.1 reaches a loopback gateway under that name, so it is refused (DNS rebinding).
- Origin (WebSocket upgrades, and POST/PUT/PATCH/DELETE): the page's own origin (same host and port as
  the Host header), any localhost origin, and `CHORUS_ALLOWED_ORIGINS`; a request without Origin (not a
  browser) passes. Anything else is refused with 403: a page elsewhere cannot open a conversation or
  change data with the browser's reach (CSRF). Safe methods need no check: without CORS headers the
  browser never shows a foreign page the answer.

`/healthz`, `/readyz` and `/metrics` skip the Host check: probes and scrapers address a pod by its IP,
and these hold no tenant data.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.auth import is_loopback
from services.gateway.problems import problem_response
from services.gateway.settings import GatewaySettings
from shared import metrics
from shared.errors import ChorusError, Forbidden, MisdirectedRequest

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _names(setting: str) -> set[str]:
    return {item.strip().lower().rstrip("/") for item in setting.split(",") if item.strip()}


def split_host(value: str) -> tuple[str, int | None]:
    """`example.com:8000` / `[::1]:8000` / `example.com` -> (lowercase name, port or None)."""
    try:
        parsed = urlsplit(f"//{value.strip()}")
        return (parsed.hostname or "").rstrip("."), parsed.port
    except ValueError:  # a port that is not a number, an unclosed bracket
        return "", None


class AllowedOrigins:
    """The Host names and browser origins of `CHORUS_ALLOWED_HOSTS` / `CHORUS_ALLOWED_ORIGINS`."""

    def __init__(self, settings: GatewaySettings) -> None:
        hosts = _names(settings.allowed_hosts)
        self.any_host = "*" in hosts
        binds = {settings.host, settings.published_address or ""} - WILDCARD_BINDS
        self.hosts = LOCAL_HOSTS | hosts | {b.strip("[]").lower() for b in binds}
        origins = _names(settings.allowed_origins)
        self.any_origin = "*" in origins
        self.origins = origins

    def allows_host(self, host_header: str | None) -> bool:
        if self.any_host:
            return True
        name, _ = split_host(host_header or "")
        return bool(name) and name in self.hosts

    def allows_origin(self, origin: str, host_header: str | None) -> bool:
        if self.any_origin or origin.lower().rstrip("/") in self.origins:
            return True
        try:
            parsed = urlsplit(origin)
            name, port = (parsed.hostname or "").rstrip("."), parsed.port or DEFAULT_PORTS.get(parsed.scheme)
        except ValueError:
            return False
        if parsed.scheme not in ("http", "https") or not name:
            return False  # "null" (a sandboxed frame, a file) and anything odd
        if is_loopback(name):
            return True
        host_name, host_port = split_host(host_header or "")
        return name == host_name and (host_port is None or port == host_port)

    def refusal(self, scope: Scope) -> ChorusError | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if scope["path"] not in PROBES and not self.allows_host(host):
            metrics.LIMIT_REJECTIONS.labels(limit="host").inc()
            return MisdirectedRequest(
                f"this gateway does not answer for the host {host!r}: add it to CHORUS_ALLOWED_HOSTS"
            )
        origin = headers.get("origin")
        checked = scope["type"] == "websocket" or scope.get("method") in UNSAFE_METHODS
        if origin is not None and checked and not self.allows_origin(origin, host):
            metrics.LIMIT_REJECTIONS.labels(limit="origin").inc()
            return Forbidden(f"pages from {origin!r} may not use this gateway: see CHORUS_ALLOWED_ORIGINS")
        return None


class HostAndOriginCheck:
    """Refuses requests for other Host names (421) and browser requests from foreign origins (403); a
    refused WebSocket upgrade is answered with the problem as its HTTP response."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.allowed = AllowedOrigins(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.allowed.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
            await problem_response(refusal, scope["path"])(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})  # HTTP 403
