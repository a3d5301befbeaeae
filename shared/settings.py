"""Settings common to every service. Each service extends `CommonSettings` in its own `settings.py`.

All settings come from `CHORUS_*` environment variables (or a `.env` file); docs/configuration.md lists
every one. Settings are never built at import time: call the cached getter of the service.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_worker_id() -> str:
    # Pod name in Kubernetes (HOSTNAME), the pid so several workers on one machine differ, and a few
    # random characters: a restarted container is often pid 1 again, and it must not pass for the
    # worker that died (whose sessions are still to be taken over).
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHORUS_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="Redis URL. Unset: `chorus up` starts an embedded redis-server; one service refuses.",
    )
    key_prefix: str = Field(default="chorus:", description="Prefix of every Redis key.")
    data_dir: Path = Field(default=Path("./data"), description="Durable data: voice profiles, personas.")
    log_level: str = Field(default="INFO", description="Python log level.")
    log_format: Literal["json", "text"] = Field(default="json", description="Structured JSON or plain text.")
    worker_id: str = Field(default_factory=_default_worker_id, description="This process's consumer name.")
    session_stream_maxlen: int = Field(
        default=1500,
        ge=50,
        description="Approximate cap of each per-session stream (1500 = 2 min of frames).",
    )
    control_stream_maxlen: int = Field(
        default=10_000, ge=100, description="Approximate cap of chorus:control."
    )
    session_ttl_s: int = Field(
        default=600,
        ge=1,
        description="A session's hash and transcript expire this long after its end (or after its last "
        "write, were every process to vanish).",
    )
    session_stream_linger_s: int = Field(
        default=10,
        ge=1,
        description="A session's audio streams are deleted this long after it ends (readers finish first).",
    )
    session_check_s: float = Field(
        default=2.0,
        gt=0,
        description="How often a worker checks that its sessions are still live (not ended, lease held).",
    )
    heartbeat_interval_s: float = Field(default=0.25, gt=0, description="How often workers refresh presence.")
    worker_ttl_s: float = Field(
        default=1.0,
        gt=0,
        description="A worker silent this long is considered dead; its sessions move to live workers.",
    )
    failover_poll_s: float = Field(
        default=0.2, gt=0, description="How often workers look for sessions of dead workers to take over."
    )
    claim_idle_ms: int = Field(
        default=5_000, ge=100, description="Pending entries idle this long are claimed from a dead consumer."
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        description="An entry whose handler failed this often goes to the dead-letter stream.",
    )
    redis_connect_timeout_s: float = Field(default=5.0, gt=0, description="Bound on connecting to Redis.")
    redis_socket_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="A Redis command unanswered this long fails (and is retried); blocking reads "
        "block at most half of it.",
    )

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise SystemExit(
                "CHORUS_REDIS_URL is not set. Run `chorus up` to start everything with an embedded "
                "redis-server, or point CHORUS_REDIS_URL at a Redis >= 6.2."
            )
        return self.redis_url
