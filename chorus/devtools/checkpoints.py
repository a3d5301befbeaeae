"""`chorus dev make-checkpoints DIR`: random-weight checkpoints in Kyutai's published layouts.

DIR/moshi holds what `kyutai/moshiko-pytorch-bf16` holds (config.json, LM safetensors, Mimi weights and
config, SentencePiece tokenizer); DIR/tts what Pocket TTS's published config needs (config.yaml,
safetensors, tokenizer). The services load them through exactly the code that loads the real ones
(CHORUS_MOSHI_DIR=DIR/moshi, CHORUS_TTS_DIR=DIR/tts). Small by default; --full-size for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

PARTS = ("moshi", "tts")


def make_checkpoints(
    root: Path, *, full_size: bool = False, parts: tuple[str, ...] = PARTS
) -> dict[str, Path]:
    """Write the requested checkpoints under `root`; an already complete one is reused."""
    written: dict[str, Path] = {}
    if "moshi" in parts:
        from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint

        written["moshi"] = write_moshi_checkpoint(root / "moshi", full_size=full_size)
    if "tts" in parts:
        from chorus.devtools.tts_checkpoint import write_tts_checkpoint

        written["tts"] = write_tts_checkpoint(root / "tts", full_size=full_size)
    return written
