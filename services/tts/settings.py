from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field

from services.tts.pocket_config import DEFAULT_CONFIG
from shared.settings import CommonSettings


class TtsSettings(CommonSettings):
    tts_http_port: int = Field(
        default=8002,
        ge=0,
        le=65535,
        description="Port of this worker's /healthz, /readyz, /metrics (0 = off).",
    )
    tts_http_host: str = Field(
        default="127.0.0.1",
        description="Interface of this worker's /healthz, /readyz, /metrics: loopback unless set (Kubernetes "
        "sets the pod IP, so probes and Prometheus reach it; 0.0.0.0 exposes it on every interface).",
    )
    tts_dir: Path | None = Field(
        default=None,
        description="Local Pocket TTS checkpoint (config.yaml, weights, tokenizer, embeddings/ with its "
        "catalog voices), as `chorus dev make-checkpoints` writes one; wins over tts_config. Unset = "
        "tts_config.",
    )
    tts_config: str = Field(
        default=DEFAULT_CONFIG,
        min_length=1,
        description="The Pocket TTS model: a published config name (english, english_2026-10, "
        "english_18m_2026-10, english_7m_2026-10, english_2m_2026-10, ...; weights from the hub) or the "
        "path of a local YAML config. Voice states are keyed by it (docs/voices.md).",
    )
    tts_device: str = Field(default="cpu", description="Torch device of the Pocket TTS models.")
    tts_instances: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Model instances in this worker, each on its own thread and CPU core (Pocket TTS uses "
        "one torch thread per process). Batched, an instance speaks many phrases at once; unbatched, one.",
    )
    tts_batch: bool = Field(
        default=True,
        description="Batch the phrases an instance speaks at once into one forward pass per 80 ms step "
        "(flow LM and Mimi decoder), rows joining and leaving between steps: english_2m kept 8 continuous "
        "sessions per core in real time against 4 unbatched, for 0.11 against 0.14 CPU s per second of "
        "audio (docs/performance.md). false = one phrase at a time per instance through Pocket TTS's own "
        "generate_audio_stream.",
    )
    tts_batch_rows: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Batched: phrases one instance speaks at once; more wait for a row. Bounds a step's "
        "time and memory (english_2m keeps 8 continuous sessions per core in real time: performance.md).",
    )
    tts_max_sessions: int = Field(
        default=8,
        ge=1,
        description="Sessions this worker speaks for at once (a profile's or a catalog voice). Native "
        "sessions it owns (an owner for a later switch) take no slot; it owns at most 8 per slot in all.",
    )
    tts_temperature: float | None = Field(
        default=None,
        ge=0,
        description="Pocket TTS sampling temperature; unset = the model config's; 0 = no sampling noise "
        "(the same text and voice always give the same audio).",
    )
    tts_eos_threshold: float | None = Field(
        default=None,
        description="Pocket TTS end-of-speech threshold; unset = the model config's. Raise it for "
        "random-weight test models, which otherwise stop at random.",
    )
    tts_phrase_max_words: int = Field(
        default=4,
        ge=1,
        description="A phrase is spoken once it has this many words. Its first word waits for its last "
        "(Moshi says ~2.5 words/s): 4 keeps cloned audio within the router's default 1.5 s auto budget; "
        "raise both for more natural phrasing.",
    )
    tts_phrase_first_max_words: int = Field(
        default=2,
        ge=1,
        description="Word budget of the first phrase after a pause, so a turn's audio starts early (the "
        "next phrases are synthesised while it plays).",
    )
    tts_phrase_min_words_at_comma: int = Field(
        default=3, ge=1, description="A comma, semicolon or colon ends a phrase once it has this many words."
    )
    tts_pause_frames: int = Field(
        default=8,
        ge=1,
        description="80 ms frames without text from Moshi after which the pending words are spoken (Moshi "
        "leaves 3-6 frames between words while it talks).",
    )
    tts_backlog_phrases: int = Field(
        default=8,
        ge=1,
        description="Phrases queued per session; past it the oldest is dropped (the router falls back).",
    )
    tts_max_seconds_per_word: float = Field(
        default=0.8,
        gt=0,
        description="Bound on synthesised audio per word of a phrase (plus tts_phrase_extra_s).",
    )
    tts_phrase_extra_s: float = Field(
        default=1.0, ge=0, description="Audio allowed per phrase beyond the per-word bound."
    )
    tts_voice_cache_size: int = Field(
        default=32, ge=1, description="Voice states kept in memory (least recently used are dropped)."
    )
    tts_voice_prompt_max_s: float = Field(
        default=15.0,
        gt=0,
        description="Longest part of a reference clip used as the voice prompt (longer prompts make "
        "every generated frame slower).",
    )


@lru_cache
def get_settings() -> TtsSettings:
    return TtsSettings()
