"""Pocket TTS's catalog: ready voice states (`alba`, `marius`, `javert`, ...) that need no clip and no
voice-cloning weights.

The published states live in the non-gated repo, one per model and voice
(`hf://kyutai/pocket-tts-without-voice-cloning/languages/{config}/embeddings/{name}.safetensors`, what
`get_predefined_voice` names); a local checkpoint holds its own in the same layout (`embeddings/` next
to its weights; `chorus dev make-checkpoints` generates them). A state is loaded through
`get_state_for_audio_prompt`, like Pocket TTS loads its own, once per worker (`VoiceStates` caches it).

A worker publishes its catalog in its presence hash (`catalog` field: `CatalogListing` as JSON), so
the gateway lists the voices and refuses unknown names without a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.tts.pocket_config import CATALOG_DIR, PocketConfig
from shared.messages import CATALOG_NAME_PATTERN
from shared.voice_offer import CatalogListing

_NAME = re.compile(CATALOG_NAME_PATTERN)


@dataclass(frozen=True)
class CatalogVoice:
    name: str
    source: str  # an hf:// URL or a local .safetensors file


def _published_names() -> list[str]:
    from pocket_tts.utils.utils import _ORIGINS_OF_PREDEFINED_VOICES

    return sorted(_ORIGINS_OF_PREDEFINED_VOICES)


class Catalog:
    """The catalog voices of one model."""

    def __init__(self, config: PocketConfig) -> None:
        self.config = config
        self.voices = self._voices(config)

    @staticmethod
    def _voices(config: PocketConfig) -> dict[str, CatalogVoice]:
        if config.local_dir is None:
            from pocket_tts.utils.utils import get_predefined_voice

            return {
                name: CatalogVoice(name, get_predefined_voice(language=config.name, name=name))
                for name in _published_names()
            }
        folder = config.local_dir / CATALOG_DIR
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        return {f.stem: CatalogVoice(f.stem, str(f)) for f in files if _NAME.fullmatch(f.stem)}

    def __contains__(self, name: str) -> bool:
        return name in self.voices

    def source(self, name: str) -> str | Path:
        """What `get_state_for_audio_prompt` loads the voice from (a local file as a Path)."""
        voice = self.voices[name]
        return voice.source if self.config.published else Path(voice.source)

    def listing(self) -> CatalogListing:
        return CatalogListing(
            language=self.config.language,
            source="hub" if self.config.published else "local",
            voices=sorted(self.voices),
        )
