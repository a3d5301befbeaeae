"""Voice profiles: an uploaded reference clip, its metadata and its cached voice states, in durable storage.

Layout under the storage root (`CHORUS_DATA_DIR`):

    voices/{id}/pending.json                     while an upload is being written (start time, owner)
    voices/{id}/clip.wav                         the normalised clip: PCM16, mono, 24 kHz
    voices/{id}/profile.json                     the metadata; written last, so its presence = complete
    voices/{id}/states/{model_version}.safetensors  Pocket TTS voice states, one per model version

A profile exists exactly when its `profile.json` does: a crash mid-upload leaves at most a clip and a
pending marker, which nobody lists and `sweep_incomplete` removes. Delete removes `profile.json` first
(the profile disappears at once), then everything under its prefix. Every write goes through `Storage`,
whose writes are atomic; an S3-compatible backend only has to implement that interface.

Each owner's profiles are also indexed (`shared.owner_index`: `owners/{owner}/voices/{id}`, written
before the upload and removed after the delete), so an owner's listing and quota read only that
owner's entries and profiles.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.audio import SAMPLE_RATE, FloatAudio, float_to_pcm16, pcm16_to_float, pcm16_to_wav, wav_to_pcm16
from shared.errors import NotFound, excerpt
from shared.messages import ProfileId, cloned_voice, valid_id
from shared.owner_index import OwnerIndex, Reconciled
from shared.storage import Storage

log = logging.getLogger(__name__)

PREFIX = "voices/"
PROFILE_FILE = "profile.json"
CLIP_FILE = "clip.wav"
PENDING_FILE = "pending.json"


def new_profile_id() -> str:
    return "voice_" + uuid.uuid4().hex[:16]


class VoiceProfile(BaseModel):
    """A profile's metadata, as stored in profile.json."""

    model_config = ConfigDict(extra="ignore")

    id: ProfileId
    owner: str = Field(description="Hash of the API key that made it ('' = no auth).")
    name: str = Field(min_length=1, max_length=100)
    duration_s: float = Field(description="Length of the stored clip.")
    speech_s: float = Field(description="Seconds of it the VAD classified as speech.")
    sample_rate: int = SAMPLE_RATE
    consent: bool = Field(description="The uploader confirmed the speaker's consent.")
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def voice(self) -> str:
        """How a session names this voice."""
        return cloned_voice(self.id)


def _key(profile_id: str, *parts: str) -> str:
    # Ids come from URLs: only ids of our own form may become storage keys ('..' would climb out).
    if not valid_id(profile_id):
        raise NotFound(f"no voice profile {excerpt(profile_id)}")
    return PREFIX + "/".join((profile_id, *parts))


class VoiceProfileStore:
    """`max_per_owner`: profiles one owner may have (0 = no limit); past it `create` is refused."""

    def __init__(self, storage: Storage, *, max_per_owner: int = 0) -> None:
        self.storage = storage
        self.max_per_owner = max_per_owner
        self.index = OwnerIndex(storage, "voices")

    async def check_quota(self, owner: str) -> None:
        """QuotaExceeded when `owner` has `max_per_owner` profiles already: before an upload is read."""
        await self.index.check(owner, self.max_per_owner)

    async def create(self, profile: VoiceProfile, clip: FloatAudio) -> VoiceProfile:
        """Take a place in the owner's quota (QuotaExceeded), write the clip, then the metadata; only the
        metadata makes the profile visible.

        A write that fails (a full disk: ENOSPC) removes what this upload wrote before it re-raises, so
        no half profile waits for the start-up sweep.
        """
        await self.index.reserve(profile.owner, profile.id, self.max_per_owner, self._complete)
        try:
            pending = {"started_at": time.time(), "owner": profile.owner}
            await self.storage.put(_key(profile.id, PENDING_FILE), json.dumps(pending).encode())
            await self.storage.put(_key(profile.id, CLIP_FILE), pcm16_to_wav(float_to_pcm16(clip)))
            await self.storage.put(_key(profile.id, PROFILE_FILE), profile.model_dump_json().encode())
        except BaseException:
            await self.storage.delete_prefix(_key(profile.id))
            await self.index.remove(profile.owner, profile.id)
            log.warning("removed a voice profile whose upload failed", extra={"profile_id": profile.id})
            raise
        await self.storage.delete(_key(profile.id, PENDING_FILE))
        return profile

    async def _complete(self, profile_id: str) -> bool:
        return await self.storage.exists(_key(profile_id, PROFILE_FILE))

    async def get(self, profile_id: str) -> VoiceProfile:
        """Raises NotFound for an unknown or incomplete profile."""
        try:
            raw = await self.storage.get(_key(profile_id, PROFILE_FILE))
        except NotFound:
            raise NotFound(f"no voice profile {excerpt(profile_id)}") from None
        return VoiceProfile.model_validate_json(raw)

    async def get_owned(self, profile_id: str, owner: str) -> VoiceProfile:
        """Another owner's profile is indistinguishable from a missing one."""
        profile = await self.get(profile_id)
        if profile.owner != owner:
            raise NotFound(f"no voice profile {excerpt(profile_id)}")
        return profile

    async def _ids(self) -> tuple[set[str], set[str]]:
        """(complete ids, every id with anything stored)."""
        complete: set[str] = set()
        seen: set[str] = set()
        for key in await self.storage.list(PREFIX):
            parts = key.removeprefix(PREFIX).split("/")
            if not valid_id(parts[0]):
                continue  # not ours (lost+found, an operator's backup...): neither listed nor swept
            seen.add(parts[0])
            if parts[1:] == [PROFILE_FILE]:
                complete.add(parts[0])
        return complete, seen

    async def profiles(self, owner: str | None = None) -> list[VoiceProfile]:
        """Complete profiles of `owner` (read through its index: no other owner's file is opened), or
        of everyone (None: every profile is read), oldest first."""
        ids = await self.index.names(owner) if owner is not None else (await self._ids())[0]
        profiles = []
        for profile_id in ids:
            try:
                profile = await self.get(profile_id)
            except NotFound:  # not complete yet, or deleted meanwhile
                continue
            if owner is None or profile.owner == owner:
                profiles.append(profile)
        return sorted(profiles, key=lambda p: (p.created, p.id))

    async def clip(self, profile_id: str) -> FloatAudio:
        try:
            data = await self.storage.get(_key(profile_id, CLIP_FILE))
        except NotFound:
            raise NotFound(f"voice profile {excerpt(profile_id)} has no clip") from None
        pcm, _ = wav_to_pcm16(data)
        return pcm16_to_float(pcm)

    async def delete(self, profile_id: str) -> None:
        """The metadata first (the profile is gone for every reader), then the clip and every state, then
        its owner's index entry (also called for a profile already gone: what is left is removed)."""
        try:
            owner: str | None = (await self.get(profile_id)).owner
        except NotFound:
            owner = None
        await self.storage.delete(_key(profile_id, PROFILE_FILE))
        await self.storage.delete_prefix(_key(profile_id))
        if owner is not None:
            await self.index.remove(owner, profile_id)

    # --- cached voice states (the TTS service's) -----------------------------------------------------

    async def load_state(self, profile_id: str, model_version: str) -> bytes | None:
        try:
            return await self.storage.get(_key(profile_id, "states", f"{model_version}.safetensors"))
        except NotFound:
            return None

    async def save_state(self, profile_id: str, model_version: str, data: bytes) -> None:
        await self.storage.put(_key(profile_id, "states", f"{model_version}.safetensors"), data)

    async def states(self, profile_id: str) -> list[str]:
        """Model versions with a cached state for this profile."""
        keys = await self.storage.list(_key(profile_id, "states"))
        return [key.rsplit("/", 1)[-1].removesuffix(".safetensors") for key in keys]

    # --- housekeeping --------------------------------------------------------------------------------

    async def sweep_incomplete(self, grace_s: float = 600.0) -> list[str]:
        """Remove what a crash left behind: ids without metadata, unless an upload started < grace_s ago
        (another gateway may be writing it right now). Returns the ids removed."""
        complete, seen = await self._ids()
        removed = []
        for profile_id in sorted(seen - complete):
            pending = await self._pending(profile_id)
            if time.time() - float(pending.get("started_at", 0.0)) < grace_s:
                continue
            await self.storage.delete_prefix(_key(profile_id))
            if isinstance(owner := pending.get("owner"), str):
                await self.index.remove(owner, profile_id)
            removed.append(profile_id)
        if removed:
            log.warning("removed incomplete voice profiles", extra={"profile_ids": removed})
        return removed

    async def _pending(self, profile_id: str) -> dict[str, Any]:
        """The pending marker of an upload ({} when there is none, or it is unreadable)."""
        try:
            marker = json.loads(await self.storage.get(_key(profile_id, PENDING_FILE)))
            float(marker["started_at"])
        except (NotFound, ValueError, KeyError, TypeError):
            return {}
        return marker if isinstance(marker, dict) else {}

    async def reconcile_index(self) -> Reconciled:
        """At start-up: index entries for complete profiles that lack one, none left for profiles gone."""
        complete, _ = await self._ids()

        async def describe(profile_id: str) -> tuple[str, str] | None:
            try:
                return (await self.get(profile_id)).owner, profile_id
            except (NotFound, ValueError):
                return None

        return await self.index.reconcile(complete, describe)
