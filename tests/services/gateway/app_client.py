"""An httpx client on the real gateway app (lifespan run, real redis-server), for the REST tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


@asynccontextmanager
async def gateway_client(
    redis_url: str, key_prefix: str, data_dir: Path, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(redis_url=redis_url, key_prefix=key_prefix, data_dir=data_dir, **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield client
