from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field

from shared.settings import CommonSettings


class GatewaySettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Interface the gateway binds (0.0.0.0 in containers).")
    port: int = Field(default=8000, ge=1, le=65535, description="Gateway HTTP/WebSocket port.")
    api_keys: str = Field(default="", description="Comma-separated API keys; empty with no file = auth off.")
    api_keys_file: Path | None = Field(default=None, description="File with one API key per line (a Secret).")
    session_ready_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a new conversation waits for a dialogue slot before failing.",
    )
    ws_send_queue_frames: int = Field(
        default=64, ge=4, description="Per-socket send queue bound; a slow reader loses the oldest audio."
    )
    realtime_response_end_frames: int = Field(
        default=10,
        ge=1,
        description="Realtime API: a response closes after this many 80 ms frames without text.",
    )


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()
