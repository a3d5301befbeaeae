"""The owner index: per-owner quotas that hold under races, listings that read only the owner's own files,
and the repairs after a crash or for data stored before the index existed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from services.gateway.persona_store import PersonaFields, PersonaStore
from shared.errors import NotFound, QuotaExceeded
from shared.owner_index import OwnerIndex, owner_folder
from shared.storage import LocalStorage
from shared.transcripts import TranscriptLog
from shared.voice_profiles import VoiceProfile, VoiceProfileStore, new_profile_id

ME, OTHER = "a1b2c3d4e5f60718", "0f1e2d3c4b5a6978"
CLIP = np.zeros(2400, dtype=np.float32)


class RecordingStorage(LocalStorage):
    """Local storage that records every key it reads and every prefix it lists."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []
        self.listed: list[str] = []

    async def get(self, key: str) -> bytes:
        self.reads.append(key)
        return await super().get(key)

    async def list(self, prefix: str) -> list[str]:
        self.listed.append(prefix)
        return await super().list(prefix)

    def forget(self) -> None:
        self.reads.clear()
        self.listed.clear()


def voice(owner: str) -> VoiceProfile:
    return VoiceProfile(
        id=new_profile_id(), owner=owner, name="n", duration_s=0.1, speech_s=0.1, consent=True
    )


async def nothing_stored(_: str) -> bool:
    return False


def age(storage_root: Path, owner: str, kind: str, name: str, seconds: float) -> None:
    """Make an index entry look written `seconds` ago."""
    entry = storage_root / "owners" / owner_folder(owner) / kind / name
    entry.write_text(json.dumps({"created": time.time() - seconds}))


# --- listings ------------------------------------------------------------------------------------


async def test_listing_voices_and_personas_reads_only_the_callers_index_and_objects(tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path)
    voices, personas = VoiceProfileStore(storage), PersonaStore(storage)
    mine = [await voices.create(voice(ME), CLIP) for _ in range(2)]
    my_personas = [await personas.create(ME, PersonaFields(name=f"p{i}")) for i in range(2)]
    for i in range(50):
        await voices.create(voice(f"{i:016x}"), CLIP)
        await personas.create(f"{i:016x}", PersonaFields(name="other"))
    storage.forget()

    assert [p.id for p in await voices.profiles(ME)] == [p.id for p in mine]
    assert [p.id for p in await personas.list(ME) if not p.builtin] == sorted(p.id for p in my_personas)

    assert storage.listed == [f"owners/{ME}/voices/", f"owners/{ME}/personas/"]
    expected = {f"voices/{p.id}/profile.json" for p in mine} | {f"personas/{p.id}.json" for p in my_personas}
    assert set(storage.reads) == expected, "not one other owner's file is read"


async def test_an_index_entry_whose_object_is_missing_is_skipped_by_listings(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    voices, personas = VoiceProfileStore(storage), PersonaStore(storage)
    await voices.index.add(ME, new_profile_id())  # a crash after the entry, before the upload
    await personas.index.add(ME, "p_000000000000")
    assert await voices.profiles(ME) == []
    assert [p for p in await personas.list(ME) if not p.builtin] == []


# --- quotas --------------------------------------------------------------------------------------


async def test_past_the_quota_creating_is_refused_with_the_limit_and_the_count(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    voices = VoiceProfileStore(storage, max_per_owner=2)
    personas = PersonaStore(storage, max_per_owner=2)
    for _ in range(2):
        await voices.create(voice(ME), CLIP)
        await personas.create(ME, PersonaFields(name="p"))

    refused = voice(ME)
    with pytest.raises(QuotaExceeded) as raised:
        await voices.create(refused, CLIP)
    assert raised.value.status == 409
    assert raised.value.extra == {
        "reason": "quota_exceeded",
        "resource": "voices",
        "limit": 2,
        "count": 2,
    }
    assert not (tmp_path / "voices" / refused.id).exists(), "nothing of a refused upload is stored"
    with pytest.raises(QuotaExceeded):
        await voices.check_quota(ME)
    with pytest.raises(QuotaExceeded) as raised:
        await personas.create(ME, PersonaFields(name="p"))
    assert raised.value.extra == {
        "reason": "quota_exceeded",
        "resource": "personas",
        "limit": 2,
        "count": 2,
    }
    assert len(await voices.index.names(ME)) == 2 and len(await personas.index.names(ME)) == 2

    await voices.create(voice(OTHER), CLIP)  # the quota is per owner
    await voices.delete((await voices.profiles(ME))[0].id)
    await voices.create(voice(ME), CLIP)  # a deleted profile gives its place back


async def test_creators_racing_for_the_last_places_never_pass_the_quota_nor_leak_a_place(
    tmp_path: Path,
) -> None:
    """Each creator counts after writing its entry: racers may all be refused, never all accepted."""
    personas = PersonaStore(LocalStorage(tmp_path), max_per_owner=5)
    await personas.create(ME, PersonaFields(name="first"))
    results = await asyncio.gather(
        *(personas.create(ME, PersonaFields(name=f"p{i}")) for i in range(30)), return_exceptions=True
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, QuotaExceeded) for r in refusals), refusals
    assert 1 + len(created) <= 5
    stored = [p for p in await personas.list(ME) if not p.builtin]
    assert len(stored) == 1 + len(created) == len(await personas.index.names(ME))
    while len(stored) < 5:  # the refused left no entry behind: one at a time, every place is there
        stored.append(await personas.create(ME, PersonaFields(name="later")))
    with pytest.raises(QuotaExceeded):
        await personas.create(ME, PersonaFields(name="one too many"))


async def test_a_stale_entry_without_its_object_gives_its_place_back_a_fresh_one_does_not(
    tmp_path: Path,
) -> None:
    index = OwnerIndex(LocalStorage(tmp_path), "voices", stale_after_s=600)
    await index.add(ME, "voice_crashed")
    await index.add(ME, "voice_uploading")
    age(tmp_path, ME, "voices", "voice_crashed", 3600)
    await index.reserve(ME, "voice_new", 2, nothing_stored)  # the crashed one's place
    assert await index.names(ME) == ["voice_new", "voice_uploading"]
    with pytest.raises(QuotaExceeded):
        await index.reserve(ME, "voice_newer", 2, nothing_stored)  # an upload in progress keeps its place


# --- crash consistency and repair -----------------------------------------------------------------


async def test_a_failed_upload_leaves_neither_files_nor_an_index_entry(tmp_path: Path) -> None:
    class FullDisk(LocalStorage):
        async def put(self, key: str, data: bytes) -> None:
            if key.endswith("/clip.wav"):
                raise OSError(28, "No space left on device")
            await super().put(key, data)

    voices = VoiceProfileStore(FullDisk(tmp_path), max_per_owner=1)
    with pytest.raises(OSError):
        await voices.create(voice(ME), CLIP)
    assert await voices.index.names(ME) == []
    assert not await asyncio.to_thread(lambda: [p for p in tmp_path.rglob("*") if p.is_file()])


async def test_the_sweep_of_an_interrupted_upload_removes_its_index_entry(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    voices = VoiceProfileStore(storage)
    interrupted = voice(ME)
    await voices.index.add(ME, interrupted.id)
    pending = {"started_at": time.time() - 3600, "owner": ME}
    await storage.put(f"voices/{interrupted.id}/pending.json", json.dumps(pending).encode())
    assert await voices.sweep_incomplete(grace_s=600) == [interrupted.id]
    assert await voices.index.names(ME) == []


async def test_reconcile_indexes_objects_stored_without_entries_and_drops_stale_entries(
    tmp_path: Path,
) -> None:
    """Data from before the index: every object is found again under its own owner, once."""
    storage = LocalStorage(tmp_path)
    voices, personas, transcripts = VoiceProfileStore(storage), PersonaStore(storage), TranscriptLog(storage)
    old_voice = await voices.create(voice(ME), CLIP)
    old_persona = await personas.create(OTHER, PersonaFields(name="p"))
    await transcripts.begin("s_old", owner=ME, persona_id="default", voice="moshiko")
    for kind, name in (("voices", old_voice.id), ("personas", old_persona.id)):
        (tmp_path / "owners" / owner_folder(ME if kind == "voices" else OTHER) / kind / name).unlink()
    for entry in (tmp_path / "owners" / ME / "transcripts").iterdir():
        entry.unlink()
    await voices.index.add(OTHER, "voice_gone")
    age(tmp_path, OTHER, "voices", "voice_gone", 3600)

    assert (await voices.reconcile_index()).added == 1
    assert (await personas.reconcile_index()).added == 1
    assert (await transcripts.reconcile_index()).added == 1
    assert [p.id for p in await voices.profiles(ME)] == [old_voice.id]
    assert [p.id for p in await personas.list(OTHER) if not p.builtin] == [old_persona.id]
    assert [name.split(".", 1)[1] for name in await transcripts.index.names(ME)] == ["s_old"]
    assert await voices.index.names(OTHER) == [], "the stale entry without an object is gone"
    again = [await s.reconcile_index() for s in (voices, personas, transcripts)]
    assert all(r.added == 0 and r.removed == 0 for r in again), "a second pass finds nothing to do"


# --- transcripts ---------------------------------------------------------------------------------


async def test_a_session_past_the_transcript_quota_deletes_the_owners_oldest_transcripts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transcripts = TranscriptLog(LocalStorage(tmp_path), max_per_owner=3)
    for i in range(5):
        await transcripts.begin(f"s_{i}", owner=ME, persona_id="default", voice="moshiko")
        await asyncio.sleep(0.002)  # distinct start times, in order
    await transcripts.begin("s_other", owner=OTHER, persona_id="default", voice="moshiko")

    kept = sorted(p.name for p in (tmp_path / "transcripts").iterdir())
    assert kept == ["s_2", "s_3", "s_4", "s_other"], "the newest three of mine, and the other owner's"
    assert len(await transcripts.index.names(ME)) == 3
    assert "deleted the oldest transcripts of an owner past its quota" in caplog.text


async def test_the_retention_sweep_removes_the_index_entry_with_the_transcript(tmp_path: Path) -> None:
    transcripts = TranscriptLog(LocalStorage(tmp_path))
    await transcripts.begin("s_1", owner=ME, persona_id="default", voice="moshiko")
    await transcripts.end("s_1", "client_closed")
    assert await transcripts.sweep(retention_s=60, now=time.time() + 120) == 1
    assert await transcripts.index.names(ME) == []


def test_owner_folders_are_plain_ids_and_anything_else_is_hashed() -> None:
    assert owner_folder(ME) == ME
    assert owner_folder("") == "anonymous"
    assert owner_folder("../../etc").startswith("h-") and "/" not in owner_folder("../../etc")


async def test_the_transcript_quota_never_deletes_a_live_sessions_transcript(tmp_path: Path) -> None:
    """Past the quota the oldest go, but not one whose session still runs: its export would answer 404
    while the conversation goes on. It goes once ended, when a later session begins."""
    transcripts = TranscriptLog(LocalStorage(tmp_path), max_per_owner=2)
    for sid in ("s_long", "s_short", "s_new"):
        await transcripts.begin(sid, owner=ME, persona_id="default", voice="moshiko", live=["s_long"])
        await asyncio.sleep(0.002)  # distinct start times, in order
    assert sorted(p.name for p in (tmp_path / "transcripts").iterdir()) == ["s_long", "s_new"]
    await transcripts.begin("s_later", owner=ME, persona_id="default", voice="moshiko")
    assert sorted(p.name for p in (tmp_path / "transcripts").iterdir()) == ["s_later", "s_new"]


async def test_a_transcript_that_could_not_begin_leaves_no_index_entry(tmp_path: Path) -> None:
    transcripts = TranscriptLog(LocalStorage(tmp_path))
    (tmp_path / "transcripts").mkdir()
    (tmp_path / "transcripts" / "s_1").write_bytes(b"")  # a file where its folder goes: the write fails
    with pytest.raises(OSError):
        await transcripts.begin("s_1", owner=ME, persona_id="default", voice="moshiko")
    assert await transcripts.index.names(ME) == []


async def test_an_unreadable_transcript_record_is_no_transcript_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its owner cannot be told: every key gets the 404 an unknown id gets, never a 500."""
    storage = LocalStorage(tmp_path)
    transcripts = TranscriptLog(storage)
    for sid, meta in (("s_empty", b""), ("s_list", b"[1]")):
        await storage.put(f"transcripts/{sid}/meta.json", meta)
        with pytest.raises(NotFound):
            await transcripts.document(sid)
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR"]


async def test_an_end_recorded_unless_ended_keeps_the_first(tmp_path: Path) -> None:
    transcripts = TranscriptLog(LocalStorage(tmp_path))
    await transcripts.begin("s_1", owner=ME, persona_id="default", voice="moshiko")
    await transcripts.end("s_1", "lease_expired")
    await transcripts.end("s_1", "session_lost", unless_ended=True)
    await transcripts.end("s_2", "session_lost", unless_ended=True)
    assert (await transcripts.document("s_1"))["end_reason"] == "lease_expired"
    assert json.loads((tmp_path / "transcripts/s_2/end.json").read_text())["reason"] == "session_lost"
