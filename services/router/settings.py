from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field

from shared.settings import CommonSettings


class RouterSettings(CommonSettings):
    router_http_port: int = Field(
        default=8003,
        ge=0,
        le=65535,
        description="Port of this worker's /healthz, /readyz, /metrics (0 = off).",
    )
    router_http_host: str = Field(
        default="127.0.0.1",
        description="Interface of this worker's /healthz, /readyz, /metrics: loopback unless set (Kubernetes "
        "sets the pod IP, so probes and Prometheus reach it; 0.0.0.0 exposes it on every interface).",
    )
    router_budget_frames: int = Field(
        default=19,
        ge=1,
        description=(
            "Auto voice mode: the TTS is behind when a text piece has waited this many 80 ms frames "
            "without cloned audio covering it (19 = 1.5 s); the router then plays Moshi's own voice."
        ),
    )
    router_cloned_queue_frames: int = Field(
        default=375,
        ge=10,
        description="Cloned frames queued per session at most (375 = 30 s); overflow drops the oldest.",
    )
    router_tts_check_frames: int = Field(
        default=3,
        ge=1,
        description="How often (in 80 ms frames) the router checks that a TTS worker is alive.",
    )
    router_read_block_ms: int = Field(
        default=120,
        ge=1,
        le=1000,
        description="Longest wait of the router's pacing XREAD for a dialogue tick or cloned audio: longer "
        "than a tick (80 ms), so a live dialogue always wakes it first; user speech is still detected this "
        "often while no dialogue ticks.",
    )
    router_read_count: int = Field(
        default=50, ge=1, description="Entries read per stream per XREAD (bounds one batch)."
    )
    router_vad_threshold: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="Speech probability above which a user frame counts as speech (barge-in detection).",
    )
    router_vad_start_frames: int = Field(
        default=2, ge=1, description="Consecutive speech frames that start user speech (2 = 160 ms)."
    )
    router_vad_stop_frames: int = Field(
        default=6, ge=1, description="Consecutive non-speech frames that end user speech (6 = 480 ms)."
    )
    router_vad: Literal["silero", "energy"] = Field(
        default="silero",
        description="User speech detector: `silero` (silero-vad on onnxruntime; the router does not start "
        "without it) or `energy`, a loudness gate for synthetic audio only.",
    )
    router_vad_gate_dbfs: float = Field(
        default=-55.0,
        le=0.0,
        description="`silero` only: user frames quieter than this (dBFS) are not speech, and the model is "
        "not run on them (room noise between turns costs no inference).",
    )
    vad_model_path: Path | None = Field(
        default=None, description="Silero VAD ONNX file; unset = the one inside the silero-vad package."
    )
    router_energy_floor_dbfs: float = Field(
        default=-45.0,
        le=0.0,
        description="`energy` detector only: frame level (dBFS) that maps to speech probability 0.",
    )
    router_energy_ceiling_dbfs: float = Field(
        default=-25.0,
        le=0.0,
        description="`energy` detector only: frame level (dBFS) that maps to speech probability 1.",
    )


@lru_cache
def get_settings() -> RouterSettings:
    return RouterSettings()
