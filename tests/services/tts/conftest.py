from __future__ import annotations

from tests.services.tts.support import tts_checkpoint, tts_engine

__all__ = ["tts_checkpoint", "tts_engine"]
