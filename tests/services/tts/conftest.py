from __future__ import annotations

from tests.support.tts import tts_checkpoint, tts_engine

__all__ = ["tts_checkpoint", "tts_engine"]
