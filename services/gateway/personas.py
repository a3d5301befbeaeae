"""`/v1/personas`: built-in and stored personas, scoped to the caller's API key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from services.gateway.adapters import check_adapter_owned, owner_lock
from services.gateway.auth import current_owner
from services.gateway.persona_store import Persona, PersonaFields, PersonaStore
from services.gateway.problems import V1_ERRORS, problem_responses
from services.gateway.voices import check_profile_owned
from shared.messages import profile_id_of

router = APIRouter(prefix="/v1/personas", tags=["personas"])

Owner = Annotated[str, Depends(current_owner)]

_ERRORS = {**V1_ERRORS, **problem_responses(400, 404, 409)}


class PersonaList(BaseModel):
    items: list[Persona]


def _store(request: Request) -> PersonaStore:
    store: PersonaStore = request.app.state.personas
    return store


Store = Annotated[PersonaStore, Depends(_store)]


@router.get("", summary="List built-in and own personas", responses=_ERRORS)
async def list_personas(owner: Owner, store: Store) -> PersonaList:
    return PersonaList(items=await store.list(owner))


@asynccontextmanager
async def _owner_turn(
    request: Request, owner: str, fields: PersonaFields | None = None
) -> AsyncIterator[None]:
    """Writes that could race take turns under the owner's lock (the one an adapter delete takes): a replace
    that read the persona just before a delete removed it would write it back, unindexed (usable by id,
    outside the quota), and two deletes would both answer 204. A persona's adapter and voice profile are
    checked under it (their deletes take it too), so each stays until the persona is written."""
    async with owner_lock(request).held(owner):
        if fields is not None:
            await check_profile_owned(request.app.state.voices, owner, fields.voice)
            if fields.adapter is not None:
                await check_adapter_owned(request.app.state.adapters, owner, fields.adapter)
        yield


@router.post("", status_code=201, summary="Create a persona", responses=_ERRORS)
async def create_persona(fields: PersonaFields, owner: Owner, store: Store, request: Request) -> Persona:
    if fields.adapter is None and profile_id_of(fields.voice or "") is None:
        return await store.create(owner, fields)  # a new id names nothing a delete could race: no lock
    async with _owner_turn(request, owner, fields):
        return await store.create(owner, fields)


@router.get("/{persona_id}", summary="Get a persona", responses=_ERRORS)
async def get_persona(persona_id: str, owner: Owner, store: Store) -> Persona:
    return await store.get(owner, persona_id)


@router.put("/{persona_id}", summary="Replace a persona", responses=_ERRORS)
async def replace_persona(
    persona_id: str, fields: PersonaFields, owner: Owner, store: Store, request: Request
) -> Persona:
    async with _owner_turn(request, owner, fields):
        return await store.replace(owner, persona_id, fields)


@router.delete("/{persona_id}", status_code=204, summary="Delete a persona", responses=_ERRORS)
async def delete_persona(persona_id: str, owner: Owner, store: Store, request: Request) -> Response:
    async with _owner_turn(request, owner):
        await store.delete(owner, persona_id)
    return Response(status_code=204)
