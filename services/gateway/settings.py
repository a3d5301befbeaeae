from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from shared.settings import CommonSettings

MIN_IDLE_TIMEOUT_S = 1.0  # the shortest idle timeout, the gateway's or a realtime client's `idle_timeout_ms`


class GatewaySettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Interface the gateway binds (0.0.0.0 in containers).")
    port: int = Field(default=8000, ge=1, le=65535, description="Gateway HTTP/WebSocket port.")
    api_keys: str = Field(default="", description="Comma-separated API keys (`CHORUS_AUTH`: without any).")
    api_keys_file: Path | None = Field(
        default=None,
        description="File with one API key per line, `#` comments (a Secret). Re-read when it changes: "
        "a key removed from it is refused within `CHORUS_API_KEYS_RELOAD_S`. Empty: a start-up error.",
    )
    api_keys_reload_s: float = Field(
        default=1.0, gt=0, description="At most this often the keys file is checked for changes (mtime)."
    )
    auth: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="`auto`: on when keys are configured; with none, off only while the gateway is reachable "
        "on loopback alone (`CHORUS_HOST`, or `CHORUS_PUBLISHED_ADDRESS`), else it refuses to start. `on`: "
        "keys required. `off`: no authentication even on a network address (logged loudly).",
    )
    published_address: str | None = Field(
        default=None,
        description="Address clients reach this gateway on when it is not `CHORUS_HOST` (a container binds "
        "0.0.0.0 and is published on the host: docker-compose passes its PUBLISH_ADDRESS). Decides, in "
        "place of `CHORUS_HOST`, whether auth may be off, and is an allowed Host.",
    )
    allowed_hosts: str = Field(
        default="",
        description="Comma-separated Host names answered besides localhost, 127.0.0.1, ::1 and the bind and "
        "published addresses (the names clients and proxies use); `*` = any. Others get 421.",
    )
    allowed_origins: str = Field(
        default="",
        description="Comma-separated browser origins (`https://app.example.com`) allowed besides the same "
        "origin and localhost ones, for WebSockets and POST/PUT/PATCH/DELETE; `*` = any. Others get 403.",
    )
    client_secret_ttl_s: int = Field(
        default=60,
        ge=1,
        le=7200,
        description="Longest life of a realtime client secret (`POST /v1/realtime/client_secrets`); "
        "a shorter `expires_after.seconds` is honoured.",
    )
    auth_failures_per_minute: int = Field(
        default=20,
        ge=1,
        description="Requests and WebSocket connections with a missing or unknown key per client IP (an IPv6 "
        "client's /64) per minute; past it they are answered 429 instead of 401.",
    )
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
        "this long after the last renewal. Under CHORUS_SESSION_TTL_S (a start-up error otherwise): the "
        "workers need the session's hash to end it.",
    )
    session_lease_renew_s: float = Field(
        default=5.0, gt=0, description="How often the gateway renews the leases of its live sessions."
    )
    max_session_s: float = Field(
        default=3600.0,
        ge=0,
        allow_inf_nan=False,  # 0 is 'off'; infinity would overflow the ms the realtime API speaks
        description="Longest a session lasts, from the moment it is ready (the wait for a slot and the "
        "priming not counted); then the gateway ends it (`session_expired`: a realtime `error`, a moshi "
        "0x05, close 1000). 0 = no limit.",
    )
    idle_timeout_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,  # 0 is 'off'; infinity would overflow the ms the realtime API speaks
        description="A session whose user says nothing for this long (the router's speech detector, counted "
        "in 80 ms output frames) is ended (`idle_timeout`); realtime clients may ask for a shorter one "
        "(`idle_timeout_ms`). 0 = off; else at least 1 s.",
    )

    @model_validator(mode="after")
    def _idle_timeout_of_a_second_at_least(self) -> GatewaySettings:
        """A realtime client is told the gateway's idle timeout (`idle_timeout_ms`) and may ask for no less
        than a second: under that, echoing the session it was given back would be refused."""
        if 0 < self.idle_timeout_s < MIN_IDLE_TIMEOUT_S:
            raise ValueError(
                f"CHORUS_IDLE_TIMEOUT_S ({self.idle_timeout_s:g}) must be 0 (off) or at least "
                f"{MIN_IDLE_TIMEOUT_S:g} s: a shorter one would end sessions between two words"
            )
        return self

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
    input_max_wait_ms: float = Field(
        default=500.0,
        ge=80,
        le=5000,
        description="Longest a user's audio frame waits for Redis to take the gateway's write: past it "
        "(Redis paused or partitioned) frames are dropped, counted and logged instead of arriving late, and "
        "the socket is read on.",
    )
    input_linger_ms: float = Field(
        default=0.0,
        ge=0,
        le=40,
        description="How long the gateway's writer of user audio to Redis waits for more sessions' frames "
        "before each write: fewer, larger writes (less gateway CPU per frame with many sessions) for as "
        "much more latency. 0: a frame goes at once unless a write is in flight.",
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
    max_voices_per_key: int = Field(
        default=50,
        ge=0,
        description="Voice profiles one API key may have (0 = unlimited); past it an upload is refused "
        "(409 quota_exceeded) before its body is read.",
    )
    max_personas_per_key: int = Field(
        default=100,
        ge=0,
        description="Stored personas one API key may have (0 = unlimited); past it creating one is refused "
        "(409 quota_exceeded).",
    )
    max_transcripts_per_key: int = Field(
        default=1000,
        ge=0,
        description="Transcripts kept per API key (0 = unlimited); a new session deletes the key's oldest of "
        "ended sessions past it (never refused; a live session's is kept, however long it runs). At least "
        "CHORUS_MAX_SESSIONS_PER_KEY.",
    )

    @model_validator(mode="after")
    def _hash_outlives_the_lease(self) -> GatewaySettings:
        """A dead gateway's sessions are ended by their workers when the lease lapses, which needs the
        session hash: expiring first, it left them let go as moved, their transcripts never ended."""
        if self.session_ttl_s <= self.session_lease_s:
            raise ValueError(
                f"CHORUS_SESSION_TTL_S ({self.session_ttl_s}) must be longer than CHORUS_SESSION_LEASE_S "
                f"({self.session_lease_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _live_transcripts_within_the_quota(self) -> GatewaySettings:
        """Pruning deletes a key's oldest transcripts: with fewer places than live sessions it would delete
        the transcript of a conversation still going on."""
        transcripts, sessions = self.max_transcripts_per_key, self.max_sessions_per_key
        if transcripts and sessions and transcripts < sessions:
            raise ValueError(
                f"CHORUS_MAX_TRANSCRIPTS_PER_KEY ({transcripts}) must be at least "
                f"CHORUS_MAX_SESSIONS_PER_KEY ({sessions}), or 0"
            )
        return self

    max_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Largest accepted request body on every route but the voice upload (JSON bodies); "
        "larger ones are refused (413) before they are parsed.",
    )
    requests_per_minute: int = Field(
        default=600,
        ge=0,
        description="REST requests per minute per authenticated owner (sliding window; 0 = unlimited).",
    )
    ws_max_sockets_per_key: int = Field(
        default=64,
        ge=0,
        description="WebSockets one API key may hold open on one gateway at once (0 = unlimited); past it "
        "a new one is refused (`rate_limited`, close 1013). A realtime socket holds no session until its "
        "first audio, so the session limit does not bound idle ones (~90 KB each).",
    )
    ws_max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest accepted WebSocket message (after inflating); a larger one closes the socket "
        "(1009, with the reason).",
    )
    ws_compression: bool = Field(
        default=True,
        description="Per-message deflate on `/v1/realtime` when the client offers it (as browsers do), "
        "Huffman-only: base64 audio about a quarter smaller on the wire, for gateway CPU (measured in "
        'docs/performance.md, "Per-message deflate, on and off"). `false` declines it. `/api/chat` '
        "(Opus) never compresses.",
    )
    ws_messages_per_second: float = Field(
        default=100.0,
        ge=1,
        description="Sustained WebSocket messages per second per socket (burst: 2 s worth); past it "
        "messages are dropped, with at most one `rate_limited` error a second, and read at most ten times as "
        "fast as this rate (past it the socket is not read: TCP slows the client).",
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
        description="Largest voice clip upload in bytes (POST /v1/voices only); bigger bodies are refused "
        "(413) by Content-Length or while streaming.",
    )
    adapter_max_upload_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=1024,
        description="Largest LoRA adapter upload in bytes (POST /v1/adapters only; a rank-128 adapter of the "
        "7B is several hundred MB); bigger bodies are refused (413). Uploads share the voice uploads' "
        "concurrency bound (`CHORUS_VOICE_MAX_CONCURRENT_UPLOADS`).",
    )
    adapter_switch_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="Shortest time between two mid-session changes of a Realtime session's `chorus_adapter` "
        "(a change may load the adapter onto the dialogue worker, pausing every session on it for the load); "
        "one sooner is refused (a `rate_limited` error event). 0 = no bound.",
    )
    max_adapters_per_key: int = Field(
        default=20,
        ge=0,
        description="LoRA adapters one API key may have (0 = unlimited); past it an upload is refused "
        "(409 quota_exceeded) before its body is read.",
    )
    voice_max_concurrent_uploads: int = Field(
        default=2,
        ge=1,
        description="Voice uploads one gateway receives and decodes at once; past it a new one is refused "
        "at once (503 `busy`, Retry-After) before its body is read.",
    )
    max_concurrent_uploads_per_key: int = Field(
        default=1,
        ge=1,
        description="Uploads (voices and adapters) one API key may have in progress on one gateway; past "
        "it a new one is refused at once (429 `rate_limited`, reason `uploads_per_key`, Retry-After), "
        "so one client's slow uploads cannot take every slot of `CHORUS_VOICE_MAX_CONCURRENT_UPLOADS`.",
    )
    request_head_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Longest a request's line and headers may take to arrive, from the connection (or, on "
        "a kept-alive one, from the request's first byte); past it the request is refused (408 "
        "`head_too_slow`) and the connection closed. A client that connects and sends nothing is closed "
        "after it too.",
    )
    request_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Longest a request body (other than an upload's, which CHORUS_UPLOAD_TIMEOUT_S bounds) "
        "may take to arrive; past it the request is refused (408 `body_too_slow`).",
    )
    response_stall_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Longest an HTTP answer may wait for its client to read any of it: when answer bytes "
        "wait on a connection (the client reads nothing) for this long, the connection is dropped. A "
        "slow reader that takes some of it in each period is left alone. (A WebSocket that is not read "
        "is bounded by its send queue: `ws_send_queue_bytes`.)",
    )
    upload_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Longest an upload's body (voice clip or adapter) may take to arrive; past it the upload "
        "is refused (408 `too_slow`) and its upload slot and scratch file freed.",
    )
    upload_stall_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest an upload's body may send nothing; past it the upload is refused (408 "
        "`stalled`) and its upload slot and scratch file freed. At most CHORUS_UPLOAD_TIMEOUT_S.",
    )

    @model_validator(mode="after")
    def _upload_stall_within_its_timeout(self) -> GatewaySettings:
        """A stall bound past the whole body's bound never applies: the setting would say what it does not."""
        if self.upload_stall_s > self.upload_timeout_s:
            raise ValueError(
                f"CHORUS_UPLOAD_STALL_S ({self.upload_stall_s:g}) must be at most CHORUS_UPLOAD_TIMEOUT_S "
                f"({self.upload_timeout_s:g}): a body stalled that long is past its whole time already"
            )
        return self

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
        description="At start-up, incomplete voice uploads older than this are removed, and any upload's "
        "file left in the data directory's scratch folder (`.incoming/`) not written to for this long; "
        "neither before CHORUS_UPLOAD_TIMEOUT_S + 60 s, whatever this says: another gateway sharing the "
        "directory may be writing it.",
    )


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()
