"""Who is calling: API keys, and the short-lived client secrets browsers use in their place.

- REST (`/v1/...`): `Authorization: Bearer <key>` (or `?api_key=`), checked by the `Authentication`
  middleware before the route runs, so before anything reads the body. The owner goes on the request's
  state, for the routes (`current_owner`) and the rate limit, which so counts authenticated owners only.
- WebSockets (`authenticate_socket`): a key as above, or a client secret minted by
  `POST /v1/realtime/client_secrets` (`?client_secret=ek_...` or `Bearer ek_...`), usable once.
- A missing or unknown credential is counted per client IP (`CHORUS_AUTH_FAILURES_PER_MINUTE`): past
  that budget the answer is 429, not 401, so random keys cannot be sprayed.

Auth fails closed (`open_key_ring`): with no keys the gateway serves only loopback unless
`CHORUS_AUTH=off` says otherwise, an empty keys file is a start-up error, and the keys file is re-read
when it changes (a removed key is refused within `CHORUS_API_KEYS_RELOAD_S`).

Voice profiles, personas and sessions belong to the key that made them; an owner is identified by a hash
of its key, never the key itself. With auth off everything belongs to the anonymous owner "".
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.problems import outage_error, problem_response
from services.gateway.settings import GatewaySettings
from shared.errors import ChorusError, Unauthorized

if TYPE_CHECKING:
    from services.gateway.client_secrets import ClientSecretStore
    from services.gateway.limits import RateLimits

log = logging.getLogger(__name__)

ANONYMOUS = ""
OWNER = "chorus_owner"  # the authenticated owner, in the request's state (scope["state"])
CLIENT_SECRET_PREFIX = "ek_"  # as OpenAI's ephemeral keys


class AuthSetupError(Exception):
    """The gateway must not start: it would serve a network address unauthenticated, or a keys file
    names no key."""


def owner_of(key: str) -> str:
    """The stable, non-secret id of a key's owner."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def is_loopback(address: str) -> bool:
    host = address.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keys_of(lines: Iterable[str]) -> tuple[str, ...]:
    keys = (line.strip() for line in lines)
    return tuple(dict.fromkeys(k for k in keys if k and not k.startswith("#")))


class KeyRing:
    """The API keys: `CHORUS_API_KEYS` plus the keys file, which is re-read when its mtime, size or inode
    change (a Kubernetes Secret update swaps the file). The file is looked at most every `reload_s`, so a
    request costs at most one `stat`. A file that became empty or unreadable grants nothing until fixed:
    revoking every key never turns auth off."""

    def __init__(
        self,
        inline: tuple[str, ...] = (),
        file: Path | None = None,
        reload_s: float = 1.0,
        *,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.inline = inline
        self.file = file
        self.reload_s = reload_s
        self.from_file: tuple[str, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False  # read once: later changes are logged (the first read is open_key_ring's)
        self._next_check = 0.0
        self._owners_of: tuple[str, ...] = ()  # the keys `_owners` was computed from
        self._owners: frozenset[str] = frozenset()
        self._refresh()

    @classmethod
    def off(cls) -> KeyRing:
        return cls(enabled=False)

    def matches(self, key: str) -> bool:
        """Whether `key` is a configured key; compares every key in constant time."""
        self._refresh()
        matched = False
        for candidate in self.inline + self.from_file:
            matched |= hmac.compare_digest(candidate.encode(), key.encode())
        return matched

    def has_owner(self, owner: str) -> bool:
        """Whether a configured key belongs to `owner`: a client secret outlives no revoked key."""
        self._refresh()
        keys = self.inline + self.from_file
        if keys != self._owners_of:
            self._owners_of, self._owners = keys, frozenset(owner_of(key) for key in keys)
        return owner in self._owners

    def _refresh(self) -> None:
        if self.file is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.reload_s
        stamp: tuple[int, int, int] | None = None
        keys: tuple[str, ...] = ()
        try:
            info = os.stat(self.file)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp == self._stamp:
                return
            keys = _keys_of(self.file.read_text(encoding="utf-8").splitlines())
        except OSError as exc:
            if self._stamp is not None:
                log.error("cannot read the API keys file %s (%s): its keys are refused", self.file, exc)
            self._stamp, self.from_file = None, ()
            return
        if self._stamp is not None or self._loaded:
            log.info("API keys file %s changed: %d keys", self.file, len(keys))
            if not keys:
                log.error("the API keys file %s holds no key: every key from it is refused", self.file)
        self._stamp, self.from_file, self._loaded = stamp, keys, True


def open_key_ring(settings: GatewaySettings) -> KeyRing:
    """The key ring to serve with, or why the gateway must not start (`AuthSetupError`)."""
    inline = _keys_of(settings.api_keys.split(","))
    path = settings.api_keys_file
    ring = KeyRing(inline, path, settings.api_keys_reload_s)
    if path is not None and not ring.from_file:
        reason = "cannot be read" if not path.is_file() else "holds no key (empty, or only comments)"
        raise AuthSetupError(
            f"the API keys file {path} {reason}: put one key per line in it, or unset CHORUS_API_KEYS_FILE"
        )
    has_keys = bool(inline or ring.from_file)
    if settings.auth == "off":
        if has_keys:
            raise AuthSetupError("CHORUS_AUTH=off, yet API keys are configured: unset one or the other")
        return KeyRing.off()
    if has_keys:
        return ring
    if settings.auth == "on":
        raise AuthSetupError("CHORUS_AUTH=on, but no API key is set: CHORUS_API_KEYS or CHORUS_API_KEYS_FILE")
    reachable = settings.published_address or settings.host
    if not is_loopback(reachable):
        raise AuthSetupError(
            f"the gateway would serve {reachable} with no API keys. Set CHORUS_API_KEYS or "
            "CHORUS_API_KEYS_FILE, or CHORUS_AUTH=off to serve without authentication on purpose"
        )
    return KeyRing.off()


def presented_key(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return conn.query_params.get("api_key") or None


def authenticate(conn: HTTPConnection) -> str:
    """The owner id of a caller presenting an API key; raises Unauthorized."""
    keys: KeyRing = conn.app.state.keys
    if not keys.enabled:
        return ANONYMOUS
    key = presented_key(conn)
    if key is None:
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    if not keys.matches(key):
        raise Unauthorized("unknown API key")
    return owner_of(key)


async def counted_refusal(conn: HTTPConnection, refusal: Unauthorized) -> ChorusError:
    """What to answer a caller whose credential failed: the 401, a 429 once its IP is over budget, or a
    503 when Redis cannot count it."""
    limits: RateLimits = conn.app.state.rate_limits
    over = await limits.auth_failure(conn.client.host if conn.client else "unknown")
    return over or refusal


async def current_owner(conn: HTTPConnection) -> str:
    """FastAPI dependency: `owner: str = Depends(current_owner)`. The `Authentication` middleware did the
    work for `/v1` routes; any other route that asks is authenticated here."""
    owner = conn.scope.get("state", {}).get(OWNER)
    return owner if isinstance(owner, str) else authenticate(conn)


class Authentication:
    """Authenticates every `/v1` HTTP request before the app sees it: no route, body parser or rate
    limit runs for an unknown key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        try:
            owner = authenticate(conn)
        except Unauthorized as exc:
            error = await counted_refusal(conn, exc)
            await problem_response(error, scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})[OWNER] = owner
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Caller:
    """Who opened a WebSocket, and the session settings its client secret carries (None: not set)."""

    owner: str
    model: str | None = None
    instructions: str | None = None
    voice: str | None = None


async def authenticate_socket(conn: HTTPConnection) -> Caller:
    """The caller of a WebSocket: an API key (when auth is on) or a client secret, which is used up here.
    Raises Unauthorized, RateLimited (too many failures from this IP) or ServiceUnavailable (Redis)."""
    keys: KeyRing = conn.app.state.keys
    key = presented_key(conn)
    secret = conn.query_params.get("client_secret")
    if secret is None and key is not None:
        if keys.enabled and keys.matches(key):
            return Caller(owner_of(key))
        if key.startswith(CLIENT_SECRET_PREFIX):
            secret = key
    if secret is None and not keys.enabled:
        return Caller(ANONYMOUS)
    if secret is not None:
        store: ClientSecretStore = conn.app.state.client_secrets
        try:
            caller = await store.redeem(secret)
        except Exception as exc:
            if (outage := outage_error(exc)) is None:
                raise
            raise outage from exc
        if caller is None:
            refusal = Unauthorized("unknown, expired or already used client secret")
        elif keys.enabled and not keys.has_owner(caller.owner):
            refusal = Unauthorized("the API key this client secret was minted with was revoked")
        else:
            return caller
    elif key is None:
        refusal = Unauthorized("send `Authorization: Bearer <api key>` or `?client_secret=`")
    else:
        refusal = Unauthorized("unknown API key")
    raise await counted_refusal(conn, refusal)
