"""Voice profiles over REST: upload rules, formats, ownership, persistence, delete, preview.

The gateway app runs in-process (httpx ASGI transport, lifespan entered) against the test's
redis-server; the preview is answered by the real TTS worker core with the small Pocket TTS model.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
from fastapi import FastAPI
from prometheus_client import REGISTRY

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.tts.engine import Engine, ModelState
from shared.bus import Bus
from shared.messages import VOICE_EVENTS, VoicePrepare
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfileStore
from tests.support.paths import FIXTURE_AUDIO
from tests.support.tts import (
    SPEECH,
    read_clip,
    running_worker,
    tts_checkpoint,
    tts_engine,
    tts_settings,
)
from tests.support.waiting import wait_until

__all__ = ["tts_checkpoint", "tts_engine"]  # fixtures this module uses

Settings = Callable[..., GatewaySettings]


@pytest.fixture
def gateway_settings(tmp_path: Path, redis_url: str, key_prefix: str) -> Settings:
    def make(**overrides: Any) -> GatewaySettings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "key_prefix": key_prefix,
            "data_dir": tmp_path / "data",
        }
        values.update(overrides)
        return GatewaySettings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@asynccontextmanager
async def gateway(settings: GatewaySettings, api_key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app as uvicorn runs it (lifespan included), reached through httpx's ASGI transport."""
    app: FastAPI = create_app(settings)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost", headers=headers, timeout=60
        ) as client,
    ):
        yield client


async def upload(
    client: httpx.AsyncClient, data: bytes, filename: str = "clip.wav", **form: str
) -> httpx.Response:
    fields = {"name": "my voice", "consent": "true", **form}
    return await client.post("/v1/voices", files={"file": (filename, data)}, data=fields)


def wav_bytes(samples: np.ndarray, rate: int = 24_000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def speech(seconds: float | None = None) -> np.ndarray:
    clip = read_clip(SPEECH)
    return clip if seconds is None else clip[: int(seconds * 24_000)]


# --- accepted -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture", ["speech.wav", "speech2.flac", "speech.opus.ogg", "speech.vorbis.ogg", "speech.mp3"]
)
async def test_each_accepted_format_becomes_a_24khz_mono_profile(
    gateway_settings: Settings, fixture: str
) -> None:
    settings = gateway_settings()
    async with gateway(settings) as client:
        response = await upload(client, (FIXTURE_AUDIO / fixture).read_bytes(), filename=fixture, name="Ada")
    assert response.status_code == 201, response.text
    profile = response.json()
    assert profile["voice"] == f"profile:{profile['id']}"
    assert profile["name"] == "Ada" and profile["consent"] is True
    assert 3 <= profile["duration_s"] <= 30 and profile["speech_s"] >= 1.5
    with wave.open(str(settings.data_dir / "voices" / profile["id"] / "clip.wav")) as stored:
        assert (stored.getframerate(), stored.getnchannels()) == (24_000, 1)
        assert abs(stored.getnframes() / 24_000 - profile["duration_s"]) < 0.01


async def test_a_stereo_44khz_clip_is_mixed_down_and_its_loudness_normalised(
    gateway_settings: Settings,
) -> None:
    quiet = 0.05 * speech() / np.abs(speech()).max()
    stereo = np.stack([quiet, 0.5 * quiet], axis=1)
    rate = 44_100
    resampled = np.stack(
        [np.interp(np.arange(0, len(quiet), 24_000 / rate), np.arange(len(quiet)), c) for c in stereo.T], 1
    )
    settings = gateway_settings()
    async with gateway(settings) as client:
        response = await upload(client, wav_bytes(resampled.astype(np.float32), rate, subtype="PCM_16"))
    assert response.status_code == 201, response.text
    stored, stored_rate = soundfile.read(settings.data_dir / "voices" / response.json()["id"] / "clip.wav")
    assert stored_rate == 24_000 and stored.ndim == 1
    assert np.abs(stored).max() > 4 * np.abs(quiet).max(), (
        "a quiet recording is brought up to the target level"
    )
    assert np.abs(stored).max() <= 10 ** (-1 / 20) + 1e-3, "with headroom"


# --- refused --------------------------------------------------------------------------------------


def clipped() -> bytes:
    return wav_bytes(np.clip(40 * speech(), -1, 1).astype(np.float32), subtype="PCM_16")


def with_nans() -> bytes:
    """A float WAV of speech holding a few NaN samples: refused as such, not measured as silence."""
    samples = speech().astype(np.float32)
    samples[::12_000] = np.nan
    return wav_bytes(samples, subtype="FLOAT")


def noise() -> bytes:
    rng = np.random.default_rng(0)
    return wav_bytes((0.1 * rng.standard_normal(24_000 * 6)).astype(np.float32))


@pytest.mark.parametrize(
    ("make", "status", "reason", "limit"),
    [
        (lambda: b"this is a text file, not a recording\n" * 20, 415, "not_audio", None),
        (lambda: wav_bytes(speech(), fmt="AIFF"), 415, "unsupported_format", None),
        (lambda: wav_bytes(speech(1.5)), 422, "too_short", 3.0),
        (lambda: wav_bytes(np.tile(speech(), 5)), 422, "too_long", 30.0),
        (lambda: wav_bytes(np.zeros(24_000 * 5, dtype=np.float32)), 422, "silent", -50.0),
        (clipped, 422, "clipped", 0.001),
        (noise, 422, "no_speech", 1.5),
        (with_nans, 415, "undecodable", None),
    ],
    ids=["not_audio", "aiff", "too_short", "too_long", "silent", "clipped", "no_speech", "not_numbers"],
)
async def test_unusable_clips_are_refused_with_the_measured_value_and_the_limit(
    gateway_settings: Settings,
    make: Callable[[], bytes],
    status: int,
    reason: str,
    limit: float | None,
) -> None:
    async with gateway(gateway_settings()) as client:
        response = await upload(client, make())
        listed = (await client.get("/v1/voices")).json()["items"]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["detail"]
    assert problem["reason"] == reason
    if limit is not None:
        assert problem["limit"] == limit
        assert isinstance(problem["measured"], float | int)
    assert listed == [], "nothing was stored"


async def test_an_upload_over_the_size_limit_is_refused_before_it_is_read_whole(
    gateway_settings: Settings,
) -> None:
    data = (FIXTURE_AUDIO / "speech.wav").read_bytes()
    limit = len(data) // 4
    async with gateway(gateway_settings(voice_max_upload_bytes=limit)) as client:
        declared = await upload(client, data)
        sent: list[int] = []

        async def body() -> AsyncIterator[bytes]:
            # No Content-Length: the limit is enforced on the bytes as they stream in.
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n\r\n'
            for i in range(0, len(data), 4096):
                sent.append(i)
                yield data[i : i + 4096]
            yield b"\r\n--b--\r\n"

        streamed = await client.post(
            "/v1/voices", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["limit"] == limit
    assert len(sent) < len(data) // 4096, "the server stopped reading past the limit"


async def test_cloning_needs_consent(gateway_settings: Settings) -> None:
    async with gateway(gateway_settings()) as client:
        refused = await upload(client, SPEECH.read_bytes(), consent="false")
        missing = await client.post(
            "/v1/voices", files={"file": ("a.wav", SPEECH.read_bytes())}, data={"name": "x"}
        )
    assert refused.status_code == missing.status_code == 400
    assert "consent" in refused.json()["detail"]


async def test_an_upload_onto_a_full_disk_answers_507_and_stores_nothing(
    gateway_settings: Settings, tiny_disk: Path
) -> None:
    settings = gateway_settings(data_dir=tiny_disk)
    filler = tiny_disk / "filler"
    filler.write_bytes(bytes(256 * 1024))  # what is left holds the pending marker, not the clip
    async with gateway(settings) as client:
        full = await upload(client, SPEECH.read_bytes())
        listed = (await client.get("/v1/voices")).json()["items"]
        filler.unlink()
        after = await upload(client, SPEECH.read_bytes())
    assert full.status_code == 507, full.text
    assert full.headers["content-type"] == "application/problem+json"
    assert (full.json()["code"], full.json()["retryable"]) == ("insufficient_storage", True)
    assert "retry-after" in full.headers
    assert listed == []
    assert after.status_code == 201, "with space back, the same upload is stored"
    assert [p.name for p in (tiny_disk / "voices").iterdir()] == [after.json()["id"]], "no half profile"


# --- lifecycle ------------------------------------------------------------------------------------


async def test_profiles_belong_to_their_api_key(gateway_settings: Settings) -> None:
    settings = gateway_settings(api_keys="key-a,key-b")
    async with gateway(settings, "key-a") as a, gateway(settings, "key-b") as b:
        voice_id = (await upload(a, SPEECH.read_bytes())).json()["id"]
        assert [v["id"] for v in (await a.get("/v1/voices")).json()["items"]] == [voice_id]
        assert (await b.get("/v1/voices")).json()["items"] == []
        for response in (
            await b.get(f"/v1/voices/{voice_id}"),
            await b.delete(f"/v1/voices/{voice_id}"),
            await b.post(f"/v1/voices/{voice_id}/preview", json={"text": "hi"}),
        ):
            assert response.status_code == 404
        assert (await a.get(f"/v1/voices/{voice_id}")).status_code == 200


async def test_profiles_survive_a_restart(gateway_settings: Settings) -> None:
    settings = gateway_settings()
    async with gateway(settings) as client:
        created = (await upload(client, SPEECH.read_bytes())).json()
    async with gateway(settings) as restarted:
        assert (await restarted.get(f"/v1/voices/{created['id']}")).json() == created
        assert [v["id"] for v in (await restarted.get("/v1/voices")).json()["items"]] == [created["id"]]


async def test_a_crash_mid_upload_leaves_no_profile_behind(gateway_settings: Settings) -> None:
    settings = gateway_settings()
    store = VoiceProfileStore(LocalStorage(settings.data_dir))
    half = settings.data_dir / "voices" / "voice_crashed"
    half.mkdir(parents=True)
    (half / "clip.wav").write_bytes(SPEECH.read_bytes())
    (half / "pending.json").write_text(json.dumps({"started_at": time.time() - 3600}))
    assert await store.profiles() == []
    async with gateway(settings) as client:
        assert (await client.get("/v1/voices/voice_crashed")).status_code == 404
    assert not half.exists(), "the start-up sweep removed it"


async def test_delete_removes_the_clip_the_metadata_and_every_voice_state(
    gateway_settings: Settings, bus: Bus
) -> None:
    settings = gateway_settings()
    store = VoiceProfileStore(LocalStorage(settings.data_dir))
    async with gateway(settings) as client:
        voice_id = (await upload(client, SPEECH.read_bytes())).json()["id"]
        await store.save_state(voice_id, "model-a", b"state")
        await store.save_state(voice_id, "model-b", b"state")
        response = await client.delete(f"/v1/voices/{voice_id}")
        assert response.status_code == 204
        assert (await client.get(f"/v1/voices/{voice_id}")).status_code == 404
        assert (await client.delete(f"/v1/voices/{voice_id}")).status_code == 404
    assert not (settings.data_dir / "voices" / voice_id).exists()
    (event,) = [VOICE_EVENTS.decode(e.fields) for e in await bus.range(bus.names.voice_events)]
    assert event.profile_id == voice_id, "TTS workers are told to drop their cached state"


async def test_an_upload_asks_the_tts_service_for_the_voice_state(
    gateway_settings: Settings, bus: Bus
) -> None:
    async with gateway(gateway_settings()) as client:
        voice_id = (await upload(client, SPEECH.read_bytes())).json()["id"]
    (request,) = await bus.range(bus.names.tts_requests)
    assert request.fields[b"type"] == b"prepare" and request.fields[b"profile_id"] == voice_id.encode()
    assert VoicePrepare(session_id=voice_id, profile_id=voice_id).profile_id == voice_id


# --- preview --------------------------------------------------------------------------------------


async def test_preview_speaks_the_text_in_the_voice(
    gateway_settings: Settings,
    bus: Bus,
    tts_checkpoint: Path,
    tts_engine: Engine,
    redis_url: str,
    key_prefix: str,
) -> None:
    settings = gateway_settings()
    worker_settings = tts_settings(tts_checkpoint, settings.data_dir, redis_url, key_prefix)
    text = "Hello, this is what I sound like now."
    async with gateway(settings) as client, running_worker(bus, worker_settings, tts_engine) as worker:
        voice_id = (await upload(client, SPEECH.read_bytes())).json()["id"]
        response = await client.post(f"/v1/voices/{voice_id}/preview", json={"text": text})
        assert worker.s.voices.computed == 1, "the upload's prepare request and the preview share one state"
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(response.content)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    words = len(text.split())
    # Random weights never end speech: the preview lasts the bound set for its words (0.24 s a word).
    assert 0.5 < seconds <= words * 0.24 + 0.16 + 0.08
    assert pcm.any()


async def test_preview_without_a_tts_worker_is_unavailable(gateway_settings: Settings) -> None:
    async with gateway(gateway_settings()) as client:
        voice_id = (await upload(client, SPEECH.read_bytes())).json()["id"]
        response = await client.post(f"/v1/voices/{voice_id}/preview", json={"text": "Hello."})
    assert response.status_code == 503
    assert "TTS" in response.json()["detail"]


def dropped_stale_previews() -> float:
    value = REGISTRY.get_sample_value(
        "chorus_tts_requests_dropped_total", {"kind": "preview", "waited": "model"}
    )
    return value or 0.0


def assert_busy_timeout(response: httpx.Response) -> None:
    assert response.status_code == 504, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["code"], problem["retryable"]) == ("timeout", True)
    assert int(response.headers["retry-after"]) > 0


def idle_instances(engine: Engine) -> int:
    """The engine's model instances free to synthesize now."""
    return engine._free.qsize()


@contextlib.asynccontextmanager
async def busy(engine: Engine, state: ModelState) -> AsyncIterator[None]:
    """The engine's only model instance speaks, without end, until the block is left."""
    stop = threading.Event()

    async def discard(audio: np.ndarray) -> None:
        pass

    speaking = asyncio.create_task(
        engine.synthesize(state, "on and on " * 50, max_samples=10**9, cancel=stop, sink=discard)
    )

    async def taken() -> bool:
        return idle_instances(engine) == 0

    await wait_until(taken, "the model instance to be taken")
    try:
        yield
    finally:
        stop.set()
        await speaking


async def test_a_preview_that_waits_too_long_for_a_busy_worker_answers_504_and_is_never_synthesised(
    gateway_settings: Settings,
    bus: Bus,
    tts_checkpoint: Path,
    tts_engine: Engine,
    redis_url: str,
    key_prefix: str,
) -> None:
    assert tts_engine.instances == 1
    settings = gateway_settings(voice_preview_timeout_s=1.0)
    worker_settings = tts_settings(tts_checkpoint, settings.data_dir, redis_url, key_prefix)
    async with gateway(settings) as client, running_worker(bus, worker_settings, tts_engine) as worker:
        voice_id = (await upload(client, SPEECH.read_bytes())).json()["id"]
        state = await worker.s.voices.get(voice_id)
        dropped = dropped_stale_previews()
        async with busy(tts_engine, state):
            started = time.monotonic()
            response = await client.post(f"/v1/voices/{voice_id}/preview", json={"text": "Hello."})
            waited = time.monotonic() - started
        # The worker took the request at once; its model instance came free after the deadline.

        async def stale_dropped() -> bool:
            return dropped_stale_previews() == dropped + 1

        await wait_until(stale_dropped, "the worker to drop the stale preview", timeout_s=10)
        assert idle_instances(tts_engine) == 1, "nothing was synthesised for it"
    assert_busy_timeout(response)
    assert 1.0 <= waited < 2.5, "the answer came at the deadline, not at the Redis client's timeout"


async def test_previews_queued_behind_each_other_answer_200_or_504_in_bounded_time(
    gateway_settings: Settings,
    bus: Bus,
    tts_checkpoint: Path,
    tts_engine: Engine,
    redis_url: str,
    key_prefix: str,
) -> None:
    settings = gateway_settings(voice_preview_timeout_s=1.5)
    worker_settings = tts_settings(tts_checkpoint, settings.data_dir, redis_url, key_prefix)
    async with gateway(settings) as client, running_worker(bus, worker_settings, tts_engine):
        voice_ids = [(await upload(client, SPEECH.read_bytes())).json()["id"] for _ in range(3)]
        # Right after the uploads the worker is still computing their voice states.
        started = time.monotonic()
        text = "This is a rather long sentence to say in my own voice, word after word."
        responses = await asyncio.gather(
            *(client.post(f"/v1/voices/{v}/preview", json={"text": text}) for v in voice_ids * 2)
        )
        elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 2.0
    for response in responses:
        if response.status_code != 200:
            assert_busy_timeout(response)


# --- the CLI --------------------------------------------------------------------------------------


async def test_chorus_voices_add_uploads_a_clip_and_prints_its_id(
    gateway_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from chorus.cli import main
    from chorus.devtools.redis_server import free_port

    port = free_port()
    settings = gateway_settings(port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await wait_until(started, "uvicorn to listen")
    try:
        argv = ["voices", "add", str(SPEECH), "--name", "me", "--url", f"http://127.0.0.1:{port}"]
        code = await asyncio.to_thread(main, [*argv, "--i-have-consent"])
        refused = await asyncio.to_thread(main, argv)  # no terminal to ask on: consent is required
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            listed = (await client.get("/v1/voices")).json()["items"]
    finally:
        server.should_exit = True
        await serving
    out = capsys.readouterr()
    assert code == 0 and refused == 2
    assert out.out.strip() == listed[0]["id"]
    assert "consent" in out.err
