"""Voice previews while the only TTS worker is busy (voice states of fresh uploads computing, other
previews synthesising): each answers audio, or a 503/504 problem, within the preview timeout; never 500.
Once the worker is idle again, a preview answers with audio (the refusals were load, not a broken path)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.support.audio import SPEECH_WAV
from tests.support.clients import upload_voice
from tests.support.stack import ChorusStack

pytestmark = pytest.mark.chaos

PREVIEW_TIMEOUT_S = 5.0
ALLOWANCE_S = 3.0  # the gateway's own work (upload checks run on the same 2 cores)
UPLOADS = 4
PREVIEWS = 10
TEXT = "Hello there, this is how I sound when the worker is busy with other voices and requests."


async def preview(http: httpx.AsyncClient, voice_id: str, delay_s: float) -> tuple[int, str, float, bytes]:
    await asyncio.sleep(delay_s)
    began = time.monotonic()
    response = await http.post(f"/v1/voices/{voice_id}/preview", json={"text": TEXT})
    took = time.monotonic() - began
    return response.status_code, response.headers.get("content-type", ""), took, response.content


async def test_previews_while_the_only_tts_worker_is_busy_answer_in_time_and_never_500(
    make_stack: Callable[..., ChorusStack],
) -> None:
    # Four uploads in flight at once is the load under test: the gateway lets them all in (one key's
    # too: by default a key holds one upload slot).
    stack = make_stack(
        CHORUS_VOICE_PREVIEW_TIMEOUT_S=str(PREVIEW_TIMEOUT_S),
        CHORUS_VOICE_MAX_CONCURRENT_UPLOADS=str(UPLOADS),
        CHORUS_MAX_CONCURRENT_UPLOADS_PER_KEY=str(UPLOADS),
    )
    stack.start_services("tts")
    voice_id = await upload_voice(stack.url, str(SPEECH_WAV))
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        uploads = [upload_voice(stack.url, str(SPEECH_WAV), name=f"busy {i}") for i in range(UPLOADS)]
        previews = [preview(http, voice_id, 0.2 * i) for i in range(PREVIEWS)]
        results = await asyncio.gather(*uploads, *previews)
    answers = [r for r in results if isinstance(r, tuple)]
    statuses = Counter(status for status, *_ in answers)
    slowest = max(took for _, _, took, _ in answers)
    print(f"{PREVIEWS} previews under load: {dict(statuses)}; slowest answer {slowest:.2f} s")

    for status, content_type, took, body in answers:
        assert status in (200, 503, 504), (status, content_type, body[:300])
        if status == 200:
            assert content_type == "audio/wav" and body[:4] == b"RIFF"
        else:
            assert content_type == "application/problem+json", (status, content_type, body[:300])
        assert took <= PREVIEW_TIMEOUT_S + ALLOWANCE_S, f"a preview answered after {took:.2f} s"
    assert stack.processes["gateway"].poll() is None and stack.processes["tts"].poll() is None

    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        idle = await preview(http, voice_id, PREVIEW_TIMEOUT_S)  # what was queued is done or dropped
    assert idle[:2] == (200, "audio/wav"), "an idle worker answers a preview with audio"
