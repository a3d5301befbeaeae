"""The voice profile store: a profile exists once its metadata is written, and delete takes everything."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from shared.errors import NotFound
from shared.storage import LocalStorage
from shared.voice_profiles import (
    CLIP_FILE,
    PENDING_FILE,
    PROFILE_FILE,
    VoiceProfile,
    VoiceProfileStore,
    new_profile_id,
)


def profile(owner: str = "") -> VoiceProfile:
    return VoiceProfile(
        id=new_profile_id(), owner=owner, name="n", duration_s=1.0, speech_s=1.0, consent=True
    )


@pytest.fixture
def store(tmp_path: Path) -> VoiceProfileStore:
    return VoiceProfileStore(LocalStorage(tmp_path))


async def test_a_created_profile_reads_back_with_its_clip(store: VoiceProfileStore) -> None:
    clip = np.sin(np.linspace(0, 100, 24_000)).astype(np.float32) * 0.5
    created = await store.create(profile("me"), clip)
    assert await store.get(created.id) == created
    assert np.allclose(await store.clip(created.id), clip, atol=1 / 32768)
    assert await store.profiles("me") == [created] and await store.profiles("you") == []
    with pytest.raises(NotFound):
        await store.get_owned(created.id, "you")


async def test_an_upload_that_stopped_before_its_metadata_is_invisible_then_swept(
    store: VoiceProfileStore, tmp_path: Path
) -> None:
    stale, fresh = tmp_path / "voices" / "voice_stale", tmp_path / "voices" / "voice_fresh"
    for folder, started in ((stale, time.time() - 3600), (fresh, time.time())):
        folder.mkdir(parents=True)
        (folder / "clip.wav").write_bytes(b"RIFF")
        (folder / "pending.json").write_text(json.dumps({"started_at": started}))
    orphan = tmp_path / "voices" / "voice_orphan" / "states"  # a state written after a delete
    orphan.mkdir(parents=True)
    (orphan / "v1.safetensors").write_bytes(b"x")
    assert await store.profiles() == []
    assert sorted(await store.sweep_incomplete(grace_s=600)) == ["voice_orphan", "voice_stale"]
    assert fresh.exists(), "an upload in progress elsewhere is left alone"


async def test_delete_takes_the_metadata_the_clip_and_every_state(
    store: VoiceProfileStore, tmp_path: Path
) -> None:
    created = await store.create(profile(), np.zeros(2400, dtype=np.float32))
    await store.save_state(created.id, "v1", b"a")
    await store.save_state(created.id, "v2", b"b")
    assert sorted(await store.states(created.id)) == ["v1", "v2"]
    await store.delete(created.id)
    with pytest.raises(NotFound):
        await store.get(created.id)
    assert not (tmp_path / "voices" / created.id).exists()


@pytest.mark.parametrize("bad_id", ["..", "../voices", "a/b", "x" * 65, ""])
async def test_ids_that_are_not_profile_ids_never_reach_storage(
    store: VoiceProfileStore, bad_id: str
) -> None:
    for call in (store.get(bad_id), store.delete(bad_id), store.states(bad_id)):
        with pytest.raises(NotFound):
            await call


class DiskFullAt(LocalStorage):
    """Local storage whose disk is full by the time `file` is written: that write fails with ENOSPC."""

    def __init__(self, root: Path, file: str) -> None:
        super().__init__(root)
        self.file = file

    async def put(self, key: str, data: bytes) -> None:
        if key.endswith("/" + self.file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        await super().put(key, data)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("file", [PENDING_FILE, CLIP_FILE, PROFILE_FILE])
async def test_an_upload_that_fills_the_disk_leaves_no_half_profile(tmp_path: Path, file: str) -> None:
    store = VoiceProfileStore(DiskFullAt(tmp_path, file))
    with pytest.raises(OSError) as raised:
        await store.create(profile(), np.zeros(24_000, dtype=np.float32))
    assert raised.value.errno == errno.ENOSPC, "the caller learns why (the gateway answers 507)"
    assert await store.profiles() == []
    assert files_under(tmp_path) == [], "not even a pending marker waits for the start-up sweep"


async def test_a_clip_larger_than_the_free_space_leaves_nothing_on_the_disk(tiny_disk: Path) -> None:
    store = VoiceProfileStore(LocalStorage(tiny_disk))
    twelve_seconds = np.zeros(12 * 24_000, dtype=np.float32)  # 576 KB as PCM16: more than the disk holds
    with pytest.raises(OSError) as raised:
        await store.create(profile(), twelve_seconds)
    assert raised.value.errno == errno.ENOSPC
    assert files_under(tiny_disk) == []
    assert await store.create(profile(), twelve_seconds[:24_000]), "its space is free: a short one fits"
