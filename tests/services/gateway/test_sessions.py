"""`/v1/sessions`: live sessions per key, details, per-key concurrency limit, transcript exports."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.gateway.app import create_app
from services.gateway.auth import owner_of
from services.gateway.conversation import Conversation
from services.gateway.settings import GatewaySettings
from shared.errors import RateLimited
from shared.messages import PersonaSpec
from shared.presence import WorkerPresence
from shared.storage import LocalStorage
from shared.transcripts import TranscriptLog

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


@asynccontextmanager
async def running(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = GatewaySettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        data_dir=tmp_path,
        api_keys="key-alice,key-bob",
        max_sessions_per_key=2,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        # Real presence records: one dialogue worker with free slots and one router.
        for service, fields in (("dialogue", {"free_slots": 8}), ("router", {})):
            await WorkerPresence(
                app.state.bus, service, "w1", ttl_s=60, interval_s=5, describe=lambda f=fields: f
            ).beat()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as client:
            yield app, client


class ReadOnlyStorage(LocalStorage):
    """A data volume remounted read-only (as after disk errors): reads work, every write is refused."""

    async def put(self, key: str, data: bytes) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), key)

    async def append(self, key: str, data: bytes) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), key)


def conversation(app: FastAPI, key: str) -> Conversation:
    return Conversation(
        app.state.bus,
        owner=owner_of(key),
        persona=PersonaSpec(),
        voice="moshika",
        voice_mode="native",
        session_ttl_s=60,
        reader=app.state.outputs,
        writer=app.state.inputs,
        max_sessions=app.state.settings.max_sessions_per_key,
        leases=app.state.leases,
        transcripts=app.state.transcripts,
    )


async def test_each_key_lists_only_its_own_live_sessions(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with running(redis_url, key_prefix, tmp_path) as (app, client):
        mine = conversation(app, "key-alice")
        await mine.start()
        items = (await client.get("/v1/sessions", headers=ALICE)).json()["items"]
        assert [s["id"] for s in items] == [mine.session_id]
        assert (await client.get("/v1/sessions", headers=BOB)).json()["items"] == []
        assert (await client.get(f"/v1/sessions/{mine.session_id}", headers=BOB)).status_code == 404
        await mine.stop("test")
        assert (await client.get("/v1/sessions", headers=ALICE)).json()["items"] == []


async def test_session_detail_shows_state_counters_and_transcript(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with running(redis_url, key_prefix, tmp_path) as (app, client):
        conv = conversation(app, "key-alice")
        await conv.start()
        await conv.store.update(conv.session_id, voice_switches=2)
        await conv.store.append_utterance(conv.session_id, {"speaker": "assistant", "text": "hello there"})
        detail = (await client.get(f"/v1/sessions/{conv.session_id}", headers=ALICE)).json()
        assert detail["state"] == "placing"
        assert detail["voice"] == "moshika" and detail["persona_id"] == "default"
        assert detail["counters"]["voice_switches"] == 2
        assert detail["transcript"][0]["text"] == "hello there"
        await conv.stop("test")


async def test_concurrent_sessions_per_key_are_limited(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with running(redis_url, key_prefix, tmp_path) as (app, _):
        first, second = conversation(app, "key-alice"), conversation(app, "key-alice")
        await first.start()
        await second.start()
        with pytest.raises(RateLimited):
            await conversation(app, "key-alice").start()
        await conversation(app, "key-bob").start()  # another key has its own budget
        await first.stop("test")
        await conversation(app, "key-alice").start()  # a freed slot is reusable


async def test_an_ended_session_exports_its_transcript_to_its_owner_only(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with running(redis_url, key_prefix, tmp_path) as (app, client):
        conv = conversation(app, "key-alice")
        await conv.start()
        # What the dialogue worker writes while the session runs: one record per utterance.
        await app.state.transcripts.append(conv.session_id, {"speaker": "assistant", "text": "hi"})
        await conv.stop("client_closed")
        export = await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=ALICE)
        assert export.status_code == 200
        document = export.json()
        assert [t["text"] for t in document["turns"]] == ["hi"]
        assert document["end_reason"] == "client_closed" and document["ended_at"] is not None
        assert (
            await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=BOB)
        ).status_code == 404
    stored = tmp_path / "transcripts" / conv.session_id
    assert json.loads((stored / "meta.json").read_text())["session_id"] == conv.session_id
    assert (stored / "utterances.jsonl").read_text().count("\n") == 1


async def test_a_transcript_is_complete_whatever_the_session_length(tmp_path: Path) -> None:
    log = TranscriptLog(LocalStorage(tmp_path))
    await log.begin("long", owner="", persona_id="default", voice="moshiko")
    for i in range(2100):  # more than the live list in Redis keeps
        await log.append("long", {"speaker": "assistant", "text": f"utterance {i}"})
    turns = (await log.document("long"))["turns"]
    assert [t["text"] for t in turns] == [f"utterance {i}" for i in range(2100)]


async def test_transcripts_are_deleted_after_the_retention(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.put("transcripts/old/meta.json", json.dumps({"started_at": 900.0}).encode())
    await storage.put("transcripts/old/end.json", json.dumps({"ended_at": 1000.0}).encode())
    await storage.put("transcripts/new/meta.json", json.dumps({"started_at": 4000.0}).encode())
    await storage.put("transcripts/new/end.json", json.dumps({"ended_at": 5000.0}).encode())
    await storage.put("transcripts/running/meta.json", json.dumps({"started_at": 5000.0}).encode())
    assert await TranscriptLog(storage).sweep(retention_s=3600, now=5000.0 + 60) == 1
    assert sorted(await storage.list("transcripts/")) == [
        "transcripts/new/end.json",
        "transcripts/new/meta.json",
        "transcripts/running/meta.json",
    ]


async def test_a_kilobytes_long_id_in_a_path_is_not_echoed_back_whole(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A 404 for an id no route accepts quotes an excerpt of it, in `detail` and in `instance`: the
    answer stays small whatever the path (uvicorn takes request lines up to about 8 KB)."""
    long_id = "x" * 6000
    async with running(redis_url, key_prefix, tmp_path) as (_, client):
        answers = [
            await client.get(f"/v1/sessions/{long_id}", headers=ALICE),
            await client.get(f"/v1/sessions/{long_id}/transcript", headers=ALICE),
            await client.get(f"/v1/personas/{long_id}", headers=ALICE),
            await client.get(f"/v1/voices/{long_id}", headers=ALICE),
            await client.delete(f"/v1/adapters/{long_id}", headers=ALICE),
        ]
    for response in answers:
        assert response.status_code == 404, response.text[:300]
        body = response.json()
        assert len(response.content) < 1000, body
        assert "(6000 characters)" in body["detail"] or "(6002 characters)" in body["detail"], body
        assert body["instance"].endswith("...") and len(body["instance"]) < 300


async def test_a_session_whose_hash_redis_lost_still_records_its_end(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A Redis restarted without its data takes the session hash: the end can no longer be marked there,
    and was not recorded in the transcript either (no `end.json`: the export said it never ended)."""
    async with running(redis_url, key_prefix, tmp_path) as (app, client):
        conv = conversation(app, "key-alice")
        await conv.start()
        await app.state.bus.redis.delete(app.state.bus.names.session(conv.session_id))  # Redis lost it
        await conv.stop("session_lost")
        document = (await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=ALICE)).json()
    assert document["end_reason"] == "session_lost" and document["ended_at"] is not None


async def test_a_session_still_opening_has_an_empty_transcript_not_a_404(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Listed as soon as it is counted, a session's transcript header is written a moment later: an export
    fetched meanwhile is the empty transcript it is, not a 404 for a session the listing just showed."""
    async with running(redis_url, key_prefix, tmp_path) as (app, client):
        conv = conversation(app, "key-alice")
        header_held, release = asyncio.Event(), asyncio.Event()
        begin = app.state.transcripts.begin

        async def held_begin(*args: Any, **kwargs: Any) -> None:
            header_held.set()
            await release.wait()
            await begin(*args, **kwargs)

        app.state.transcripts.begin = held_begin
        starting = asyncio.create_task(conv.start())
        await header_held.wait()
        assert [s["id"] for s in (await client.get("/v1/sessions", headers=ALICE)).json()["items"]] == [
            conv.session_id
        ]
        export = await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=ALICE)
        assert export.status_code == 200, export.text
        assert export.json()["turns"] == [] and export.json()["ended_at"] is None
        assert export.json()["voice"] == "moshika" and export.json()["started_at"] is not None
        other = await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=BOB)
        assert other.status_code == 404
        release.set()
        await starting
        assert (await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=ALICE)).json()[
            "started_at"
        ] == pytest.approx(export.json()["started_at"], abs=5)
        await conv.stop("test")


async def test_a_session_whose_transcript_storage_refused_says_why_it_has_none(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """The conversation goes on without its record (logged); the export's 404 says why there is none,
    while the session runs and after it ended."""
    async with running(redis_url, key_prefix, tmp_path) as (app, client):
        app.state.transcripts = TranscriptLog(ReadOnlyStorage(tmp_path))
        conv = conversation(app, "key-alice")
        await conv.start()
        for _ in range(2):
            export = await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=ALICE)
            assert export.status_code == 404
            assert "could not be stored when the session began (storage_failed" in export.json()["detail"]
            await conv.stop("client_closed")
        bobs = await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=BOB)
        assert bobs.status_code == 404 and "storage_failed" not in bobs.json()["detail"]


async def test_an_ended_session_whose_transcript_was_deleted_has_none(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Only a live session's missing header means "not written yet": an ended one's was deleted (past the
    key's quota) and answers 404, though its hash lives on for a while."""
    async with running(redis_url, key_prefix, tmp_path) as (app, client):
        conv = conversation(app, "key-alice")
        await conv.start()
        await conv.stop("client_closed")
        await app.state.transcripts.storage.delete_prefix(f"transcripts/{conv.session_id}/")
        export = await client.get(f"/v1/sessions/{conv.session_id}/transcript", headers=ALICE)
        assert export.status_code == 404 and "storage_failed" not in export.json()["detail"]
