"""Helpers for tests that run the real TTS worker core: settings, profiles from fixture clips, a
running worker against the test's redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile

from services.tts.engine import Engine
from services.tts.serving import TtsWorker, session_services
from services.tts.settings import TtsSettings
from shared.audio import SAMPLE_RATE, resample, to_mono
from shared.bus import Bus
from shared.messages import TTS, SessionEvent, TtsMessage
from shared.presence import WorkerPresence
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfile, VoiceProfileStore, new_profile_id
from tests.support.audio import SPEECH2_FLAC, SPEECH_WAV
from tests.support.paths import CHECKPOINT_CACHE

SPEECH = SPEECH_WAV
SPEECH2 = SPEECH2_FLAC

T = TypeVar("T")


def tts_settings(
    tts_dir: Path | None, data_dir: Path, redis_url: str, key_prefix: str, **overrides: Any
) -> TtsSettings:
    """Small, quick phrases: random weights never end speech (EOS off), so every phrase gets exactly its
    bound of 3 frames per word plus 2 frames."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": key_prefix,
        "data_dir": data_dir,
        "tts_dir": tts_dir,
        "worker_id": f"tts-test-{uuid.uuid4().hex[:6]}",
        "tts_eos_threshold": 1e9,
        # One phrase per instance at a time, so a test can keep the worker busy with one phrase (rows
        # spoken together: tests/services/tts/test_batching.py).
        "tts_batch_rows": 1,
        "tts_max_seconds_per_word": 0.24,
        "tts_phrase_extra_s": 0.16,
        "session_check_s": 0.5,
        "claim_idle_ms": 500,
        "log_format": "text",
    }
    values.update(overrides)
    return TtsSettings(_env_file=None, **values)  # type: ignore[call-arg]


def read_clip(path: Path) -> np.ndarray:
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return resample(to_mono(samples), rate, SAMPLE_RATE)


async def add_profile(
    store: VoiceProfileStore, path: Path, owner: str = "", name: str = "test"
) -> VoiceProfile:
    """A profile as the gateway stores one (the clip decoded, mono, 24 kHz)."""
    clip = read_clip(path)
    profile = VoiceProfile(
        id=new_profile_id(),
        owner=owner,
        name=name,
        duration_s=len(clip) / SAMPLE_RATE,
        speech_s=1.0,
        consent=True,
    )
    return await store.create(profile, clip)


@contextlib.asynccontextmanager
async def running_worker(bus: Bus, settings: TtsSettings, engine: Engine) -> AsyncIterator[TtsWorker]:
    """The worker core as `chorus tts` runs it (minus process wiring), with a presence heartbeat."""
    store = VoiceProfileStore(LocalStorage(settings.data_dir))
    worker = TtsWorker(session_services(bus, settings, engine, store), settings)
    stop = asyncio.Event()
    presence = WorkerPresence(
        bus, "tts", settings.worker_id, ttl_s=5, interval_s=0.5, describe=worker.describe
    )
    tasks = [asyncio.create_task(worker.run(stop)), asyncio.create_task(presence.run(stop))]
    await worker.following.wait()
    await presence.beat()  # listed before the test goes on (the gateway reads what it can speak there)
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await presence.leave()


async def tts_entries(bus: Bus, sid: str) -> list[TtsMessage]:
    return [TTS.decode(e.fields) for e in await bus.range(bus.names.session_tts(sid))]


def events(entries: list[TtsMessage], name: str) -> list[SessionEvent]:
    return [e for e in entries if isinstance(e, SessionEvent) and e.name == name]


@pytest.fixture(scope="session")
def tts_checkpoint() -> Path:
    """The small random-weight Pocket TTS checkpoint (generated once, cached in .cache/)."""
    from chorus.devtools.checkpoints import make_checkpoints

    return make_checkpoints(CHECKPOINT_CACHE, parts=("tts",))["tts"]


@pytest.fixture(scope="session")
async def tts_engine(tts_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    """One loaded model for the whole session (each test builds its own worker around it)."""
    settings = tts_settings(tts_checkpoint, tmp_path_factory.mktemp("engine"), "redis://unused", "unused:")
    engine = await Engine.load(settings)
    yield engine
    engine.close()


# Where the hub would serve the gated voice-cloning weights: nothing listens there, so the download fails
# at once, as it does for a user without a token or who has not accepted the terms.
UNREACHABLE_WEIGHTS = "http://127.0.0.1:9/kyutai/pocket-tts/languages/english/model.safetensors"


@pytest.fixture(scope="session")
def gated_checkpoint(tts_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small checkpoint as a user without access to the gated weights meets the published config:
    `weights_path` out of reach, `weights_path_without_voice_cloning` loadable, the catalog beside it."""
    import yaml

    from services.tts.pocket_config import CATALOG_DIR, CONFIG_FILE, resolve

    folder = tmp_path_factory.mktemp("gated-tts")
    config = resolve(tts_checkpoint, "unused").config
    config["weights_path_without_voice_cloning"] = config["weights_path"]
    config["weights_path"] = UNREACHABLE_WEIGHTS
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config), encoding="utf-8")
    (folder / CATALOG_DIR).symlink_to(tts_checkpoint / CATALOG_DIR)
    return folder


@pytest.fixture(scope="session")
async def gated_engine(
    gated_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    """A model loaded without the voice-cloning weights."""
    settings = tts_settings(gated_checkpoint, tmp_path_factory.mktemp("gated"), "redis://unused", "unused:")
    engine = await Engine.load(settings)
    yield engine
    engine.close()
