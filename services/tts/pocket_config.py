"""Which Pocket TTS model a worker loads: a published config by name, a local config file, or a local
checkpoint directory; and the model version its voice states are keyed by.

- `CHORUS_TTS_DIR`: a checkpoint directory (`config.yaml`, weights, tokenizer, `embeddings/`), as
  `chorus dev make-checkpoints` writes one. It wins over `CHORUS_TTS_CONFIG`.
- `CHORUS_TTS_CONFIG`: a published config name (`english`, `english_2026-10`, `english_18m_2026-10`,
  `english_7m_2026-10`, `english_2m_2026-10`, ...: the YAML files Pocket TTS ships) whose weights come
  from the hub, or the path of a local YAML file (its relative paths are relative to the file).

A voice state is only valid for the weights that computed it, so the version names the config and hashes
the Pocket TTS version, the config and local weights: a state computed for one model is never used
with another (`voices/{id}/states/{version}.safetensors`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ModelLoadError

CONFIG_FILE = "config.yaml"
DEFAULT_CONFIG = "english"
# A checkpoint's catalog voices, as the published repo holds them next to each model's weights
# (`languages/{config}/embeddings/{name}.safetensors`), and what Chorus records about them.
CATALOG_DIR = "embeddings"
CATALOG_INFO = "catalog.json"
_REMOTE = ("hf://", "http://", "https://")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def published_configs() -> list[str]:
    """The config names this Pocket TTS release ships."""
    from pocket_tts.utils.config import CONFIGS_DIR

    return sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))


def _path_fields(config: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(container, key) of every file reference a Pocket TTS config may hold."""
    flow_lm = config.get("flow_lm", {})
    return [
        (config, "weights_path"),
        (config, "weights_path_without_voice_cloning"),
        (flow_lm, "weights_path"),
        (flow_lm.get("lookup_table", {}), "tokenizer_path"),
        (config.get("mimi", {}), "weights_path"),
    ]


def _read_local(path: Path) -> dict[str, Any]:
    """A local config with its relative file references made absolute (relative to its directory)."""
    config: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    for container, key in _path_fields(config):
        value = container.get(key)
        if isinstance(value, str) and not value.startswith(_REMOTE) and not Path(value).is_absolute():
            container[key] = str((path.parent / value).resolve())
    return config


@dataclass(frozen=True)
class PocketConfig:
    """A resolved model choice. `local_dir` is None for a published config (weights from the hub)."""

    name: str
    path: Path
    config: dict[str, Any]
    local_dir: Path | None

    @property
    def published(self) -> bool:
        return self.local_dir is None

    @property
    def language(self) -> str:
        """The language the model speaks: a published config's is its name's first word (`english_2m_...`),
        a local checkpoint's what `make-checkpoints` recorded with its catalog."""
        if self.local_dir is None:
            return self.name.split("_", 1)[0]
        info = self.local_dir / CATALOG_DIR / CATALOG_INFO
        if info.is_file():
            recorded = json.loads(info.read_text(encoding="utf-8")).get("language")
            if isinstance(recorded, str):
                return recorded
        return "unknown"

    def version(self) -> str:
        """`{name}-{hash}`: the Pocket TTS version, the config and local weights, hashed."""
        digest = hashlib.sha256(f"pocket-tts {version('pocket-tts')}\n".encode())
        digest.update(self.path.read_bytes())  # a published one pins the hub revision of its weights
        weights = self.config.get("weights_path")
        if self.local_dir is not None and isinstance(weights, str) and Path(weights).is_file():
            with open(weights, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        return f"{_UNSAFE.sub('_', self.name)[:40]}-{digest.hexdigest()[:16]}"


def resolve(tts_dir: Path | None, tts_config: str) -> PocketConfig:
    """The model a worker with these settings loads; ModelLoadError saying what is valid otherwise."""
    if tts_dir is not None:
        path = tts_dir / CONFIG_FILE
        if not path.is_file():
            raise ModelLoadError(f"CHORUS_TTS_DIR={tts_dir} has no {CONFIG_FILE}")
        return PocketConfig(tts_dir.name or "local", path, _read_local(path), tts_dir)
    if tts_config.endswith((".yaml", ".yml")) or "/" in tts_config:
        path = Path(tts_config)
        if not path.is_file():
            raise ModelLoadError(f"CHORUS_TTS_CONFIG={tts_config}: no such file")
        return PocketConfig(path.stem, path, _read_local(path), path.parent)
    from pocket_tts.utils.config import CONFIGS_DIR

    path = CONFIGS_DIR / f"{tts_config}.yaml"
    if not path.is_file():
        raise ModelLoadError(
            f"CHORUS_TTS_CONFIG={tts_config!r} is not a published Pocket TTS config: use one of "
            f"{', '.join(published_configs())}, or the path of a local YAML file"
        )
    return PocketConfig(tts_config, path, yaml.safe_load(path.read_text(encoding="utf-8")), None)
