"""API keys: `Authorization: Bearer <key>` (or `?api_key=` for browsers' WebSockets).

Voice profiles, personas and sessions belong to the key that made them; an owner is identified by a
hash of its key, never the key itself. With no keys configured, auth is off and everything belongs to
the anonymous owner "".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from functools import lru_cache

from starlette.requests import HTTPConnection

from services.gateway.settings import GatewaySettings
from shared.errors import Unauthorized

log = logging.getLogger(__name__)

ANONYMOUS = ""


def owner_of(key: str) -> str:
    """The stable, non-secret id of a key's owner."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def _load_keys(inline: str, file: str | None) -> tuple[str, ...]:
    keys = [k.strip() for k in inline.split(",") if k.strip()]
    if file:
        with open(file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(keys))


def configured_keys(settings: GatewaySettings) -> tuple[str, ...]:
    return _load_keys(settings.api_keys, str(settings.api_keys_file) if settings.api_keys_file else None)


def auth_enabled(settings: GatewaySettings) -> bool:
    return bool(configured_keys(settings))


def presented_key(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return conn.query_params.get("api_key") or None


def authenticate(conn: HTTPConnection) -> str:
    """The owner id of the caller; raises Unauthorized. Compares every key in constant time."""
    settings: GatewaySettings = conn.app.state.settings
    keys = configured_keys(settings)
    if not keys:
        return ANONYMOUS
    key = presented_key(conn)
    if key is None:
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(candidate.encode(), key.encode())
    if not matched:
        raise Unauthorized("unknown API key")
    return owner_of(key)


async def current_owner(conn: HTTPConnection) -> str:
    """FastAPI dependency: `owner: str = Depends(current_owner)`."""
    return authenticate(conn)
