"""Voice profiles: an uploaded reference clip, its metadata and its cached voice states, in durable storage.

Layout under the storage root (`CHORUS_DATA_DIR`):

    voices/{id}/pending.json                     while an upload is being written (start time)
    voices/{id}/clip.wav                         the normalised clip: PCM16, mono, 24 kHz
    voices/{id}/profile.json                     the metadata; written last, so its presence = complete
    voices/{id}/states/{model_version}.safetensors  Pocket TTS voice states, one per model version

A profile exists exactly when its `profile.json` does: a crash mid-upload leaves at most a clip and a
pending marker, which nobody lists and `sweep_incomplete` removes. Delete removes `profile.json` first
(the profile disappears at once), then everything under its prefix. Every write goes through `Storage`,
whose writes are atomic; an S3-compatible backend only has to implement that interface.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from shared.audio import SAMPLE_RATE, FloatAudio, float_to_pcm16, pcm16_to_float, pcm16_to_wav, wav_to_pcm16
from shared.errors import NotFound
from shared.messages import PROFILE_ID_PATTERN, valid_id
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

    id: str = Field(pattern=rf"^{PROFILE_ID_PATTERN}$")
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
        return f"profile:{self.id}"


def _key(profile_id: str, *parts: str) -> str:
    # Ids come from URLs: only ids of our own form may become storage keys ('..' would climb out).
    if not valid_id(profile_id):
        raise NotFound(f"no voice profile {profile_id!r}")
    return PREFIX + "/".join((profile_id, *parts))


class VoiceProfileStore:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def create(self, profile: VoiceProfile, clip: FloatAudio) -> VoiceProfile:
        """Write the clip, then the metadata; only the metadata makes the profile visible.

        A write that fails (a full disk: ENOSPC) removes what this upload wrote before it re-raises, so
        no half profile waits for the start-up sweep.
        """
        try:
            await self.storage.put(
                _key(profile.id, PENDING_FILE), json.dumps({"started_at": time.time()}).encode()
            )
            await self.storage.put(_key(profile.id, CLIP_FILE), pcm16_to_wav(float_to_pcm16(clip)))
            await self.storage.put(_key(profile.id, PROFILE_FILE), profile.model_dump_json().encode())
        except BaseException:
            await self.storage.delete_prefix(_key(profile.id))
            log.warning("removed a voice profile whose upload failed", extra={"profile_id": profile.id})
            raise
        await self.storage.delete(_key(profile.id, PENDING_FILE))
        return profile

    async def get(self, profile_id: str) -> VoiceProfile:
        """Raises NotFound for an unknown or incomplete profile."""
        try:
            raw = await self.storage.get(_key(profile_id, PROFILE_FILE))
        except NotFound:
            raise NotFound(f"no voice profile {profile_id!r}") from None
        return VoiceProfile.model_validate_json(raw)

    async def get_owned(self, profile_id: str, owner: str) -> VoiceProfile:
        """Another owner's profile is indistinguishable from a missing one."""
        profile = await self.get(profile_id)
        if profile.owner != owner:
            raise NotFound(f"no voice profile {profile_id!r}")
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
        """Complete profiles (of `owner`, or all), oldest first."""
        complete, _ = await self._ids()
        profiles = []
        for profile_id in complete:
            try:
                profile = await self.get(profile_id)
            except NotFound:  # deleted meanwhile
                continue
            if owner is None or profile.owner == owner:
                profiles.append(profile)
        return sorted(profiles, key=lambda p: (p.created, p.id))

    async def clip(self, profile_id: str) -> FloatAudio:
        try:
            data = await self.storage.get(_key(profile_id, CLIP_FILE))
        except NotFound:
            raise NotFound(f"voice profile {profile_id!r} has no clip") from None
        pcm, _ = wav_to_pcm16(data)
        return pcm16_to_float(pcm)

    async def delete(self, profile_id: str) -> None:
        """The metadata first (the profile is gone for every reader), then the clip and every state."""
        await self.storage.delete(_key(profile_id, PROFILE_FILE))
        await self.storage.delete_prefix(_key(profile_id))

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
            if await self._upload_in_progress(profile_id, grace_s):
                continue
            await self.storage.delete_prefix(_key(profile_id))
            removed.append(profile_id)
        if removed:
            log.warning("removed incomplete voice profiles", extra={"profile_ids": removed})
        return removed

    async def _upload_in_progress(self, profile_id: str, grace_s: float) -> bool:
        try:
            started = float(json.loads(await self.storage.get(_key(profile_id, PENDING_FILE)))["started_at"])
        except (NotFound, ValueError, KeyError, TypeError):
            return False
        return time.time() - started < grace_s
