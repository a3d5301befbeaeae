"""One-use secrets in Redis: a key with a TTL under the secret's SHA-256 (Redis never holds the secret
itself), deleted when redeemed (GETDEL), so a secret opens one thing once.

What a secret grants, and its wire format, is the gateway's (services/gateway/client_secrets.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from shared.bus import Bus


class OneUseSecrets:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def _key(self, secret: str) -> str:
        return self.bus.names.client_secret(hashlib.sha256(secret.encode()).hexdigest())

    async def put(self, secret: str, grant: dict[str, Any], ttl_s: int) -> None:
        """Keep what `secret` grants (JSON) for at most `ttl_s`."""
        await self.bus.redis.set(self._key(secret), json.dumps(grant), ex=ttl_s)

    async def take(self, secret: str) -> dict[str, Any] | None:
        """What `secret` grants, deleting it; None when unknown, expired or used already."""
        raw = await self.bus.redis.getdel(self._key(secret))
        return None if raw is None else dict(json.loads(raw))
