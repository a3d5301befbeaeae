"""The TTS worker core against a real redis-server: sessions placed through chorus:control, Moshi's
text read from :dlg as the dialogue service writes it, cloned frames on :tts."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from chorus.devtools.redis_server import EmbeddedRedis
from services.tts.engine import Engine
from services.tts.settings import TtsSettings
from shared.audio import FRAME_BYTES, silence_frame
from shared.bus import Bus
from shared.messages import (
    ClonedAudio,
    DialogueFrame,
    EventName,
    Failure,
    Flushed,
    PhraseDone,
    SessionFlush,
    SessionStart,
    SessionStop,
    SessionUpdate,
    VoiceDeleted,
    VoiceMode,
)
from shared.sessions import SessionState, SessionStore
from shared.storage import LocalStorage
from shared.streams import StreamNames
from shared.voice_profiles import VoiceProfileStore
from tests.support.sessions import open_session
from tests.support.tts import (
    SPEECH,
    SPEECH2,
    add_profile,
    events,
    running_worker,
    tts_entries,
    tts_settings,
)
from tests.support.waiting import wait_until


@pytest.fixture
def settings(tts_checkpoint: Path, tmp_path: Path, redis_url: str, key_prefix: str) -> TtsSettings:
    return tts_settings(tts_checkpoint, tmp_path / "data", redis_url, key_prefix, tts_pause_frames=3)


@pytest.fixture
def store(settings: TtsSettings) -> VoiceProfileStore:
    return VoiceProfileStore(LocalStorage(settings.data_dir))


@pytest.fixture(scope="module", params=["batched, a row each", "batched, one batch", "unbatched"])
async def any_engine(
    request: pytest.FixtureRequest,
    tts_engine: Engine,
    tts_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Engine]:
    """The shared engine (one row per instance: phrases take turns), one whose phrases share a batch, and
    one without batching (`CHORUS_TTS_BATCH=false`)."""
    if request.param == "batched, a row each":
        yield tts_engine
        return
    settings = tts_settings(
        tts_checkpoint,
        tmp_path_factory.mktemp("engine"),
        "redis://unused",
        "unused:",
        tts_batch=request.param == "batched, one batch",
        tts_batch_rows=2,
    )
    engine = await Engine.load(settings)
    yield engine
    engine.close()


class Dialogue:
    """Writes :dlg as the dialogue service does: one frame per 80 ms tick, a text piece or ''."""

    def __init__(self, bus: Bus, sid: str) -> None:
        self.bus, self.sid, self.seq = bus, sid, 0

    async def say(self, *pieces: str) -> None:
        for piece in pieces:
            frame = DialogueFrame(session_id=self.sid, seq=self.seq, text=piece, pcm=silence_frame())
            await self.bus.append(self.bus.names.session_dialogue(self.sid), frame)
            self.seq += 1


async def start_session(bus: Bus, sid: str, voice: str, mode: VoiceMode = "cloned", owner: str = "") -> None:
    """What the gateway does: the session hash, then `start` on chorus:control."""
    await open_session(bus, sid, owner=owner, voice=voice, voice_mode=mode)


async def phrases_done(bus: Bus, sid: str, count: int) -> list[object] | None:
    entries = await tts_entries(bus, sid)
    return entries if len(events(entries, EventName.PHRASE_DONE)) >= count else None


def frames_of(entries: list[object]) -> list[ClonedAudio]:
    return [e for e in entries if isinstance(e, ClonedAudio)]


async def test_two_sessions_speak_moshis_text_in_their_own_voices_at_once(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, any_engine: Engine
) -> None:
    alice, bob = await add_profile(store, SPEECH), await add_profile(store, SPEECH2)
    async with running_worker(bus, settings, any_engine) as worker:
        await start_session(bus, "s-alice", alice.voice)
        await start_session(bus, "s-bob", bob.voice)
        a, b = Dialogue(bus, "s-alice"), Dialogue(bus, "s-bob")
        for piece_a, piece_b in zip(
            [" Hello", " there", ".", "", " How", " are", " you", "?", ""],
            [" Nice", " day", "", "", "", "", "", " Bye", "!"],
            strict=True,
        ):
            await a.say(piece_a)
            await b.say(piece_b)
        alice_out = await wait_until(lambda: phrases_done(bus, "s-alice", 2), "alice's two phrases")
        bob_out = await wait_until(lambda: phrases_done(bus, "s-bob", 2), "bob's two phrases")

        assert worker.s.voices.computed == 2, "one voice state per profile"
        assert worker.describe()["cloning"] == 2
    for entries, texts in (
        (alice_out, ["Hello there.", "How are you?"]),
        (bob_out, ["Nice day", "Bye!"]),
    ):
        assert [e.name for e in events(entries, EventName.READY)] == ["ready"], "the router is told once"
        frames = frames_of(entries)
        assert [f.text for f in frames if f.text] == texts, "each phrase's text rides on its first frame"
        seqs = [e.seq for e in entries]  # type: ignore[attr-defined]
        assert seqs == sorted(set(seqs)), "seq grows on :tts"
        assert all(len(f.pcm) == FRAME_BYTES for f in frames)
        assert any(np.frombuffer(f.pcm, "<i2").any() for f in frames), "cloned speech, not silence"
        # Random weights never end speech: each phrase is cut at its bound (3 frames a word + 2).
        per_phrase = [sum(f.phrase_id == i for f in frames) for i in (0, 1)]
        assert all(0 < n <= 3 * 4 + 2 for n in per_phrase), per_phrase


async def test_flush_drops_queued_phrases_and_the_one_being_spoken(
    bus: Bus, tts_checkpoint: Path, tmp_path: Path, redis_url: str, key_prefix: str, tts_engine: Engine
) -> None:
    # Long phrases (4 s a word), so the first is still being synthesised when the flush comes.
    settings = tts_settings(
        tts_checkpoint, tmp_path / "data", redis_url, key_prefix, tts_max_seconds_per_word=4.0
    )
    store = VoiceProfileStore(LocalStorage(settings.data_dir))
    profile = await add_profile(store, SPEECH)
    async with running_worker(bus, settings, tts_engine):
        await start_session(bus, "s1", profile.voice)
        dialogue = Dialogue(bus, "s1")
        await dialogue.say(" One", " two", ".", " Three", " four", ".", " Five", " six", ".")

        async def speaking() -> list[object] | None:
            entries = await tts_entries(bus, "s1")
            return entries if frames_of(entries) else None

        await wait_until(speaking, "the first frames")
        await bus.append_control(SessionFlush(session_id="s1"))
        flushed = (await wait_until(lambda: _event(bus, "s1", EventName.FLUSH), "the flush"))[0]
        assert flushed.data_as(Flushed).dropped_phrases >= 1
        assert flushed.data_as(Flushed).next_phrase_id == 3

        await dialogue.say(" Sorry", ".")
        entries = await wait_until(lambda: _after(bus, "s1", flushed.seq), "speech after the flush")
    after = frames_of(entries)
    assert after and {f.phrase_id for f in after} == {3}, "nothing from before the flush is spoken after it"
    assert after[0].text == "Sorry."


async def _event(bus: Bus, sid: str, name: str) -> list[object] | None:
    return events(await tts_entries(bus, sid), name) or None


async def _after(bus: Bus, sid: str, seq: int) -> list[object] | None:
    entries = [e for e in await tts_entries(bus, sid) if e.seq > seq]
    return entries if events(entries, EventName.PHRASE_DONE) else None


async def test_a_native_session_starts_cloning_when_its_voice_changes(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine
) -> None:
    profile = await add_profile(store, SPEECH)
    async with running_worker(bus, settings, tts_engine) as worker:
        await start_session(bus, "s1", "moshiko", mode="auto")
        await wait_until(lambda: _placed(worker, "s1"), "placement")
        dialogue = Dialogue(bus, "s1")
        await dialogue.say(" Native", " words", ".")
        await bus.append_control(SessionUpdate(session_id="s1", voice=profile.voice))
        await wait_until(lambda: _cloning(worker, "s1"), "the switch")
        await dialogue.say(" Cloned", " now", ".")
        entries = await wait_until(lambda: phrases_done(bus, "s1", 1), "the cloned phrase")
    assert [f.text for f in frames_of(entries) if f.text] == ["Cloned now."], "only text after the switch"


async def _placed(worker: object, sid: str) -> bool:
    return sid in worker.sessions  # type: ignore[attr-defined]


async def _cloning(worker: object, sid: str) -> bool:
    return bool(worker.sessions[sid].cloning)  # type: ignore[attr-defined]


async def test_another_owners_profile_is_refused_with_an_error_event(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine
) -> None:
    profile = await add_profile(store, SPEECH, owner="someone-else")
    async with running_worker(bus, settings, tts_engine):
        await start_session(bus, "s1", profile.voice, owner="me")
        (error,) = await wait_until(lambda: _event(bus, "s1", EventName.ERROR), "the error")
    assert error.data_as(Failure).code == "not_found"


async def test_a_deleted_voice_stops_its_sessions_and_leaves_memory(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine
) -> None:
    profile = await add_profile(store, SPEECH)
    async with running_worker(bus, settings, tts_engine) as worker:
        await start_session(bus, "s1", profile.voice)
        await Dialogue(bus, "s1").say(" Hi", ".")
        await wait_until(lambda: phrases_done(bus, "s1", 1), "a phrase")
        await store.delete(profile.id)
        await bus.append(bus.names.voice_events, VoiceDeleted(session_id=profile.id, profile_id=profile.id))
        (error,) = await wait_until(lambda: _event(bus, "s1", EventName.ERROR), "the error")
        assert profile.id not in worker.s.voices
        assert not worker.sessions["s1"].cloning
    assert "deleted" in error.detail


async def test_stop_ends_the_session_releases_it_and_expires_its_keys(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine
) -> None:
    profile = await add_profile(store, SPEECH)
    async with running_worker(bus, settings, tts_engine) as worker:
        await start_session(bus, "s1", profile.voice)
        await wait_until(lambda: _placed(worker, "s1"), "placement")
        await bus.append_control(SessionStop(session_id="s1"))
        await wait_until(lambda: _event(bus, "s1", EventName.ENDED), "the ended event")
        assert "s1" not in worker.sessions
        pending = await bus.redis.xpending(bus.names.control, "tts")
        assert pending["pending"] == 0, "the start was acked"
        assert not await bus.redis.smembers(bus.names.owned("tts", worker.settings.worker_id)), "released"
        assert await bus.redis.ttl(bus.names.session_tts("s1")) > 0


async def test_a_session_of_a_dead_worker_is_taken_over_and_its_seq_continues(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine, names: StreamNames
) -> None:
    profile = await add_profile(store, SPEECH)
    dialogue = Dialogue(bus, "s1")
    async with running_worker(bus, settings, tts_engine):
        await start_session(bus, "s1", profile.voice)
        await dialogue.say(" First", ".")
        before = await wait_until(lambda: phrases_done(bus, "s1", 1), "the first phrase")
    # The first worker is gone (its presence too) and still owns the session: the next one takes it over.
    successor = tts_settings(settings.tts_dir, settings.data_dir, settings.redis_url or "", names.prefix)  # type: ignore[arg-type]
    async with running_worker(bus, successor, tts_engine) as second:
        await wait_until(lambda: _placed(second, "s1"), "the takeover")
        await dialogue.say(" Second", ".")
        after = await wait_until(lambda: phrases_done(bus, "s1", 2), "the next phrase")
    new = after[len(before) :]
    assert [f.text for f in frames_of(new) if f.text] == ["Second."], "nothing said twice"
    assert events(new, EventName.RESUMED), "the router is told the TTS is back"
    assert min(e.seq for e in new) > max(e.seq for e in before)  # type: ignore[attr-defined]


async def test_a_start_of_a_session_that_is_over_is_ignored(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine
) -> None:
    # A new consumer group reads the whole control history: old starts must not revive their sessions.
    profile = await add_profile(store, SPEECH)
    await bus.append_control(SessionStart(session_id="gone", voice=profile.voice, voice_mode="cloned"))
    await start_session(bus, "ended", profile.voice)
    await SessionStore(bus, 60).update("ended", state=SessionState.ENDED)
    async with running_worker(bus, settings, tts_engine) as worker:
        await start_session(bus, "live", profile.voice)
        await wait_until(lambda: _placed(worker, "live"), "the live session")
        assert set(worker.sessions) == {"live"}
        owned = await bus.redis.smembers(bus.names.owned("tts", worker.settings.worker_id))
        assert owned == {b"live"}, "only the live session is served"


async def test_a_full_backlog_drops_the_oldest_phrases_and_speaks_the_newest(
    bus: Bus, tts_checkpoint: Path, tmp_path: Path, redis_url: str, key_prefix: str, tts_engine: Engine
) -> None:
    settings = tts_settings(tts_checkpoint, tmp_path / "data", redis_url, key_prefix, tts_backlog_phrases=1)
    store = VoiceProfileStore(LocalStorage(settings.data_dir))
    profile = await add_profile(store, SPEECH)
    # Moshi's text is on :dlg before the session is placed: the worker reads it in one batch, so four
    # phrases are queued before any is spoken and a backlog of one keeps only the last.
    dialogue = Dialogue(bus, "s1")
    await dialogue.say(" One", ".", " Two", ".", " Three", ".", " Four", ".")
    async with running_worker(bus, settings, tts_engine):
        await start_session(bus, "s1", profile.voice)
        entries = await wait_until(lambda: phrases_done(bus, "s1", 1), "a phrase")
    assert [f.text for f in frames_of(entries) if f.text] == ["Four."]
    assert [e.data_as(PhraseDone).phrase_id for e in events(entries, EventName.PHRASE_DONE)] == [3]


async def test_a_redis_stall_past_the_socket_timeout_leaves_cloned_speech_going(
    own_redis: EmbeddedRedis, names: StreamNames, tmp_path: Path, tts_checkpoint: Path, tts_engine: Engine
) -> None:
    """Redis paused for longer than the socket timeout (a hung or partitioned server): the session's reader
    of Moshi's text failed with the timeout and was never restarted, so the session stayed silent (or
    native) for the rest of the conversation, with nothing said to anyone. It is waited out now."""
    settings = tts_settings(
        tts_checkpoint, tmp_path / "data", own_redis.url, names.prefix, redis_socket_timeout_s=1.0
    )
    profile = await add_profile(VoiceProfileStore(LocalStorage(settings.data_dir)), SPEECH)
    bus = await Bus.connect(own_redis.url, names, timeout_s=1.0, socket_timeout_s=1.0)
    try:
        async with running_worker(bus, settings, tts_engine):
            await start_session(bus, "s-stall", profile.voice)
            dialogue = Dialogue(bus, "s-stall")
            await dialogue.say(" Before", " it", ".")
            await wait_until(lambda: phrases_done(bus, "s-stall", 1), "the phrase before the stall")
            assert own_redis.process is not None
            os.kill(own_redis.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(2.5)  # every blocked read times out meanwhile
            finally:
                os.kill(own_redis.process.pid, signal.SIGCONT)
            await dialogue.say(" After", " it", ".")
            entries = await wait_until(lambda: phrases_done(bus, "s-stall", 2), "the phrase after the stall")
    finally:
        await bus.close()
    assert [f.text for f in frames_of(entries) if f.text] == ["Before it.", "After it."]


async def test_a_start_taken_late_voices_what_is_said_from_then_on_not_the_old_text(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine
) -> None:
    """Every TTS worker was full when the session began; one takes it seconds later. It read Moshi's text
    from the session's first words and voiced them, many seconds stale, before anything said now."""
    profile = await add_profile(store, SPEECH)
    dialogue = Dialogue(bus, "s-late")
    await dialogue.say(" Said", " long", " ago", ".", "")
    start = SessionStart(
        session_id="s-late", voice=profile.voice, voice_mode="cloned", created_at=time.time() - 10
    )
    async with running_worker(bus, settings, tts_engine) as worker:
        await open_session(bus, start)
        await wait_until(lambda: _placed(worker, "s-late"), "the late start taken")
        await wait_until(lambda: _cloning(worker, "s-late"), "its reader placed")
        await dialogue.say(" Said", " now", ".", "")
        entries = await wait_until(lambda: phrases_done(bus, "s-late", 1), "a phrase")
    assert [f.text for f in frames_of(entries) if f.text] == ["Said now."]


async def test_native_sessions_take_no_synthesis_slot_and_a_switch_past_the_slots_is_refused(
    bus: Bus, settings: TtsSettings, store: VoiceProfileStore, tts_engine: Engine
) -> None:
    """A worker owns every session placed on it, native ones too (an owner for a later switch), and they
    took its slots: a fleet of native sessions left no TTS for cloned ones, which played native. Only
    sessions speaking through the TTS take a slot now; a switch to a TTS voice with none left is refused
    with an `error` (the router plays native and tells the client)."""
    profile = await add_profile(store, SPEECH)
    one_slot = settings.model_copy(update={"tts_max_sessions": 1})
    async with running_worker(bus, one_slot, tts_engine) as worker:
        for sid in ("s-native-1", "s-native-2"):
            await start_session(bus, sid, "moshiko", mode="auto")
            await wait_until(lambda sid=sid: _placed(worker, sid), "a native session placed")
        await start_session(bus, "s-cloned", profile.voice)
        await wait_until(lambda: _placed(worker, "s-cloned"), "the cloned session placed past two natives")
        await Dialogue(bus, "s-cloned").say(" Still", " room", ".")
        await wait_until(lambda: phrases_done(bus, "s-cloned", 1), "its phrase")
        assert worker.describe()["free_slots"] == 0

        await bus.append_control(SessionUpdate(session_id="s-native-1", voice=profile.voice))
        refused = await wait_until(lambda: _event(bus, "s-native-1", EventName.ERROR), "the refusal")
        assert refused[0].data_as(Failure).code == "no_capacity"  # type: ignore[attr-defined]
        assert not worker.sessions["s-native-1"].cloning
