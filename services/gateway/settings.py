from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field

from shared.settings import CommonSettings


class GatewaySettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Interface the gateway binds (0.0.0.0 in containers).")
    port: int = Field(default=8000, ge=1, le=65535, description="Gateway HTTP/WebSocket port.")
    api_keys: str = Field(default="", description="Comma-separated API keys; empty with no file = auth off.")
    api_keys_file: Path | None = Field(default=None, description="File with one API key per line (a Secret).")
    session_ready_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a placed conversation waits for its priming to finish before failing.",
    )
    placement_wait_s: float = Field(
        default=10.0,
        ge=0,
        description="How long a new conversation waits for a free dialogue slot before `no_capacity`.",
    )
    placement_queue_max: int = Field(
        default=100,
        ge=1,
        description="Conversations of this gateway waiting for a slot at once; more are refused at once.",
    )
    session_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A session whose gateway stops renewing its lease (it died) is ended by its workers "
        "this long after the last renewal.",
    )
    session_lease_renew_s: float = Field(
        default=5.0, gt=0, description="How often the gateway renews the leases of its live sessions."
    )
    redis_max_memory_share: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="New sessions are refused while Redis uses more than this share of its maxmemory "
        "(no limit set: not checked).",
    )
    ws_send_queue_frames: int = Field(
        default=64, ge=4, description="Per-socket send queue bound; a slow reader loses the oldest audio."
    )
    ws_send_queue_messages: int = Field(
        default=256,
        ge=4,
        description="Per-socket bound on queued text, events and errors (never dropped): past it, or past "
        "`ws_send_queue_bytes`, the client is not reading and the socket closes (1008).",
    )
    ws_send_queue_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        description="Per-socket bound on the bytes of queued text, events and errors (see above).",
    )
    realtime_response_end_frames: int = Field(
        default=10,
        ge=1,
        description="Realtime API: a response closes after this many 80 ms frames without text.",
    )
    max_sessions_per_key: int = Field(
        default=4, ge=0, description="Concurrent live sessions per API key (0 = unlimited)."
    )
    transcript_retention_s: int = Field(
        default=7 * 24 * 3600, ge=60, description="How long transcript exports of ended sessions are kept."
    )
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="Largest accepted REST request body (uploads included).",
    )
    requests_per_minute: int = Field(
        default=600, ge=0, description="REST requests per minute per API key (0 = unlimited)."
    )
    ws_max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest accepted WebSocket message; larger ones are dropped.",
    )
    ws_messages_per_second: float = Field(
        default=100.0,
        gt=0,
        description="Sustained WebSocket messages per second per socket (burst: 2 s worth); past it "
        "messages are dropped, with at most one `rate_limited` error a second.",
    )
    ws_audio_pace: float = Field(
        default=1.5,
        gt=0,
        description="Input audio a socket may send, in seconds of audio per second (1.0 = real time); "
        "a faster client waits (its socket is read no faster).",
    )
    ws_audio_burst_s: float = Field(
        default=2.0,
        ge=0.08,
        description="Seconds of input audio a socket may send at once above its pace; one message "
        "carrying more is refused.",
    )

    voice_max_upload_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="Largest voice clip upload in bytes; bigger bodies are refused (413) while streaming.",
    )
    voice_min_s: float = Field(default=3.0, gt=0, description="Shortest accepted voice clip, in seconds.")
    voice_max_s: float = Field(default=30.0, gt=0, description="Longest accepted voice clip, in seconds.")
    voice_min_speech_s: float = Field(
        default=1.5,
        ge=0,
        description="Least speech (as the VAD hears it) a voice clip must contain, in seconds.",
    )
    voice_silence_dbfs: float = Field(
        default=-50.0, description="A voice clip quieter than this (RMS, dBFS) is refused as silent."
    )
    voice_max_clipped_ratio: float = Field(
        default=0.001,
        ge=0,
        le=1,
        description="Largest share of samples at full scale before a voice clip is refused as clipped.",
    )
    voice_target_dbfs: float = Field(
        default=-20.0, le=0, description="Stored clips are normalised to this RMS loudness of their speech."
    )
    vad_threshold: float = Field(
        default=0.5, gt=0, lt=1, description="Silero VAD probability above which a 32 ms window is speech."
    )
    vad_model_path: Path | None = Field(
        default=None, description="Silero VAD ONNX file; unset = the one inside the silero-vad package."
    )
    voice_preview_timeout_s: float = Field(
        default=30.0, gt=0, description="How long a voice preview waits for a TTS worker's answer."
    )
    voice_sweep_grace_s: float = Field(
        default=600.0,
        ge=0,
        description="At start-up, incomplete voice uploads older than this are removed.",
    )


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()
