"""The gateway's FastAPI app: wiring only. Routes live in their own modules."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway import (
    adapters,
    client_secrets,
    health,
    hosts,
    limits,
    personas,
    problems,
    sessions,
    voices,
    web,
)
from services.gateway.admission import Admission
from services.gateway.auth import Authentication, open_key_ring
from services.gateway.conversation import OUTPUT_BLOCK_MS, OUTPUT_READ_COUNT, finish_stops
from services.gateway.leases import LeaseKeeper
from services.gateway.persona_store import PersonaStore
from services.gateway.protocols import moshi_chat, realtime
from services.gateway.settings import GatewaySettings
from shared.bus import Bus, SharedReader, SharedWriter, make_bus_kwargs
from shared.runtime import cancel_and_wait
from shared.sessions import SessionStore
from shared.storage import LocalStorage
from shared.streams import StreamNames
from shared.transcripts import TranscriptLog

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        names = StreamNames(settings.key_prefix)
        bus = app.state.bus = await Bus.connect(
            settings.require_redis_url(), names, **make_bus_kwargs(settings)
        )
        app.state.rate_limits = limits.RateLimits(bus, settings)
        app.state.client_secrets = client_secrets.ClientSecretStore(bus)
        if not app.state.keys.enabled:
            why = "CHORUS_AUTH=off" if settings.auth == "off" else "no CHORUS_API_KEYS configured"
            log.warning("AUTH IS OFF (%s): every caller is the anonymous owner", why)
        app.state.voices = await voices.open_voice_store(settings)
        # Stored data from before the owner index, or put back by hand: indexed before anyone lists.
        await app.state.personas.reconcile_index()
        await app.state.transcripts.reconcile_index()
        app.state.admission = Admission(bus, settings)
        app.state.leases = LeaseKeeper(
            SessionStore(bus, settings.session_ttl_s),
            lease_s=settings.session_lease_s,
            renew_s=settings.session_lease_renew_s,
        )
        # Every session's `:out` in one XREAD per round (one per router tick), not one per session; every
        # session's user audio to `:in` in one script call per round trip, not one per frame.
        app.state.outputs, app.state.inputs = (
            SharedReader(bus, count=OUTPUT_READ_COUNT, block_ms=OUTPUT_BLOCK_MS),
            SharedWriter(
                bus, linger_s=settings.input_linger_ms / 1000, max_wait_s=settings.input_max_wait_ms / 1000
            ),
        )
        stop = asyncio.Event()
        background = [
            asyncio.create_task(app.state.leases.run(stop), name="leases"),
            asyncio.create_task(app.state.outputs.run(stop), name="outputs"),
            asyncio.create_task(sessions.clean_transcripts_forever(app.state.transcripts, settings)),
        ]
        log.info("gateway ready", extra={"port": settings.port})
        try:
            yield
        finally:
            stop.set()
            await finish_stops()  # stops still running for sockets the shutdown cancelled
            await cancel_and_wait(*background)
            await bus.close()

    app = FastAPI(
        title="Chorus",
        version="0.1.0",
        lifespan=lifespan,
        description="Full-duplex spoken conversation with personas and cloned voices.",
    )
    app.state.settings = settings
    app.state.keys = open_key_ring(settings)  # AuthSetupError: the gateway must not start
    app.state.storage = LocalStorage(settings.data_dir)
    app.state.transcripts = TranscriptLog(app.state.storage, max_per_owner=settings.max_transcripts_per_key)
    app.state.personas = PersonaStore(app.state.storage, max_per_owner=settings.max_personas_per_key)
    app.state.resolve_persona = app.state.personas.resolve
    app.state.upload_slots = voices.UploadSlots(
        settings.voice_max_concurrent_uploads, settings.max_concurrent_uploads_per_key
    )
    app.state.open_sockets = limits.OpenSockets(settings.ws_max_sockets_per_key)
    problems.install(app)
    app.include_router(health.router)
    app.include_router(personas.router)
    app.include_router(sessions.router)
    app.include_router(moshi_chat.router)
    app.include_router(realtime.router)
    app.include_router(client_secrets.router)
    # Voice routes raise these too; documenting them here keeps the schema complete.
    voice_errors = {**problems.V1_ERRORS, **problems.problem_responses(400, 404, 409, 415, 503)}
    app.include_router(voices.router, responses=voice_errors)
    adapters.install(app, settings)
    web.install(app)
    # Outermost last: metrics see every answer, including the limits' refusals. A /v1 request's key is
    # checked before its body is read and before it counts against its owner's rate.
    app.add_middleware(limits.RequestRateLimit, settings=settings)
    app.add_middleware(
        limits.BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.request_body_timeout_s,
        routes={
            voices.UPLOAD_ROUTE: voices.upload_body_cap(settings),
            adapters.UPLOAD_ROUTE: adapters.upload_body_cap(settings),
        },
    )
    app.add_middleware(Authentication)  # outside the body caps: an unknown caller learns no limits
    app.add_middleware(hosts.HostAndOriginCheck, settings=settings)
    health.count_requests(app)
    return app
