"""`chorus gateway`: serve the FastAPI app with uvicorn until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from services.gateway.app import create_app
from services.gateway.auth import AuthSetupError
from services.gateway.fair_websocket import FairWebSocketProtocol
from services.gateway.http_protocol import BoundedHttpProtocol
from services.gateway.settings import get_settings
from shared.audio import LibopusMissing, libopus
from shared.logging import configure_logging
from shared.runtime import DRAIN_TIMEOUT_S

log = logging.getLogger(__name__)


def main() -> None:
    settings = get_settings()
    configure_logging("gateway", settings.log_level, settings.log_format)
    settings.require_redis_url()
    try:
        libopus()  # the Moshi protocol's Opus encoder: not starting beats failing every session
        app = create_app(settings)
    except (AuthSetupError, LibopusMissing) as exc:
        log.critical("not starting: %s", exc)
        raise SystemExit(2) from None
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        lifespan="on",
        http=BoundedHttpProtocol.configured(  # http_protocol.py
            settings.request_head_timeout_s, settings.response_stall_timeout_s
        ),
        ws=FairWebSocketProtocol,  # one socket's input never holds the event loop for long
        ws_per_message_deflate=settings.ws_compression,  # offered as Huffman-only (fair_websocket.py)
        ws_max_size=settings.ws_max_message_bytes,  # a larger frame: close 1009, with the reason
        timeout_graceful_shutdown=int(DRAIN_TIMEOUT_S),
    )
    # uvicorn handles SIGTERM/SIGINT itself: it stops accepting, closes sockets, then runs the lifespan exit.
    asyncio.run(uvicorn.Server(config).serve())
