from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from shared.settings import CommonSettings


class RouterSettings(CommonSettings):
    router_http_port: int = Field(
        default=8003,
        ge=0,
        le=65535,
        description="Port of this worker's /healthz, /readyz, /metrics (0 = off).",
    )


@lru_cache
def get_settings() -> RouterSettings:
    return RouterSettings()
