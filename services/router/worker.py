"""`chorus router`: wiring only; the core loop is `services/router/routing.py`, the policy `mixer.py`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from services.router.routing import SERVICE, Router
from services.router.settings import RouterSettings, get_settings
from services.router.speech import EnergyGate, SpeechDetector
from shared.errors import ModelLoadError
from shared.runtime import ServiceRuntime
from shared.vad import load_speech_detector

log = logging.getLogger(__name__)


def speech_detector(settings: RouterSettings) -> SpeechDetector[Any]:
    """The detector CHORUS_ROUTER_VAD names. Silero that cannot load stops the router here, at startup:
    an energy gate in production would start barge-ins on every loud noise."""
    if settings.router_vad == "energy":
        log.warning("detecting user speech by loudness (CHORUS_ROUTER_VAD=energy): for synthetic audio only")
        return EnergyGate(settings.router_energy_floor_dbfs, settings.router_energy_ceiling_dbfs)
    try:
        return load_speech_detector(settings.vad_model_path, settings.router_vad_gate_dbfs)
    except ImportError as exc:  # onnxruntime
        raise ModelLoadError(
            f"the router's VAD needs onnxruntime ({exc}): pip install 'chorus[router]'"
        ) from exc


@contextlib.asynccontextmanager
async def open_router(runtime: ServiceRuntime, settings: RouterSettings) -> AsyncIterator[Router]:
    detector = await asyncio.to_thread(speech_detector, settings)
    yield Router(runtime.bus, settings, detector)


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime(
        SERVICE, settings, http_host=settings.router_http_host, http_port=settings.router_http_port or None
    )
    asyncio.run(runtime.run(lambda rt: open_router(rt, settings)))
