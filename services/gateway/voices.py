"""REST for voices: upload a reference clip as a profile, list (profiles and Pocket TTS's catalog), get,
delete, preview; and the check every socket makes on the voice it is asked for (`check_voice_usable`).

Uploads are bounded three ways: the body by its own cap (`upload_body_cap`, enforced by the body size
middleware on this route only), the decoded audio by the clip's header (`clips.py`), and the number
processed at once by `UploadSlots`: past it a new upload is refused before its body is read.

The gateway holds no model. After an upload it asks the TTS service to compute the voice state now
(`VoicePrepare` on `chorus:tts:requests`); a preview is a request/reply over Redis: `VoicePreview` to
any TTS worker (consumer group "tts"), the answer on `chorus:tts:reply:{request id}`. A profile belongs to
the API key that made it; another owner's profile answers 404, exactly like a missing one.

What the TTS workers can speak comes from their presence (`shared.voice_offer`): the catalog voices of
their model, and whether any holds the voice-cloning weights (gated on the hub). When workers serve and
none can clone, uploads and `profile:` sessions are refused with 503 `cloning_unavailable`, which says
how to get the weights (docs/voices.md); catalog voices and previews of profiles whose state is cached
keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from services.gateway.adapters import owner_lock
from services.gateway.auth import current_owner
from services.gateway.clips import ACCEPTED_TEXT, ClipLimits, prepare_clip, rejected, too_large
from services.gateway.limits import BodyCap
from services.gateway.persona_store import PersonaStore
from services.gateway.problems import problem_responses
from services.gateway.settings import GatewaySettings
from services.gateway.uploads import FORM_OVERHEAD, UploadRules, receive_form
from shared import metrics
from shared.audio import pcm16_to_wav
from shared.bus import Bus, Entry
from shared.errors import (
    ChorusError,
    CloningUnavailable,
    Conflict,
    GatewayTimeout,
    InvalidRequest,
    NoCapacity,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    UnsupportedMedia,
    error_for_code,
    excerpt,
)
from shared.messages import (
    TTS_REPLIES,
    VoiceDeleted,
    VoicePrepare,
    VoicePreview,
    catalog_name_of,
    catalog_voice,
    cloned_voice,
    model_of_voice,
    native_voice_for,
    profile_id_of,
)
from shared.presence import list_workers
from shared.preview_replies import PreviewReplies
from shared.retry import is_retryable
from shared.storage import LocalStorage
from shared.vad import load_speech_detector
from shared.voice_offer import CatalogEntry, VoiceOffer, voice_offer
from shared.voice_profiles import VoiceProfile, VoiceProfileStore, new_profile_id

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/voices", tags=["voices"])

UPLOAD_ROUTE = ("POST", "/v1/voices")
UPLOAD_BUSY_RETRY_AFTER_S = 2  # an upload takes well under a second to decode and check
REQUEST_STREAM_MAXLEN = 1000
POLL_MS = 1000  # one blocking read for a preview's reply: well under the Redis client's socket timeout
NO_WORKER_RETRY_AFTER_S = 10  # a TTS worker starting up loads its model first
BUSY_RETRY_AFTER_S = 5
TRUE_VALUES = ("true", "1", "yes", "on")


class VoiceOut(BaseModel):
    """A voice profile as clients see it (the owner stays private)."""

    id: str
    voice: str = Field(description="What a session's `voice` takes to speak in it: profile:<id>.")
    name: str
    duration_s: float
    speech_s: float
    sample_rate: int
    consent: bool
    created: datetime

    @classmethod
    def of(cls, p: VoiceProfile) -> VoiceOut:
        return cls(
            id=p.id,
            voice=p.voice,
            name=p.name,
            duration_s=p.duration_s,
            speech_s=p.speech_s,
            sample_rate=p.sample_rate,
            consent=p.consent,
            created=p.created,
        )


class CatalogVoiceOut(BaseModel):
    """A ready voice of Pocket TTS's catalog: no clip, no cloning weights needed."""

    name: str
    voice: str = Field(description="What a session's `voice` takes to speak in it: catalog:<name>.")
    language: str = Field(description="The language of the TTS model whose state it is.")
    source: str = Field(description="Where its state comes from: hub (Kyutai's published states) or local.")

    @classmethod
    def of(cls, entry: CatalogEntry) -> CatalogVoiceOut:
        return cls(
            name=entry.name, voice=catalog_voice(entry.name), language=entry.language, source=entry.source
        )


class VoiceList(BaseModel):
    items: list[VoiceOut] = Field(description="Your voice profiles (cloned from your clips).")
    catalog: list[CatalogVoiceOut] = Field(
        default_factory=list, description="Catalog voices the running TTS workers offer."
    )
    voice_kinds: list[str] = Field(
        default_factory=list, description="Voice kinds a session can use now: native, catalog, cloned."
    )


class PreviewIn(BaseModel):
    text: str = Field(min_length=1, max_length=500, description="What to say in the voice.")


SCRATCH_MARGIN_S = 60.0  # past an upload's body time bound: its checks and the move into place


async def open_voice_store(settings: GatewaySettings) -> VoiceProfileStore:
    """The durable store under CHORUS_DATA_DIR, after removing what crashed uploads left behind (voices,
    and any upload's file in the scratch folder) and indexing profiles the owner index lacks
    (`shared.owner_index`)."""
    storage = LocalStorage(settings.data_dir)
    store = VoiceProfileStore(storage, max_per_owner=settings.max_voices_per_key)
    # Never a file or profile another gateway sharing the data directory is writing now: an upload lives no
    # longer than its body's time bound and the checks and writes after it, whatever the grace is set to.
    grace_s = max(settings.voice_sweep_grace_s, settings.upload_timeout_s + SCRATCH_MARGIN_S)
    await store.sweep_incomplete(grace_s)
    await storage.sweep_scratch(grace_s)
    await store.reconcile_index()
    return store


def _store(request: Request) -> VoiceProfileStore:
    store: VoiceProfileStore = request.app.state.voices
    return store


def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


async def _offer_if_known(bus: Bus) -> VoiceOffer:
    """What the TTS workers offer; with Redis away, nothing known (routes served from disk keep working:
    profiles still list, an upload is still stored and its state computed on first use)."""
    try:
        return await voice_offer(bus)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        return VoiceOffer()


# --- upload ---------------------------------------------------------------------------------------


def upload_body_cap(settings: GatewaySettings) -> BodyCap:
    """The body an upload may send: the clip's cap plus the multipart framing around it."""
    return BodyCap(settings.voice_max_upload_bytes, framing=FORM_OVERHEAD)


class UploadSlots:
    """Uploads this gateway processes at once. Each holds its body, its decoded audio and a CPU core for
    up to a second: past the bound a new upload is refused at once (503 `busy`, Retry-After) instead of
    queueing, before any of its body is read. One key holds at most `per_key` of them (429 past it), so
    a client with slow uploads cannot take every slot from the others. One event loop takes and frees
    them: no lock needed."""

    def __init__(self, limit: int, per_key: int) -> None:
        self.limit = limit
        self.per_key = per_key
        self.in_use = 0
        self._by_owner: dict[str, int] = {}

    @contextlib.contextmanager
    def take(self, owner: str) -> Iterator[None]:
        if self.in_use >= self.limit:
            raise rejected(
                ServiceUnavailable(
                    f"this gateway is processing {self.limit} uploads already; retry shortly",
                    reason="busy",
                    limit=self.limit,
                    retry_after_s=UPLOAD_BUSY_RETRY_AFTER_S,
                ),
                "busy",
            )
        held = self._by_owner.get(owner, 0)
        if held >= self.per_key:
            raise rejected(
                RateLimited(
                    f"this key has {held} uploads in progress on this gateway already, the most one key "
                    "may; retry when one has finished",
                    reason="uploads_per_key",
                    limit=self.per_key,
                    retry_after_s=UPLOAD_BUSY_RETRY_AFTER_S,
                ),
                "uploads_per_key",
            )
        self.in_use += 1
        self._by_owner[owner] = held + 1
        metrics.UPLOADS_IN_PROGRESS.inc()
        try:
            yield
        finally:
            self.in_use -= 1
            if self._by_owner[owner] == 1:
                del self._by_owner[owner]
            else:
                self._by_owner[owner] -= 1
            metrics.UPLOADS_IN_PROGRESS.dec()


def _not_multipart() -> ChorusError:
    return rejected(
        UnsupportedMedia("send multipart/form-data with the fields file, name and consent=true"),
        "not_multipart",
    )


@router.post(
    "",
    status_code=201,
    response_model=VoiceOut,
    summary="Upload a reference clip (3-30 s of one person speaking) as a new voice profile",
    responses={
        400: {"description": "A field is missing or consent was not given"},
        413: {"description": "Larger than CHORUS_VOICE_MAX_UPLOAD_BYTES"},
        415: {"description": f"Not audio, or not {ACCEPTED_TEXT}"},
        409: {"description": "The key has CHORUS_MAX_VOICES_PER_KEY profiles already (quota_exceeded)"},
        422: {
            "description": "More than 2 channels, above 48 kHz, too short, too long, silent, clipped or "
            "no speech (measured value and limit)"
        },
        **problem_responses(408, 507),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "name", "consent"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string", "maxLength": 100},
                            "consent": {
                                "type": "boolean",
                                "description": "true: the speaker agreed to have their voice cloned",
                            },
                        },
                    }
                }
            },
        }
    },
)
async def create_voice(request: Request, owner: str = Depends(current_owner)) -> VoiceOut:
    # Every refusal comes before the body is read; `create` holds the quota place.
    if (await _offer_if_known(request.app.state.bus)).cloning_blocked:
        raise CloningUnavailable()
    await _store(request).check_quota(owner)
    slots: UploadSlots = request.app.state.upload_slots
    with slots.take(owner):
        return await _create_voice(request, owner)


async def _create_voice(request: Request, owner: str) -> VoiceOut:
    settings = _settings(request)
    cap = settings.voice_max_upload_bytes
    rules = UploadRules(
        cap,
        _not_multipart,
        too_large=lambda size: too_large(size, cap),
        missing=f"attach the clip ({ACCEPTED_TEXT})",
        timeout_s=settings.upload_timeout_s,
        stall_s=settings.upload_stall_s,
    )
    try:
        async with receive_form(request, request.app.state.storage.scratch(), rules) as form:
            data = await asyncio.to_thread(form.path.read_bytes)  # a clip is small: decoded whole anyway
    except RequestTimeout as exc:
        raise rejected(exc, exc.extra["reason"]) from None
    name = form.text("name") or ""
    if not 1 <= len(name) <= 100:
        raise InvalidRequest("`name` is required (1 to 100 characters)")
    if (form.text("consent") or "").lower() not in TRUE_VALUES:
        raise rejected(
            InvalidRequest("cloning a voice needs the speaker's consent: send consent=true"), "no_consent"
        )
    detector = load_speech_detector(settings.vad_model_path)
    clip = await asyncio.to_thread(prepare_clip, data, ClipLimits.from_settings(settings), detector)
    profile = VoiceProfile(
        id=new_profile_id(),
        owner=owner,
        name=name,
        duration_s=clip.duration_s,
        speech_s=clip.speech_s,
        consent=True,
    )
    await _store(request).create(profile, clip.samples)
    log.info(
        "voice profile created",
        extra={"profile_id": profile.id, "format": clip.source_format, "duration_s": clip.duration_s},
    )
    await _ask_for_voice_state(request.app.state.bus, profile.id)
    return VoiceOut.of(profile)


async def _ask_for_voice_state(bus: Bus, profile_id: str) -> None:
    """Best effort: without a TTS worker now, the state is computed on first use instead."""
    try:
        await bus.append(
            bus.names.tts_requests,
            VoicePrepare(session_id=profile_id, profile_id=profile_id),
            maxlen=REQUEST_STREAM_MAXLEN,
        )
    except Exception:
        log.warning("could not ask the TTS service for a voice state", extra={"profile_id": profile_id})


# --- read, delete -----------------------------------------------------------------------------------


@router.get("", response_model=VoiceList, summary="Your voice profiles (oldest first) and the catalog voices")
async def list_voices(request: Request, owner: str = Depends(current_owner)) -> VoiceList:
    # Read through the caller's owner index: no other key's profile is opened.
    profiles = [VoiceOut.of(p) for p in await _store(request).profiles(owner)]
    offer = await _offer_if_known(request.app.state.bus)
    return VoiceList(
        items=profiles,
        catalog=[CatalogVoiceOut.of(entry) for entry in offer.catalog.values()],
        voice_kinds=offer.kinds(),
    )


# --- the voice a session asks for -------------------------------------------------------------------


def check_catalog_voice(offer: VoiceOffer, name: str) -> None:
    if not offer.workers:
        raise ServiceUnavailable(
            "no TTS worker is running: catalog voices are unavailable right now",
            retry_after_s=NO_WORKER_RETRY_AFTER_S,
        )
    if name not in offer.catalog:
        valid = ", ".join(offer.catalog) or "none"
        raise InvalidRequest(
            f"unknown voice 'catalog:{name}': the catalog has {valid}", catalog=list(offer.catalog)
        )


async def check_voice_usable(store: VoiceProfileStore, bus: Bus, owner: str, voice: str) -> None:
    """A catalog voice must be in the running workers' catalog (InvalidRequest listing it); a profile
    must be the caller's own (another key's is refused exactly like a missing one) and speakable: some
    worker able to clone, or a state of it cached for a model a worker runs (CloningUnavailable).
    Native voices always pass."""
    if (name := catalog_name_of(voice)) is not None:
        check_catalog_voice(await voice_offer(bus), name)
        return
    if (profile_id := profile_id_of(voice)) is None:
        return
    await check_profile_owned(store, owner, voice)
    offer = await voice_offer(bus)
    if offer.cloning_blocked and not offer.models.intersection(await store.states(profile_id)):
        raise CloningUnavailable()


async def check_profile_owned(store: VoiceProfileStore, owner: str, voice: str | None) -> None:
    """A cloned voice names one of the caller's own profiles: another key's is refused exactly like a
    missing one (InvalidRequest). Other voices (and none) pass."""
    if voice is None or (profile_id := profile_id_of(voice)) is None:
        return
    try:
        await store.get_owned(profile_id, owner)
    except NotFound:
        raise InvalidRequest(f"unknown voice {excerpt(voice)}: no such profile for this API key") from None


async def served_native_voice(bus: Bus) -> str:
    """The native voice of a session that names none: moshiko, unless every dialogue worker that runs
    has said it runs moshika (then moshika: moshiko would be refused)."""
    models = {w.fields.get("model") for w in await list_workers(bus, "dialogue")}
    return "moshika" if models == {"moshika"} else native_voice_for(None)


async def check_native_voice_served(bus: Bus, voice: str) -> None:
    """A native voice is its own model's (moshika speaks only on moshika): when dialogue workers run but
    none runs that model, nor is loading (its model not announced yet), NoCapacity at once, naming it,
    instead of after the placement wait. A busy one is waited for, and so is a fleet with no worker at
    all (one restarting). Other voices run on any model."""
    if (model := model_of_voice(voice)) is None:
        return
    workers = await list_workers(bus, "dialogue")
    if workers and not any(not w.serving or w.fields.get("model", model) == model for w in workers):
        running = sorted({w.fields["model"] for w in workers if "model" in w.fields})
        raise NoCapacity(
            f"no dialogue worker runs {model}, the model whose voice {excerpt(voice)} is: use "
            f"{' or '.join(running) or 'another voice'}, or start a {model} worker",
            reason="no_model_worker",
            model=model,
        )


@router.get("/{voice_id}", response_model=VoiceOut, summary="One voice profile")
async def get_voice(voice_id: str, request: Request, owner: str = Depends(current_owner)) -> VoiceOut:
    return VoiceOut.of(await _store(request).get_owned(voice_id, owner))


@router.delete(
    "/{voice_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a profile: its clip, metadata and cached voice states (refused while a persona names it)",
)
async def delete_voice(voice_id: str, request: Request, owner: str = Depends(current_owner)) -> Response:
    store = _store(request)
    await store.get_owned(voice_id, owner)
    personas: PersonaStore = request.app.state.personas
    async with owner_lock(request).held(owner):  # no persona comes to name it until it is gone
        voice = cloned_voice(voice_id)
        if users := [p.id for p in await personas.list(owner) if p.voice == voice]:
            raise Conflict(
                f"voice {voice_id!r} is persona {users[0]!r}'s voice: change or delete the persona first",
                reason="in_use",
                personas=users,
            )
        await store.delete(voice_id)
    bus: Bus = request.app.state.bus
    try:
        await bus.append(
            bus.names.voice_events,
            VoiceDeleted(session_id=voice_id, profile_id=voice_id),
            maxlen=REQUEST_STREAM_MAXLEN,
        )
    except Exception:
        # The files are gone already; a TTS worker that missed this still refuses the profile (no metadata).
        log.warning("could not tell TTS workers about a deleted voice", extra={"profile_id": voice_id})
    log.info("voice profile deleted", extra={"profile_id": voice_id})
    return Response(status_code=204)


# --- preview --------------------------------------------------------------------------------------


async def request_preview(bus: Bus, voice: str, text: str, timeout_s: float) -> bytes:
    """Ask any TTS worker to speak `text` in `voice` (profile:<id> or catalog:<name>); PCM16 24 kHz mono
    back.

    The reply is awaited in short blocking reads (each well under the Redis client's socket timeout)
    until the deadline, which the request carries: a worker that takes it too late drops it.
    """
    if not await list_workers(bus, "tts"):
        raise ServiceUnavailable(
            "no TTS worker is running: cloned voices are unavailable right now",
            retry_after_s=NO_WORKER_RETRY_AFTER_S,
        )
    request_id = "req_" + uuid.uuid4().hex[:20]
    replies = PreviewReplies(bus)
    await bus.append(
        bus.names.tts_requests,
        VoicePreview(
            session_id=request_id,
            profile_id=profile_id_of(voice),
            voice=voice if catalog_name_of(voice) is not None else None,
            text=text,
            deadline=time.time() + timeout_s,
        ),
        maxlen=REQUEST_STREAM_MAXLEN,
    )
    try:
        entry = await _first_entry(bus, replies.stream(request_id), time.monotonic() + timeout_s)
    finally:
        await replies.discard(request_id)
    if entry is None:
        raise GatewayTimeout(
            f"no TTS worker answered within {timeout_s:g} s (busy, or gone meanwhile)",
            retry_after_s=BUSY_RETRY_AFTER_S,
        )
    reply = TTS_REPLIES.decode(entry.fields)
    if reply.error_code:
        raise error_for_code(reply.error_code, reply.error)
    return reply.pcm


async def _first_entry(bus: Bus, stream: str, deadline: float) -> Entry | None:
    """The stream's first entry, polled until `deadline` (monotonic) in reads of at most POLL_MS."""
    while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        # block=0 would wait forever: never less than 1 ms.
        entries = await bus.read({stream: "0-0"}, count=1, block_ms=max(1, min(POLL_MS, remaining_ms)))
        if entries:
            return entries[0]
    return None


@router.post(
    "/{voice_id}/preview",
    response_class=Response,
    summary="Speak a text in this voice (audio/wav, 24 kHz mono)",
    responses={
        200: {"content": {"audio/wav": {}}, "description": "The speech"},
        **problem_responses(503, 504),
    },
)
async def preview_voice(
    voice_id: str, body: PreviewIn, request: Request, owner: str = Depends(current_owner)
) -> Response:
    profile = await _store(request).get_owned(voice_id, owner)
    pcm = await request_preview(
        request.app.state.bus, cloned_voice(profile.id), body.text, _settings(request).voice_preview_timeout_s
    )
    return Response(pcm16_to_wav(pcm), media_type="audio/wav")


@router.post(
    "/catalog/{name}/preview",
    response_class=Response,
    summary="Speak a text in a catalog voice (audio/wav, 24 kHz mono)",
    responses={
        200: {"content": {"audio/wav": {}}, "description": "The speech"},
        **problem_responses(404, 503, 504),
    },
)
async def preview_catalog_voice(
    name: str, body: PreviewIn, request: Request, _owner: str = Depends(current_owner)
) -> Response:
    bus: Bus = request.app.state.bus
    offer = await voice_offer(bus)
    if name not in offer.catalog:  # like a missing profile: the catalog is what the running workers offer
        listing = f"the catalog has {', '.join(offer.catalog)}" if offer.catalog else "no TTS worker runs"
        raise NotFound(f"no catalog voice {name!r}: {listing}", catalog=list(offer.catalog))
    timeout_s = _settings(request).voice_preview_timeout_s
    pcm = await request_preview(bus, catalog_voice(name), body.text, timeout_s)
    return Response(pcm16_to_wav(pcm), media_type="audio/wav")
