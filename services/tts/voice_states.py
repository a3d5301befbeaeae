"""Voice states: a profile's reference clip encoded by Pocket TTS, computed once and cached twice; a
catalog voice's published state, loaded once (`catalog.py`).

`get_state_for_audio_prompt` costs about a second per clip. Its result is cached
- on disk, next to the profile (`voices/{id}/states/{model version}.safetensors`), so every worker and
  every restart reuses it; a new model version computes its own;
- in memory, bounded (least recently used out), so a session's phrases never wait for storage.
Concurrent requests for one profile wait for a single computation. Catalog states share the memory
cache (under their voice name, `catalog:<name>`, which no profile id can be).
"""

from __future__ import annotations

import asyncio
import logging
import wave
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import safetensors.torch

from services.tts.engine import Engine, ModelState
from shared import metrics
from shared.audio import SAMPLE_RATE
from shared.errors import NotFound
from shared.messages import catalog_name_of, catalog_voice, profile_id_of
from shared.voice_profiles import VoiceProfileStore

log = logging.getLogger(__name__)


def state_to_bytes(state: ModelState) -> bytes:
    """Flattened as '{module}/{tensor}', the naming Pocket TTS's own exported voice files use."""
    flat = {
        f"{module}/{name}": t.detach().cpu().contiguous().clone()
        for module, d in state.items()
        for name, t in d.items()
    }
    return bytes(safetensors.torch.save(flat))


def state_from_bytes(data: bytes) -> ModelState:
    state: ModelState = {}
    for key, tensor in safetensors.torch.load(data).items():
        module, name = key.rsplit("/", 1)
        state.setdefault(module, {})[name] = tensor
    return state


class VoiceStates:
    def __init__(
        self, engine: Engine, store: VoiceProfileStore, *, capacity: int, prompt_max_s: float
    ) -> None:
        self.engine = engine
        self.store = store
        self.capacity = capacity
        self.prompt_max_samples = int(prompt_max_s * SAMPLE_RATE)
        self._memory: OrderedDict[str, ModelState] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self.computed = 0  # states this worker computed from clips (the expensive path)

    def __contains__(self, profile_id: str) -> bool:
        return profile_id in self._memory

    async def for_voice(self, voice: str) -> ModelState:
        """The state of a voice the TTS speaks: `profile:<id>` or `catalog:<name>`."""
        if (name := catalog_name_of(voice)) is not None:
            return await self.catalog(name)
        if (profile_id := profile_id_of(voice)) is not None:
            return await self.get(profile_id)
        raise NotFound(f"{voice!r} is not a voice the TTS speaks")

    async def catalog(self, name: str) -> ModelState:
        """A catalog voice's state; NotFound (with the valid names) for a name the model has none of."""
        if name not in self.engine.catalog:
            raise NotFound(
                f"no catalog voice {name!r}: use one of {', '.join(sorted(self.engine.catalog.voices))}"
            )
        return await self._cached(catalog_voice(name), lambda: self._load_catalog(name))

    async def _load_catalog(self, name: str) -> ModelState:
        state = await self.engine.catalog_state(name)
        metrics.TTS_VOICE_STATES.labels(source="catalog").inc()
        log.info("catalog voice loaded", extra={"voice": name, "model_version": self.engine.version})
        return state

    async def get(self, profile_id: str) -> ModelState:
        """The profile's voice state; raises NotFound when the profile does not exist (any more)."""
        return await self._cached(profile_id, lambda: self._load_or_compute(profile_id))

    async def _cached(self, key: str, load: Callable[[], Awaitable[ModelState]]) -> ModelState:
        """From memory, or loaded once however many ask at the same time."""
        if key in self._memory:
            self._memory.move_to_end(key)
            metrics.TTS_VOICE_STATES.labels(source="memory").inc()
            return self._memory[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if key not in self._memory:
                    self._remember(key, await load())
                return self._memory[key]
        finally:
            if not lock.locked():
                self._locks.pop(key, None)

    def forget(self, profile_id: str) -> bool:
        """Drop the in-memory state (the profile was deleted); the caller owns disk cleanup."""
        return self._memory.pop(profile_id, None) is not None

    def _remember(self, profile_id: str, state: ModelState) -> None:
        self._memory[profile_id] = state
        self._memory.move_to_end(profile_id)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    async def _load_or_compute(self, profile_id: str) -> ModelState:
        await self.store.get(profile_id)  # NotFound for a deleted or incomplete profile
        cached = await self.store.load_state(profile_id, self.engine.version)
        if cached is not None:
            try:
                state = state_from_bytes(cached)
            except Exception:  # damaged on the volume (safetensors' own errors): the clip makes it again
                log.exception(
                    "a cached voice state cannot be read: computing it again from the clip",
                    extra={"profile_id": profile_id, "model_version": self.engine.version},
                )
            else:
                metrics.TTS_VOICE_STATES.labels(source="disk").inc()
                return state
        try:
            clip = await self.store.clip(profile_id)
        except (ValueError, EOFError, wave.Error) as exc:
            log.error(
                "a voice profile's clip cannot be read", extra={"profile_id": profile_id, "error": str(exc)}
            )
            raise NotFound(
                f"voice profile {profile_id} cannot be used: its stored clip is damaged; upload it again"
            ) from exc
        state = await self.engine.voice_state(clip[: self.prompt_max_samples])
        self.computed += 1
        metrics.TTS_VOICE_STATES.labels(source="computed").inc()
        await self.store.save_state(profile_id, self.engine.version, state_to_bytes(state))
        try:
            await self.store.get(profile_id)
        except NotFound:
            # Deleted while we computed: leave no state behind for a profile that is gone.
            await self.store.delete(profile_id)
            raise
        log.info(
            "voice state computed", extra={"profile_id": profile_id, "model_version": self.engine.version}
        )
        return state
