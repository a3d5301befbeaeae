"""Liveness, readiness and metrics of the gateway."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator.metrics import Info

from shared import metrics
from shared.bus import Bus
from shared.presence import WorkerInfo, list_workers
from shared.retry import is_retryable
from shared.voice_offer import VoiceOffer, offer_of

router = APIRouter(tags=["health"])


# HEAD too: load balancers and uptime monitors probe with it (the body is not sent). Out of the OpenAPI
# schema, where it would repeat GET's operation id.
@router.get("/healthz", summary="The process is up")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok", "service": "gateway"}


def _service_state(workers: list[WorkerInfo]) -> dict[str, Any]:
    serving = [w for w in workers if w.serving]
    return {
        "ready": bool(serving),
        "workers": len(workers),
        "serving": len(serving),
        "free_slots": sum(w.free_slots for w in serving),
    }


def _cloned_voices(offer: VoiceOffer) -> str:
    """`available`; `no_cloning_weights` (TTS workers serve, none holds the gated weights: docs/voices.md);
    `unavailable` (no TTS worker serves)."""
    if offer.can_clone:
        return "available"
    return "no_cloning_weights" if offer.cloning_blocked else "unavailable"


async def readiness(bus: Bus) -> tuple[bool, dict[str, Any]]:
    """Ready when Redis answers and a dialogue worker and a router are serving (models loaded and warmed
    up: a worker still loading does not count). `services` says which are; `voice_kinds` which voices a
    session can use (catalog voices need a TTS worker, cloned ones one with the voice-cloning weights).

    Free slots are reported, not required: a full fleet must not take every gateway out of its load
    balancer (new sessions wait for a slot, then get a clear `no_capacity` error).
    """
    if not await bus.ping():
        return False, {"redis": False}
    workers = {name: await list_workers(bus, name) for name in ("dialogue", "router", "tts")}
    services = {name: _service_state(found) for name, found in workers.items()}
    dialogue, tts = services["dialogue"], services["tts"]
    offer = offer_of(workers["tts"])
    detail: dict[str, Any] = {
        "redis": True,
        "services": services,
        "dialogue_workers": dialogue["serving"],
        "free_slots": dialogue["free_slots"],
        "tts_workers": tts["serving"],
        "router_workers": services["router"]["serving"],
        "cloned_voices": _cloned_voices(offer),
        "voice_kinds": offer.kinds(),
        "capacity": "available" if dialogue["free_slots"] > 0 else "full",
    }
    return dialogue["ready"] and services["router"]["ready"], detail


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    summary="Redis reachable, a dialogue worker and a router serving",
    responses={503: {"description": "Not ready; the body says what is missing"}},
)
async def readyz(request: Request) -> JSONResponse:
    try:
        ok, detail = await readiness(request.app.state.bus)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        ok, detail = False, {"redis": False}  # Redis went away between the ping and the worker listing
    return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


def count_requests(app: FastAPI) -> None:
    """Count every HTTP answer in `chorus_http_requests_total{method,route,status}` with the
    instrumentator's middleware. Call it after the other middleware: added last, it is outermost and
    counts the limits' refusals too."""
    Instrumentator(should_group_status_codes=False).add(_count_request).instrument(app)


def _count_request(info: Info) -> None:
    # The route is its template (bounded labels, never the raw path); the instrumentator names a path
    # no route matches "none".
    route = "unmatched" if info.modified_handler == "none" else info.modified_handler
    metrics.HTTP_REQUESTS.labels(method=info.method, route=route, status=info.modified_status).inc()
