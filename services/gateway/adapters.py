"""REST for LoRA adapters (fine-tuned personas): upload, list, get, delete.

An upload is the safetensors file `moshi-finetune` writes (multipart: `file`, `name`, optional `rank`,
`scaling`, `model`). It is checked before it is stored: a safetensors file (else 415), no larger than
`CHORUS_ADAPTER_MAX_UPLOAD_BYTES` (413, the body capped by the body size middleware on this route), and
every tensor a LoRA factor of a linear layer of the model it is for, in that layer's shape (422 naming the
first tensor that is not). The model's layer shapes are the ones its dialogue workers published at
start-up (`shared/adapter_store.py`): before any has started, an upload answers 503.

An adapter belongs to the API key that uploaded it (another key's answers 404, like a missing one); a
persona names it by id (`adapter`), and a socket may for one session (`?adapter=` on /api/chat,
`chorus_adapter` in a Realtime `session.update`). Deleting one that a persona names, or that a live session
of its owner runs, is refused (409): a worker taking such a session over could not load it.

Who may name an adapter and who deletes one take turns under the owner's adapter lock
(`OwnerLock`): a delete checks the personas and the live sessions under it; a persona write, a
session start and a mid-session switch check the adapter exists under it once what names the adapter is
written (the persona, the session hash), so one of the two always sees the other.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection

from services.gateway.auth import current_owner
from services.gateway.limits import BodyCap
from services.gateway.persona_store import PersonaStore
from services.gateway.problems import V1_ERRORS, problem_responses
from services.gateway.settings import GatewaySettings
from services.gateway.uploads import FORM_OVERHEAD, Upload, UploadRules, receive_form
from shared.adapter_store import AdapterRecord, AdapterStore, OwnerLock, new_adapter_id
from shared.adapters import check_adapter, check_loads, read_header_file
from shared.errors import (
    Conflict,
    InvalidRequest,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    UnsupportedMedia,
    excerpt,
)
from shared.presence import WorkerInfo, list_workers
from shared.sessions import SessionStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

UPLOAD_ROUTE = ("POST", "/v1/adapters")
DEFAULT_MODEL = "moshiko"

_ERRORS = {**V1_ERRORS, **problem_responses(400, 404, 409)}


class AdapterOut(BaseModel):
    """An adapter as clients see it (the owner stays private)."""

    id: str = Field(description="What a persona's `adapter` (or `?adapter=`) takes.")
    name: str
    model: str
    rank: int
    scaling: float
    dtype: str
    layers: int
    parameters: int
    size_bytes: int
    created: datetime

    @classmethod
    def of(cls, record: AdapterRecord) -> AdapterOut:
        return cls.model_validate(record.model_dump(exclude={"owner"}))


class AdapterList(BaseModel):
    items: list[AdapterOut]


def install(app: FastAPI, settings: GatewaySettings) -> None:
    """The store (on the app's storage) and the routes."""
    app.state.adapters = AdapterStore(app.state.storage, max_per_owner=settings.max_adapters_per_key)
    app.include_router(router)


def upload_body_cap(settings: GatewaySettings) -> BodyCap:
    return BodyCap(settings.adapter_max_upload_bytes, framing=FORM_OVERHEAD)


def _store(request: Request) -> AdapterStore:
    store: AdapterStore = request.app.state.adapters
    return store


def owner_lock(conn: HTTPConnection) -> OwnerLock:
    """The owner's lock, held around deleting an adapter, writing a persona or a session that names one,
    and replacing or deleting a persona (made on first use: the bus it needs opens with the app's
    lifespan)."""
    state = conn.app.state
    held: OwnerLock | None = getattr(state, "owner_lock", None)
    if held is None:
        held = state.owner_lock = OwnerLock(state.bus)
    return held


async def check_adapter_owned(store: AdapterStore, owner: str, adapter_id: str) -> AdapterRecord:
    """The adapter a persona or a session names: the caller's own, else 400 (unknown to this key)."""
    try:
        return await store.get_owned(adapter_id, owner)
    except NotFound:
        raise InvalidRequest(
            f"unknown adapter {excerpt(adapter_id)}: no such adapter for this API key"
        ) from None


async def check_adapter_served(conn: HTTPConnection, owner: str, adapter_id: str) -> AdapterRecord:
    """The adapter a session names: the caller's own (else 400), and one a live dialogue worker may serve
    (else NoCapacity at once, instead of after the placement wait): a worker of the adapter's model with
    adapter memory, or one still loading (its model is not known yet). A busy one is waited for."""
    record = await check_adapter_owned(conn.app.state.adapters, owner, adapter_id)
    workers = await list_workers(conn.app.state.bus, "dialogue")
    if not any(_may_serve(worker, record.model) for worker in workers):
        raise NoCapacity(
            f"no dialogue worker serves LoRA adapters for {record.model}, the model adapter {adapter_id!r} "
            f"is for: start one with CHORUS_DIALOGUE_ADAPTER_MEMORY set, or use a persona without it",
            reason="no_adapter_worker",
            model=record.model,
        )
    return record


async def confirm_adapter_kept(conn: HTTPConnection, owner: str, adapter_id: str) -> None:
    """Once a session's hash names the adapter: it still exists (else 400), checked under the owner's
    adapter lock. A delete checks the live sessions under the same lock: either it saw this session's
    hash (409) or this check sees the adapter gone; never both missed."""
    async with owner_lock(conn).held(owner):
        await check_adapter_owned(conn.app.state.adapters, owner, adapter_id)


def _may_serve(worker: WorkerInfo, model: str) -> bool:
    if not worker.serving:
        return True
    return worker.fields.get("model") == model and int(worker.fields.get("adapter_slots", "0")) > 0


def _not_multipart() -> UnsupportedMedia:
    return UnsupportedMedia("send multipart/form-data with the fields file (.safetensors) and name")


def _too_large(cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the adapter is larger than {cap} bytes (CHORUS_ADAPTER_MAX_UPLOAD_BYTES)", limit=cap
    )


def _number(form: Upload, name: str, kind: type[int] | type[float]) -> int | float | None:
    raw = form.text(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(f"`{name}` must be positive, got {raw!r}")
    return value


@router.post(
    "",
    status_code=201,
    response_model=AdapterOut,
    summary="Upload a LoRA adapter (moshi-finetune's safetensors) for fine-tuned personas",
    responses={
        **_ERRORS,
        **problem_responses(408, 507),
        413: {"description": "Larger than CHORUS_ADAPTER_MAX_UPLOAD_BYTES"},
        415: {"description": "Not multipart, or the file is not safetensors"},
        422: {"description": "A tensor does not fit the model's layers (the first one is named)"},
        503: {"description": "No dialogue worker of the model has published its layers yet"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "name"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string", "maxLength": 100},
                            "rank": {"type": "integer", "description": "else the file's lora_rank"},
                            "scaling": {"type": "number", "description": "else lora_scaling, else 2.0"},
                            "model": {"type": "string", "description": "moshiko (default) or moshika"},
                        },
                    }
                }
            },
        }
    },
)
async def create_adapter(request: Request, owner: str = Depends(current_owner)) -> AdapterOut:
    await _store(request).check_quota(owner)  # both refusals come before the body is read
    with request.app.state.upload_slots.take(owner):
        return await _create_adapter(request, owner)


async def _create_adapter(request: Request, owner: str) -> AdapterOut:
    store = _store(request)
    settings: GatewaySettings = request.app.state.settings
    cap = settings.adapter_max_upload_bytes
    rules = UploadRules(
        cap,
        _not_multipart,
        too_large=lambda _: _too_large(cap),
        missing="attach the adapter (.safetensors)",
        timeout_s=settings.upload_timeout_s,
        stall_s=settings.upload_stall_s,
    )
    async with receive_form(request, store.storage.scratch(), rules) as form:
        name = form.text("name") or ""
        if not 1 <= len(name) <= 100:
            raise InvalidRequest("`name` is required (1 to 100 characters)")
        model = form.text("model") or DEFAULT_MODEL
        if model not in ("moshiko", "moshika"):
            raise InvalidRequest(f"`model` is moshiko or moshika, got {model!r}")
        rank, scaling = _number(form, "rank", int), _number(form, "scaling", float)
        # Not a safetensors file: 415, whether or not the model's layers are known yet. Our parser reads the
        # header once for every check; safetensors' own (the worker's loader) must take it too.
        header = await asyncio.to_thread(read_header_file, form.path)
        await asyncio.to_thread(check_loads, form.path)
        layout = await asyncio.to_thread(
            check_adapter,
            header,
            await store.layers(model),
            rank=None if rank is None else int(rank),
            scaling=scaling,
        )
        record = AdapterRecord.of(new_adapter_id(), owner, name, model, layout, form.size)
        await store.create(record, form.path)
    log.info(
        "adapter created", extra={"adapter_id": record.id, "rank": record.rank, "bytes": record.size_bytes}
    )
    return AdapterOut.of(record)


@router.get("", response_model=AdapterList, summary="Your adapters, oldest first", responses=_ERRORS)
async def list_adapters(request: Request, owner: str = Depends(current_owner)) -> AdapterList:
    return AdapterList(items=[AdapterOut.of(r) for r in await _store(request).adapters(owner)])


@router.get("/{adapter_id}", response_model=AdapterOut, summary="One adapter", responses=_ERRORS)
async def get_adapter(adapter_id: str, request: Request, owner: str = Depends(current_owner)) -> AdapterOut:
    return AdapterOut.of(await _store(request).get_owned(adapter_id, owner))


@router.delete(
    "/{adapter_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an adapter (refused while a persona names it or a live session runs it)",
    responses=_ERRORS,
)
async def delete_adapter(adapter_id: str, request: Request, owner: str = Depends(current_owner)) -> Response:
    store = _store(request)
    await store.get_owned(adapter_id, owner)
    personas: PersonaStore = request.app.state.personas
    sessions = SessionStore(request.app.state.bus, request.app.state.settings.session_ttl_s)
    async with owner_lock(request).held(owner):  # no persona nor session comes to name it until it is gone
        users = [p.id for p in await personas.list(owner) if p.adapter == adapter_id]
        if users:
            raise Conflict(
                f"adapter {adapter_id!r} is used by persona {users[0]!r}: change or delete the persona first",
                reason="in_use",
                personas=users,
            )
        if live := await sessions.using_adapter(owner, adapter_id):
            more = f" and {len(live) - 1} more" if len(live) > 1 else ""
            raise Conflict(
                f"adapter {adapter_id!r} is used by this API key's live session {live[0]!r}{more}: end them, "
                "or switch them to another adapter, first",
                reason="in_use",
                sessions=live,
            )
        await store.delete(adapter_id)
    log.info("adapter deleted", extra={"adapter_id": adapter_id})
    return Response(status_code=204)
