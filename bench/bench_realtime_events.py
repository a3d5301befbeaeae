"""The Realtime protocol's work per audio event: the gateway's lean path against the general path it falls
back to, in the same run, alternating, on 80 ms of speech-level PCM16: an append parsed and its audio
decoded (`parse_client_event` + `decode_audio` against `parse_event_model` + the stdlib's base64), an audio
delta's base64 and JSON (`encode_audio` + `wire` against the stdlib's base64 + `wire_model`, in both
dialects; the event copied with its base64 by pydantic in both), a transcript delta's JSON, and the
carver's quiet-frame check (`audible` against `rms_dbfs`). CPU µs per event (`time.thread_time` over CALLS
calls, the best of ROUNDS), and what a session-second's 12.5 appends in, 12.5 audio deltas out and their
quiet-frame checks cost each way.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.response_carver import AUDIBLE_DBFS, audible
from shared.audio import FRAME_SAMPLES, FRAME_SEC, float_to_pcm16, pcm16_to_float, rms_dbfs

CALLS = 20_000
ROUNDS = 5
PER_FRAME = ("append_in", "audio_delta_out_ga", "quiet_frame_check")  # each 12.5 times a session-second


def _paths(pcm: bytes) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Per event: (lean, general)."""
    append = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
    delta = ev.OutputAudioDelta(response_id="resp_1", item_id="item_1", delta=ev.encode_audio(pcm))
    text = ev.OutputAudioTranscriptDelta(response_id="resp_1", item_id="item_1", delta=" word")

    def parse_lean() -> bytes:
        event = ev.parse_client_event(append)
        assert isinstance(event, ev.InputAudioBufferAppend)
        return ev.decode_audio(event.audio)

    def parse_general() -> bytes:
        event = ev.parse_event_model(append)
        assert isinstance(event, ev.InputAudioBufferAppend)
        return base64.b64decode(event.audio, validate=True)

    return {
        "append_in": (parse_lean, parse_general),
        "audio_delta_out_ga": (
            lambda: ev.wire(delta.model_copy(update={"delta": ev.encode_audio(pcm)})),
            lambda: ev.wire_model(delta.model_copy(update={"delta": base64.b64encode(pcm).decode()})),
        ),
        "audio_delta_out_beta": (
            lambda: ev.wire(delta.model_copy(update={"delta": ev.encode_audio(pcm)}), beta=True),
            lambda: ev.wire_model(
                delta.model_copy(update={"delta": base64.b64encode(pcm).decode()}), beta=True
            ),
        ),
        "transcript_delta_out_ga": (lambda: ev.wire(text), lambda: ev.wire_model(text)),
        "quiet_frame_check": (lambda: audible(pcm), lambda: rms_dbfs(pcm16_to_float(pcm)) > AUDIBLE_DBFS),
    }


def _us_per_call(call: Callable[[], object]) -> float:
    started = time.thread_time()
    for _ in range(CALLS):
        call()
    return (time.thread_time() - started) / CALLS * 1e6


def run() -> dict[str, Any]:
    noise = np.random.default_rng(0).standard_normal(FRAME_SAMPLES).astype(np.float32) / 10  # -20 dBFS
    paths = _paths(float_to_pcm16(noise))
    best: dict[str, dict[str, float]] = {name: {"lean": np.inf, "general": np.inf} for name in paths}
    for _ in range(ROUNDS):  # alternating, so both see the same machine
        for name, (lean, general) in paths.items():
            best[name]["lean"] = min(best[name]["lean"], _us_per_call(lean))
            best[name]["general"] = min(best[name]["general"], _us_per_call(general))
    events = {
        name: {
            "lean_us": round(cost["lean"], 2),
            "general_us": round(cost["general"], 2),
            "ratio": round(cost["general"] / cost["lean"], 1),
        }
        for name, cost in best.items()
    }
    per_second = 1 / FRAME_SEC  # 12.5 appends in and 12.5 audio deltas out per session-second
    return {
        "description": __doc__.split("\n\n")[0],
        "calls_per_round": CALLS,
        "rounds": ROUNDS,
        "events": events,
        "ms_per_session_s": {
            path: round(per_second * sum(best[name][path] for name in PER_FRAME) / 1000, 3)
            for path in ("lean", "general")
        },
    }
