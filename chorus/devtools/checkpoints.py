"""`chorus dev make-checkpoints DIR`: random-weight checkpoints in Kyutai's published layouts.

DIR/moshi holds what `kyutai/moshiko-pytorch-bf16` holds (config.json, LM safetensors, Mimi weights and
config, SentencePiece tokenizer); DIR/tts what Pocket TTS's published config needs (config.yaml,
safetensors, tokenizer) and its catalog voices' states (embeddings/, the published layout);
`--tts-config NAME` writes DIR/tts-NAME from another shipped config. The services load them through
exactly the code that loads the real ones (CHORUS_MOSHI_DIR=DIR/moshi, CHORUS_TTS_DIR=DIR/tts). Small by
default; --full-size for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

PARTS = ("moshi", "tts")


def make_checkpoints(
    root: Path, *, full_size: bool = False, parts: tuple[str, ...] = PARTS, tts_config: str | None = None
) -> dict[str, Path]:
    """Write the requested checkpoints under `root`; an already complete one is reused. `tts_config`: the
    TTS checkpoint copies that shipped Pocket TTS config instead, in `root/tts-{tts_config}`."""
    written: dict[str, Path] = {}
    if "moshi" in parts:
        from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint

        written["moshi"] = write_moshi_checkpoint(root / "moshi", full_size=full_size)
    if "tts" in parts:
        from chorus.devtools.tts_checkpoint import write_tts_checkpoint

        folder = root / ("tts" if tts_config is None else f"tts-{tts_config}")
        written["tts"] = write_tts_checkpoint(folder, full_size=full_size, config_name=tts_config)
    return written
