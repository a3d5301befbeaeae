"""Catalog voices and the gated voice-cloning weights as clients meet them: `GET /v1/voices` lists the
catalog apart from profiles, catalog voices preview and open sessions on both sockets, unknown names are
refused with the valid ones, and without the cloning weights uploads and `profile:` sessions answer 503
with how to get them while catalog voices keep working. The TTS worker is the real core with the small
model (one with its cloning weights out of reach for the gated cases)."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from services.gateway.voices import check_voice_usable
from services.tts.engine import Engine
from shared.bus import Bus
from shared.errors import InvalidRequest
from shared.presence import WorkerPresence
from shared.storage import LocalStorage
from shared.voice_offer import CatalogListing, presence_fields, voice_offer
from shared.voice_profiles import VoiceProfileStore
from tests.security.conftest import launch_gateway, stop_gateway
from tests.services.gateway.test_voices import Settings, gateway, gateway_settings, upload
from tests.support.tts import (
    SPEECH,
    add_profile,
    gated_checkpoint,
    gated_engine,
    running_worker,
    tts_checkpoint,
    tts_engine,
    tts_settings,
)

__all__ = ["gated_checkpoint", "gated_engine", "gateway_settings", "tts_checkpoint", "tts_engine"]

MOSHI_ERROR = 0x05  # Moshi wire protocol: an error message


def assert_cloning_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["code"], problem["retryable"]) == ("cloning_unavailable", False)
    assert problem["terms_url"] == "https://huggingface.co/kyutai/pocket-tts"
    assert "HF_TOKEN" in problem["detail"] and "hf auth login" in problem["detail"]


def seconds_of_speech(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    with wave.open(io.BytesIO(response.content)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
        assert pcm.any()
        return wav.getnframes() / wav.getframerate()


async def test_the_catalog_is_listed_apart_from_profiles_and_its_voices_preview(
    gateway_settings: Settings,
    bus: Bus,
    tts_checkpoint: Path,
    tts_engine: Engine,
    redis_url: str,
    key_prefix: str,
) -> None:
    settings = gateway_settings()
    worker_settings = tts_settings(tts_checkpoint, settings.data_dir, redis_url, key_prefix)
    async with gateway(settings) as client, running_worker(bus, worker_settings, tts_engine):
        profile = (await upload(client, SPEECH.read_bytes())).json()
        listed = (await client.get("/v1/voices")).json()
        preview = await client.post("/v1/voices/catalog/alba/preview", json={"text": "Hello there."})
        unknown = await client.post("/v1/voices/catalog/nobody/preview", json={"text": "Hello."})
        ready = (await client.get("/readyz")).json()
        persona = await client.post("/v1/personas", json={"name": "Alba", "voice": "catalog:alba"})
    assert persona.status_code == 201 and persona.json()["voice"] == "catalog:alba", persona.text
    assert [v["voice"] for v in listed["items"]] == [profile["voice"]], "profiles apart from the catalog"
    catalog = {v["name"]: v for v in listed["catalog"]}
    assert len(catalog) == 27
    assert catalog["alba"] == {
        "name": "alba",
        "voice": "catalog:alba",
        "language": "english",
        "source": "local",
    }
    assert listed["voice_kinds"] == ["native", "catalog", "cloned"]
    assert seconds_of_speech(preview) > 0
    assert unknown.status_code == 404 and "the catalog has alba, anna" in unknown.json()["detail"]
    assert (ready["voice_kinds"], ready["cloned_voices"]) == (["native", "catalog", "cloned"], "available")


async def test_without_the_cloning_weights_uploads_are_refused_with_how_to_get_them(
    gateway_settings: Settings,
    bus: Bus,
    gated_checkpoint: Path,
    gated_engine: Engine,
    redis_url: str,
    key_prefix: str,
) -> None:
    settings = gateway_settings()
    worker_settings = tts_settings(gated_checkpoint, settings.data_dir, redis_url, key_prefix)
    async with gateway(settings) as client, running_worker(bus, worker_settings, gated_engine):
        refused = await upload(client, SPEECH.read_bytes())
        listed = (await client.get("/v1/voices")).json()
        preview = await client.post("/v1/voices/catalog/marius/preview", json={"text": "Still here."})
        ready = (await client.get("/readyz")).json()
    assert_cloning_unavailable(refused)
    assert listed["voice_kinds"] == ["native", "catalog"] and len(listed["catalog"]) == 27
    assert seconds_of_speech(preview) > 0, "catalog voices keep working"
    assert (ready["voice_kinds"], ready["cloned_voices"]) == (["native", "catalog"], "no_cloning_weights")


async def test_both_sockets_take_catalog_voices_and_refuse_what_cannot_be_spoken(
    bus: Bus, gated_checkpoint: Path, gated_engine: Engine, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    gw = launch_gateway(redis_url, tmp_path, "kinds", {"CHORUS_KEY_PREFIX": key_prefix})
    try:
        store = VoiceProfileStore(LocalStorage(gw.data_dir))
        profile = await add_profile(store, SPEECH)  # stored while the weights were there
        cached = await add_profile(store, SPEECH)  # ... and its state computed for this model then
        await store.save_state(cached.id, gated_engine.version, b"a state")
        worker_settings = tts_settings(gated_checkpoint, gw.data_dir, redis_url, key_prefix)
        async with running_worker(bus, worker_settings, gated_engine):
            unknown = await moshi_refusal(f"{gw.ws_url}/api/chat?voice=catalog:nobody")
            cloned = await moshi_refusal(f"{gw.ws_url}/api/chat?voice={profile.voice}")
            await check_voice_usable(store, bus, "", cached.voice)  # speakable from its cached state
            async with connect(f"{gw.ws_url}/v1/realtime?model=moshiko", open_timeout=10) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
                answers = []
                for voice in ("catalog:nobody", "catalog:alba"):
                    update = {"type": "session.update", "event_id": voice, "session": {"voice": voice}}
                    await ws.send(json.dumps(update))
                    answers.append(json.loads(await ws.recv()))
    finally:
        stop_gateway(gw)
    assert "unknown voice 'catalog:nobody': the catalog has alba, anna" in unknown
    assert "no TTS worker can clone voices" in cloned and "HF_TOKEN" in cloned
    refusal, accepted = answers
    assert (refusal["type"], refusal["error"]["code"]) == ("error", "invalid_request")
    assert "the catalog has alba" in refusal["error"]["message"]
    assert (
        accepted["type"] == "session.updated"
        and accepted["session"]["audio"]["output"]["voice"] == "catalog:alba"
    )


async def moshi_refusal(url: str) -> str:
    """The error message a Moshi socket is refused with at open."""
    async with connect(url, open_timeout=10) as ws:
        message = await ws.recv()
    assert isinstance(message, bytes) and message[0] == MOSHI_ERROR, message
    return message[1:].decode()


async def test_a_catalog_voice_only_some_tts_workers_have_is_refused(bus: Bus, tmp_path: Path) -> None:
    """Sessions and previews go to any TTS worker: a voice one of them lacks would fail there (a rolling
    upgrade to a model with another catalog), so it is neither listed nor accepted."""
    catalogs = {"tts-a": ["alba", "marius"], "tts-b": ["alba"]}
    for worker_id, voices in catalogs.items():
        listing = CatalogListing(language="en", source="local", voices=voices)
        fields = {"state": "serving", **presence_fields(True, listing)}
        presence = WorkerPresence(bus, "tts", worker_id, ttl_s=30, interval_s=10, describe=lambda f=fields: f)
        await presence.beat()
    store = VoiceProfileStore(LocalStorage(tmp_path))
    await check_voice_usable(store, bus, "", "catalog:alba")
    with pytest.raises(InvalidRequest, match=r"unknown voice 'catalog:marius': the catalog has alba$"):
        await check_voice_usable(store, bus, "", "catalog:marius")
    assert list((await voice_offer(bus)).catalog) == ["alba"]
