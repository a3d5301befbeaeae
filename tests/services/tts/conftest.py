"""The TTS tests share one loaded engine (and one without the voice-cloning weights)."""

from __future__ import annotations

from tests.support.tts import gated_checkpoint, gated_engine, tts_checkpoint, tts_engine

__all__ = ["gated_checkpoint", "gated_engine", "tts_checkpoint", "tts_engine"]
