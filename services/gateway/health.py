"""Liveness, readiness and metrics of the gateway."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from services.gateway.problems import redis_unavailable
from shared import metrics
from shared.bus import Bus
from shared.presence import list_workers

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok", "service": "gateway"}


async def readiness(bus: Bus) -> tuple[bool, dict[str, Any]]:
    """Ready when Redis answers and dialogue and router workers are alive.

    Free slots are reported, not required: a full fleet must not take every gateway out of its load
    balancer (new sessions get a clear `no_capacity` error instead). Cloned voices need a TTS worker.
    """
    if not await bus.ping():
        return False, {"redis": False}
    dialogue = await list_workers(bus, "dialogue")
    tts = await list_workers(bus, "tts")
    routers = await list_workers(bus, "router")
    free = sum(w.free_slots for w in dialogue)
    detail: dict[str, Any] = {
        "redis": True,
        "dialogue_workers": len(dialogue),
        "free_slots": free,
        "tts_workers": len(tts),
        "router_workers": len(routers),
        "cloned_voices": "available" if tts else "unavailable",
    }
    detail["capacity"] = "available" if free > 0 else "full"
    return bool(dialogue) and bool(routers), detail


@router.get(
    "/readyz",
    summary="Redis reachable and a dialogue worker has a free slot",
    responses={503: {"description": "Not ready; the body says what is missing"}},
)
async def readyz(request: Request) -> JSONResponse:
    try:
        ok, detail = await readiness(request.app.state.bus)
    except Exception as exc:
        if not redis_unavailable(exc):
            raise
        ok, detail = False, {"redis": False}  # Redis went away between the ping and the worker scan
    return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
