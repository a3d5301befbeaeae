"""Personas: built-ins shipped in code plus ones stored per owner at `personas/{id}.json`.

A persona is a `PersonaSpec` (what a session needs) plus who owns it and its default voice: the voice a
session with it speaks in when the client names none (`session_socket.starting_voice`). Built-ins belong
to nobody, every owner sees them, and they cannot be changed or deleted; they name no voice, so each
speaks in the voice of whichever Moshi model the deployment serves.

Stored format 2 (since personas' voices are used): before it, `voice` was always written, "moshika" when
the client gave none, and sessions never used it. A record without a format saying "moshika" is read as
naming no voice: its sessions keep the voice they had; any other voice there was the client's choice.

Each owner's stored personas are indexed (`shared.owner_index`: `owners/{owner}/personas/{id}`, written
before the persona and removed after it), so an owner's listing and quota read only that owner's files.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import Conflict, InvalidRequest, NotFound, excerpt
from shared.messages import PersonaSpec, ProfileId, Sampling, VoiceName, valid_id
from shared.owner_index import OwnerIndex, Reconciled
from shared.storage import Storage

log = logging.getLogger(__name__)


class PersonaFields(BaseModel):
    """What a client sends to create or replace a persona."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    primer: str = Field(default="", max_length=2000, description="Text forced into Moshi's text stream.")
    greeting: str = Field(default="", max_length=500)
    voice: VoiceName | None = Field(
        default=None,
        description="The voice its sessions speak in when the client names none; null: the model's own.",
    )
    sampling: Sampling = Field(default_factory=Sampling)
    adapter: ProfileId | None = Field(
        default=None, description="A LoRA adapter id (/v1/adapters): a fine-tuned persona, docs/personas.md."
    )


class Persona(PersonaFields):
    id: str = Field(max_length=64)
    builtin: bool = False
    owner: str = Field(default="", exclude=True)

    def spec(self) -> PersonaSpec:
        return PersonaSpec(
            id=self.id,
            name=self.name,
            primer=self.primer,
            greeting=self.greeting,
            sampling=self.sampling,
            adapter=self.adapter,
        )


BUILTINS: dict[str, Persona] = {
    p.id: p
    for p in (
        Persona(id="default", name="Default", builtin=True),
        Persona(
            id="assistant",
            name="Helpful assistant",
            builtin=True,
            primer="You are a helpful, concise voice assistant. Answer briefly and ask when unsure.",
            greeting="Hi, how can I help?",
        ),
        Persona(
            id="tutor",
            name="Language tutor",
            builtin=True,
            primer="You are a patient English tutor. Speak slowly and correct mistakes gently.",
            greeting="Hello! What would you like to practise today?",
        ),
        Persona(
            id="storyteller",
            name="Storyteller",
            builtin=True,
            primer="You are a warm storyteller who improvises short stories with the listener.",
            greeting="Shall I tell you a story?",
            sampling=Sampling(text_temperature=0.9),
        ),
    )
}


class PersonaStore:
    """Owner-scoped persona CRUD over durable storage. Another owner's persona is NotFound, never 403.
    `max_per_owner`: stored personas one owner may have (0 = no limit); past it `create` is refused."""

    def __init__(self, storage: Storage, *, max_per_owner: int = 0) -> None:
        self.storage = storage
        self.max_per_owner = max_per_owner
        self.index = OwnerIndex(storage, "personas")

    @staticmethod
    def _key(persona_id: str) -> str:
        if not valid_id(persona_id):
            raise NotFound(f"no persona {excerpt(persona_id)}")
        return f"personas/{persona_id}.json"

    async def get(self, owner: str, persona_id: str) -> Persona:
        if persona_id in BUILTINS:
            return BUILTINS[persona_id]
        try:
            raw = await self.storage.get(self._key(persona_id))
        except NotFound:  # the storage's own words would name its layout
            raise NotFound(f"no persona {excerpt(persona_id)}") from None
        stored = _load(raw)
        if stored.owner != owner:
            raise NotFound(f"no persona {excerpt(persona_id)}")
        return stored

    async def list(self, owner: str) -> list[Persona]:
        """The built-ins, then the owner's own, read through its index: no other owner's file is opened."""
        found: list[Persona] = list(BUILTINS.values())
        for persona_id in await self.index.names(owner):
            try:
                persona = _load(await self.storage.get(self._key(persona_id)))
            except NotFound:  # not written yet, or deleted meanwhile
                continue
            if persona.owner == owner:
                found.append(persona)
        return found

    async def create(self, owner: str, fields: PersonaFields) -> Persona:
        """A new persona, within the owner's quota (QuotaExceeded otherwise)."""
        persona = Persona(id=f"p_{uuid.uuid4().hex[:12]}", owner=owner, **fields.model_dump())
        await self.index.reserve(owner, persona.id, self.max_per_owner, self._stored)
        try:
            await self._save(persona)
        except BaseException:
            await self.index.remove(owner, persona.id)
            raise
        return persona

    async def _stored(self, persona_id: str) -> bool:
        return await self.storage.exists(self._key(persona_id))

    async def replace(self, owner: str, persona_id: str, fields: PersonaFields) -> Persona:
        current = await self.get(owner, persona_id)
        if current.builtin:
            raise Conflict(f"built-in persona {excerpt(persona_id)} cannot be modified")
        persona = Persona(id=persona_id, owner=owner, **fields.model_dump())
        await self._save(persona)
        return persona

    async def delete(self, owner: str, persona_id: str) -> None:
        current = await self.get(owner, persona_id)
        if current.builtin:
            raise Conflict(f"built-in persona {excerpt(persona_id)} cannot be deleted")
        await self.storage.delete(self._key(persona_id))
        await self.index.remove(owner, persona_id)

    async def reconcile_index(self) -> Reconciled:
        """At start-up: index entries for stored personas that lack one, none left for personas gone."""
        stored = [
            key.removeprefix("personas/").removesuffix(".json")
            for key in await self.storage.list("personas/")
        ]
        present = [persona_id for persona_id in stored if valid_id(persona_id)]

        async def describe(persona_id: str) -> tuple[str, str] | None:
            try:
                return _load(await self.storage.get(self._key(persona_id))).owner, persona_id
            except (NotFound, ValueError):
                return None

        return await self.index.reconcile(present, describe)

    async def voice_of(self, owner: str, persona_id: str | None) -> str | None:
        """The persona's default voice; None when it names none, or is not the owner's (a session that
        asks for it is refused when its persona is resolved, `resolve`)."""
        try:
            return (await self.get(owner, persona_id or "default")).voice
        except NotFound:
            return None
        except (ValueError, OSError):  # a file that does not parse, or a volume that cannot be read: the
            # start refuses the session, saying so; the socket opens meanwhile, as before personas had voices
            log.error("a stored persona cannot be read", extra={"persona_id": excerpt(persona_id or "")})
            return None

    async def resolve(self, owner: str, persona_id: str | None, overrides: dict[str, Any]) -> PersonaSpec:
        """The spec a session runs with: persona by id (default when none) with per-session overrides."""
        try:
            base = await self.get(owner, persona_id or "default")
        except NotFound:
            raise InvalidRequest(f"unknown persona {excerpt(persona_id)}") from None
        data = base.spec().model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None and k != "sampling"})
        data["sampling"].update(overrides.get("sampling") or {})  # field by field over the persona's own
        try:
            return PersonaSpec.model_validate(data)
        except ValueError as exc:
            raise InvalidRequest(f"invalid persona override: {exc}") from None

    async def _save(self, persona: Persona) -> None:
        await self.storage.put(self._key(persona.id), _dump(persona))


STORED_FORMAT = 2  # module docstring
_UNSET_VOICE_BEFORE_FORMAT_2 = "moshika"


def _dump(persona: Persona) -> bytes:
    data = persona.model_dump(mode="json")
    data["owner"] = persona.owner  # excluded from API output, kept on disk
    data["format"] = STORED_FORMAT
    return json.dumps(data).encode()


def _load(raw: bytes) -> Persona:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a stored persona is a JSON object")
    if "format" not in data and data.get("voice") == _UNSET_VOICE_BEFORE_FORMAT_2:
        data["voice"] = None
    data.pop("format", None)
    return Persona.model_validate(data)
