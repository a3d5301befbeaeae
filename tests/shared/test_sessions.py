"""The session hash as every reader sees it: `SessionInfo`, parsed once from the strings Redis holds."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.bus import Bus
from shared.messages import PersonaSpec, Sampling, SessionStart
from shared.sessions import SessionInfo, SessionState, SessionStore, start_of


def test_every_known_field_is_parsed_to_its_type() -> None:
    start = SessionStart(session_id="s1", owner="alice", voice="moshika", persona=PersonaSpec(id="tutor"))
    info = SessionInfo.from_hash(
        "s1",
        {
            "state": "resuming",
            "owner": "alice",
            "voice": "profile:v1",
            "voice_mode": "cloned",
            "persona_id": "tutor",
            "started_at": "1700000000.25",
            "updated_at": "1700000001.5",
            "resumed_at": "1700000001",
            "start": start.model_dump_json(),
            "sampling": Sampling(text_top_k=5).model_dump_json(),
            "utterance": json.dumps({"speaker": "assistant", "text": " hel"}),
        },
    )
    assert info.session_id == "s1"
    assert info.state is SessionState.RESUMING and not info.ended
    assert (info.owner, info.voice, info.voice_mode, info.persona_id) == (
        "alice",
        "profile:v1",
        "cloned",
        "tutor",
    )
    assert (info.started_at, info.updated_at, info.resumed_at, info.ended_at) == (
        1700000000.25,
        1700000001.5,
        1700000001.0,
        None,
    )
    assert info.start == start
    assert info.sampling == Sampling(text_top_k=5)
    assert info.utterance == {"speaker": "assistant", "text": " hel"}


def test_workers_owners_and_counters_are_sorted_out_of_the_other_fields() -> None:
    info = SessionInfo.from_hash(
        "s1",
        {
            "state": "active",
            "dialogue_worker": "d1",
            "dialogue_owner": "moshiko/d1",
            "tts_worker": "t2",
            "dialogue_slot": "3",
            "barge_ins": "12",
            "something_new": "text",
        },
    )
    assert info.workers == {"dialogue_worker": "d1", "tts_worker": "t2"}
    assert info.owners == {"dialogue_owner": "moshiko/d1"}
    assert info.counters == {"dialogue_slot": 3, "barge_ins": 12}


def test_missing_and_empty_fields_read_as_unset() -> None:
    info = SessionInfo.from_hash("s1", {"state": "ended", "voice": "", "start": ""})
    assert info.ended
    assert (info.owner, info.voice, info.voice_mode, info.start, info.started_at) == (
        "",
        None,
        None,
        None,
        None,
    )
    assert start_of(info) is None


@pytest.mark.parametrize(
    "field",
    [
        {"voice": "moshiko\n"},
        {"voice": "profile:../etc"},
        {"voice_mode": "loud"},
        {"state": "sleeping"},
        {"started_at": "yesterday"},
        {"start": "{not json"},
    ],
    ids=["voice_newline", "voice_path", "voice_mode", "state", "float", "start"],
)
def test_a_field_that_does_not_parse_is_refused_not_passed_on(field: dict[str, str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (pydantic's ValidationError and json's error are both)
        SessionInfo.from_hash("s1", {"state": "active", **field})


def test_the_start_a_takeover_serves_carries_the_latest_voice_mode_sampling_and_adapter() -> None:
    start = SessionStart(
        session_id="s1",
        voice="moshiko",
        voice_mode="auto",
        persona=PersonaSpec(primer="hi", adapter="adapter_a"),
    )
    info = SessionInfo.from_hash(
        "s1",
        {
            "start": start.model_dump_json(),
            "voice": "profile:v1",
            "voice_mode": "cloned",
            "sampling": Sampling(audio_top_k=10).model_dump_json(),
            "adapter": "adapter_b",
        },
    )
    served = start_of(info)
    assert served is not None
    assert (served.voice, served.voice_mode, served.persona.sampling, served.persona.adapter) == (
        "profile:v1",
        "cloned",
        Sampling(audio_top_k=10),
        "adapter_b",
    )
    assert served.persona.primer == "hi" and served.session_id == "s1"


def test_a_sampling_update_without_seeds_keeps_the_sessions_seeds_for_a_takeover() -> None:
    """The worker keeps a row's seeds through an update that names none (`RowSampling.set`); the worker
    that takes the session over must draw the same, not new random ones."""
    seeded = Sampling(text_seed=7, audio_seed=8)
    start = SessionStart(session_id="s1", persona=PersonaSpec(sampling=seeded))
    update = Sampling(text_temperature=0.2, audio_seed=9)
    info = SessionInfo.from_hash(
        "s1", {"start": start.model_dump_json(), "sampling": update.model_dump_json()}
    )
    served = start_of(info)
    assert served is not None
    assert served.persona.sampling == Sampling(text_temperature=0.2, text_seed=7, audio_seed=9)


async def test_the_store_returns_the_parsed_hash_and_none_without_one(bus: Bus) -> None:
    store = SessionStore(bus, 60)
    assert await store.get("nobody") is None
    start = SessionStart(session_id="s1", owner="alice", voice="moshika", voice_mode="native")
    await store.create(start, lease_s=60)
    await store.update("s1", dialogue_worker="d1", dialogue_slot=2, barge_ins=1)
    info = await store.get("s1")
    assert info is not None
    assert (info.state, info.owner, info.voice, info.voice_mode) == (
        SessionState.PLACING,
        "alice",
        "moshika",
        "native",
    )
    assert info.start == start and start_of(info) == start
    assert info.workers == {"dialogue_worker": "d1"}
    assert info.counters == {"dialogue_slot": 2, "barge_ins": 1}
    assert info.started_at is not None and info.updated_at is not None and info.updated_at >= info.started_at

    await store.finalize("s1", "client_closed")
    ended = await store.get("s1")
    assert ended is not None and ended.ended and ended.end_reason == "client_closed"
    assert ended.ended_at is not None


async def test_a_counted_session_is_described_before_it_is_created(bus: Bus) -> None:
    """`register` begins the hash; `create` follows it after the transcript's header is written. Between
    the two, `/v1/sessions/{id}` showed an empty voice and persona: they go in with the count now."""
    store = SessionStore(bus, 60)
    described = {"voice": "moshika", "voice_mode": "native", "persona_id": "tutor"}
    await store.register("alice", "s1", 2, described)
    await store.register("alice", "s2", 2)
    counted = await store.get("s1")
    assert counted is not None
    assert (counted.state, counted.owner, counted.voice, counted.voice_mode, counted.persona_id) == (
        SessionState.PLACING,
        "alice",
        "moshika",
        "native",
        "tutor",
    )
    bare = await store.get("s2")
    assert bare is not None and (bare.state, bare.voice) == (SessionState.PLACING, None)


async def test_a_hash_written_by_hand_with_a_bad_voice_is_refused(bus: Bus) -> None:
    store = SessionStore(bus, 60)
    await store.create(SessionStart(session_id="s1"), lease_s=60)
    await bus.redis.hset(bus.names.session("s1"), "voice", "profile:a/b")
    with pytest.raises(ValidationError):
        await store.get("s1")


async def test_a_renewed_lease_keeps_the_live_transcript_as_long_as_the_hash(bus: Bus) -> None:
    """The live list (the session detail's words, a resumed session's primer) expired a TTL after its last
    utterance, while its session ran on: a long silence lost it."""
    store = SessionStore(bus, 60)
    await store.create(SessionStart(session_id="s1", owner="alice"), lease_s=30)
    await store.append_utterance("s1", {"speaker": "assistant", "text": "hello"})
    await bus.redis.expire(bus.names.session_transcript("s1"), 5)  # the TTL's end near
    await store.renew_leases(["s1"], 30)
    assert await bus.redis.ttl(bus.names.session_transcript("s1")) > 30
    assert [u["text"] for u in await store.transcript("s1")] == ["hello"]
