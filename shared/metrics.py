"""Prometheus metrics, each named once here and used inline where the measurement happens."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Frame-scale latencies: 80 ms is the budget of one tick.
FRAME_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)

BUS_DEAD_LETTERS = Counter(
    "chorus_bus_dead_letters_total",
    "Entries given up on (malformed or failing too often)",
    ["stream_kind", "reason"],
)
# Read when scraped (shared/audio.py keeps the sum): a counter's locked increment per frame cost more.
CODEC_CPU = Gauge(
    "chorus_codec_cpu_seconds", "CPU seconds this process spent in the Opus codec so far", ["direction"]
)
SESSIONS_ACTIVE = Gauge("chorus_sessions_active", "Sessions this process is serving", ["service"])
WORKER_SLOTS_FREE = Gauge("chorus_worker_slots_free", "Free session slots on this worker", ["service"])
WORKER_SLOTS_TOTAL = Gauge("chorus_worker_slots_total", "Session slots on this worker", ["service"])
FRAMES_DROPPED = Counter(
    "chorus_frames_dropped_total",
    "Audio frames dropped (late, stale, or queue overflow)",
    ["service", "reason"],
)
FRAMES_FILLED = Counter("chorus_frames_silence_filled_total", "Missing input frames filled with silence")
STAGE_LATENCY = Histogram(
    "chorus_stage_latency_seconds",
    "Time spent per frame in each pipeline stage",
    ["stage"],
    buckets=FRAME_BUCKETS,
)
TICK_OVERRUNS = Counter(
    "chorus_tick_overruns_total", "Fixed-interval ticks that ran past their interval", ["service"]
)
SESSIONS_PLACED = Counter(
    "chorus_sessions_placed_total",
    "Sessions a worker took (kind: new, or resumed after a failover)",
    ["service", "kind"],
)
STREAM_LAG = Histogram(
    "chorus_stream_lag_seconds",
    "Age of an entry when its consumer read it",
    ["stream_kind"],
    buckets=FRAME_BUCKETS,
)
CONTEXT_ROLLOVERS = Counter(
    "chorus_context_rollovers_total",
    "Sessions moved to a fresh model state before the context filled (kind: free_slot, or in_place: a gap)",
    ["kind"],
)
CONTEXT_ROLLOVER_SECONDS = Histogram(
    "chorus_context_rollover_seconds",
    "From a rollover's start to the fresh state's first frame (in place: the gap the user hears)",
    ["kind"],
    buckets=(0.08, 0.16, 0.32, 0.64, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0),
)
VOICE_SWITCHES = Counter("chorus_voice_switches_total", "Audio source switches", ["to", "reason"])
TTS_REALTIME_FACTOR = Histogram(
    "chorus_tts_realtime_factor",
    "Seconds of audio synthesised per second of compute",
    buckets=(0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12),
)
TTS_FIRST_AUDIO = Histogram(
    "chorus_tts_first_audio_seconds",
    "From a phrase's last text piece leaving the dialogue service to its first cloned frame on :tts",
    buckets=FRAME_BUCKETS,
)
TTS_VOICE_STATES = Counter(
    "chorus_tts_voice_states_total", "Voice states served, by where they came from", ["source"]
)
TTS_PHRASES_DROPPED = Counter(
    "chorus_tts_phrases_dropped_total", "Phrases dropped before being spoken", ["reason"]
)
TTS_REQUESTS_DROPPED = Counter(
    "chorus_tts_requests_dropped_total",
    "Voice requests dropped unanswered because their deadline passed (waited: in the queue, for a model)",
    ["kind", "waited"],
)
UPLOAD_REJECTIONS = Counter("chorus_voice_upload_rejections_total", "Rejected voice uploads", ["reason"])
UPLOADS_IN_PROGRESS = Gauge("chorus_voice_uploads_in_progress", "Voice uploads this gateway is processing")
SESSIONS_REJECTED = Counter("chorus_sessions_rejected_total", "Sessions refused at start", ["reason"])
SESSIONS_ENDED = Counter("chorus_sessions_ended_total", "Sessions a gateway ended, by why", ["reason"])
LIMIT_REJECTIONS = Counter(
    "chorus_limit_rejections_total", "Requests or messages refused by a gateway limit", ["limit"]
)
WS_ERRORS_SUPPRESSED = Counter(
    "chorus_ws_errors_suppressed_total",
    "Rate-limit errors not sent: the socket was told less than a second before (the message was dropped)",
    ["protocol"],
)
WS_AUDIO_PACING_WAIT = Histogram(
    "chorus_ws_audio_pacing_wait_seconds",
    "How long a socket's receive loop waited before input audio it had read was within its pace",
    ["protocol"],
    buckets=FRAME_BUCKETS,
)
WS_AUDIO_REFUSED = Counter(
    "chorus_ws_audio_refused_seconds_total",
    "Seconds of input audio refused: one message carried more than the pacing burst",
    ["protocol"],
)
HTTP_REQUESTS = Counter("chorus_http_requests_total", "HTTP requests", ["method", "route", "status"])


def render() -> tuple[bytes, str]:
    """The exposition body and its content type, for a /metrics endpoint."""
    return generate_latest(), CONTENT_TYPE_LATEST
