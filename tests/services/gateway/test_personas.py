"""`/v1/personas` against the real app and redis-server, with two API keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.gateway.auth import owner_of
from services.gateway.persona_store import PersonaStore
from shared.errors import InvalidRequest
from shared.storage import LocalStorage
from tests.services.gateway.app_client import gateway_client
from tests.support.audio import SPEECH_WAV
from tests.support.tts import add_profile

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
NEW = {"name": "Pirate", "primer": "You are a pirate.", "voice": "moshiko", "greeting": "Ahoy"}


@pytest.fixture
async def client(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys="key-alice,key-bob") as c:
        yield c


async def test_builtin_personas_are_listed_for_every_key(client: httpx.AsyncClient) -> None:
    for headers in (ALICE, BOB):
        body = (await client.get("/v1/personas", headers=headers)).json()
        ids = {p["id"] for p in body["items"]}
        assert {"default", "assistant", "tutor", "storyteller"} <= ids


async def test_a_persona_is_created_read_replaced_and_deleted(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/personas", json=NEW, headers=ALICE)
    assert created.status_code == 201
    pid = created.json()["id"]
    assert "owner" not in created.json()
    assert (await client.get(f"/v1/personas/{pid}", headers=ALICE)).json()["name"] == "Pirate"
    replaced = await client.put(f"/v1/personas/{pid}", json={**NEW, "name": "Captain"}, headers=ALICE)
    assert replaced.json()["name"] == "Captain"
    assert (await client.delete(f"/v1/personas/{pid}", headers=ALICE)).status_code == 204
    assert (await client.get(f"/v1/personas/{pid}", headers=ALICE)).status_code == 404


async def test_a_replace_racing_a_delete_never_brings_the_persona_back(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A PUT that read the persona before a DELETE removed it used to write it back, unindexed: the DELETE
    answered 204 and the persona lived on (usable by id, not listed, outside the quota), and a second
    DELETE answered 204 too. Writes to a key's personas now take turns: after a 204 the persona is gone."""
    for round_ in range(8):
        pid = (await client.post("/v1/personas", json=NEW, headers=ALICE)).json()["id"]
        answers = await asyncio.gather(
            client.delete(f"/v1/personas/{pid}", headers=ALICE),
            *(
                client.put(f"/v1/personas/{pid}", json={**NEW, "name": f"r{round_}"}, headers=ALICE)
                for _ in range(3)
            ),
            client.delete(f"/v1/personas/{pid}", headers=ALICE),
        )
        deletes = [answers[0].status_code, answers[-1].status_code]
        assert sorted(deletes) == [204, 404], deletes  # exactly one DELETE removed it
        assert {a.status_code for a in answers[1:-1]} <= {200, 404}
        assert (await client.get(f"/v1/personas/{pid}", headers=ALICE)).status_code == 404
        assert not (tmp_path / "personas" / f"{pid}.json").exists(), "no file left behind, unindexed"


async def test_an_unknown_persona_id_is_not_found_without_naming_the_storage(
    client: httpx.AsyncClient,
) -> None:
    for answer in (
        await client.get("/v1/personas/p_nope", headers=ALICE),
        await client.put("/v1/personas/p_nope", json=NEW, headers=ALICE),
        await client.delete("/v1/personas/p_nope", headers=ALICE),
    ):
        assert answer.status_code == 404
        assert answer.json()["detail"] == "no persona 'p_nope'"


async def test_another_key_cannot_see_or_change_a_persona(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/v1/personas", json=NEW, headers=ALICE)).json()["id"]
    assert (await client.get(f"/v1/personas/{pid}", headers=BOB)).status_code == 404
    assert (await client.put(f"/v1/personas/{pid}", json=NEW, headers=BOB)).status_code == 404
    assert (await client.delete(f"/v1/personas/{pid}", headers=BOB)).status_code == 404
    bob_ids = {p["id"] for p in (await client.get("/v1/personas", headers=BOB)).json()["items"]}
    assert pid not in bob_ids


async def test_a_persona_names_only_the_callers_own_voice_profile(client: httpx.AsyncClient) -> None:
    """Another key's profile is refused exactly like a missing one (as `session.update` refuses it); it
    was stored with a 201. The caller's own profile is taken."""
    app = client._transport.app  # type: ignore[attr-defined]  # the ASGI transport's app
    alice_owner = owner_of("key-alice")
    own = await add_profile(app.state.voices, SPEECH_WAV, owner=alice_owner)
    theirs = await add_profile(app.state.voices, SPEECH_WAV, owner=owner_of("key-bob"))
    for voice in (f"profile:{theirs.id}", "profile:voice_missing"):
        for sent in (
            client.post("/v1/personas", json={**NEW, "voice": voice}, headers=ALICE),
            client.put("/v1/personas/none_yet", json={**NEW, "voice": voice}, headers=ALICE),
        ):
            refused = await sent
            assert refused.status_code == 400 and "no such profile" in refused.json()["detail"], refused.text
    created = await client.post("/v1/personas", json={**NEW, "voice": f"profile:{own.id}"}, headers=ALICE)
    assert created.status_code == 201 and created.json()["voice"] == f"profile:{own.id}", created.text


async def test_a_voice_profile_a_persona_names_is_not_deleted_under_it(client: httpx.AsyncClient) -> None:
    """A persona's voice is what its sessions start with: deleting the profile would refuse every one of
    them with an unknown voice the client never named. The delete is refused (409 `in_use`, naming the
    personas) until the persona speaks in another voice, as an adapter's is (tests/.../test_adapters)."""
    app = client._transport.app  # type: ignore[attr-defined]  # the ASGI transport's app
    profile = await add_profile(app.state.voices, SPEECH_WAV, owner=owner_of("key-alice"))
    made = await client.post("/v1/personas", json={**NEW, "voice": profile.voice}, headers=ALICE)
    assert made.status_code == 201, made.text
    refused = await client.delete(f"/v1/voices/{profile.id}", headers=ALICE)
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    persona_id = made.json()["id"]
    assert (problem["code"], problem["reason"], problem["personas"]) == ("conflict", "in_use", [persona_id])
    assert made.json()["id"] in problem["detail"]
    assert (await client.get(f"/v1/voices/{profile.id}", headers=ALICE)).status_code == 200
    unvoiced = {**NEW, "voice": None}
    changed = await client.put(f"/v1/personas/{made.json()['id']}", json=unvoiced, headers=ALICE)
    assert changed.status_code == 200 and changed.json()["voice"] is None, changed.text
    assert (await client.delete(f"/v1/voices/{profile.id}", headers=ALICE)).status_code == 204


async def test_builtin_personas_cannot_be_modified_or_deleted(client: httpx.AsyncClient) -> None:
    put = await client.put("/v1/personas/tutor", json=NEW, headers=ALICE)
    assert put.status_code == 409
    assert put.headers["content-type"] == "application/problem+json"
    assert (await client.delete("/v1/personas/tutor", headers=ALICE)).status_code == 409


@pytest.mark.parametrize(
    "bad",
    [
        {**NEW, "primer": "x" * 2001},
        {**NEW, "voice": "robot"},
        {**NEW, "sampling": {"text_temperature": 5.0}},
        {**NEW, "sampling": {"audio_top_k": 0}},
        {"primer": "no name"},
    ],
)
async def test_invalid_personas_are_rejected(client: httpx.AsyncClient, bad: dict[str, object]) -> None:
    response = await client.post("/v1/personas", json=bad, headers=ALICE)
    assert response.status_code == 422


async def test_personas_survive_a_restart(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys="key-alice") as c:
        pid = (await c.post("/v1/personas", json=NEW, headers=ALICE)).json()["id"]
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys="key-alice") as c:
        assert (await c.get(f"/v1/personas/{pid}", headers=ALICE)).json()["primer"] == "You are a pirate."


async def test_a_session_resolves_its_persona_with_overrides(tmp_path: Path) -> None:
    store = PersonaStore(LocalStorage(tmp_path))
    from services.gateway.persona_store import PersonaFields

    alice = owner_of("key-alice")
    mine = await store.create(alice, PersonaFields(name="Pirate", primer="Arr"))
    spec = await store.resolve(alice, mine.id, {"primer": "Be brief"})
    assert (spec.id, spec.name, spec.primer) == (mine.id, "Pirate", "Be brief")
    assert (await store.resolve(alice, None, {})).id == "default"
    with pytest.raises(InvalidRequest):
        await store.resolve(owner_of("key-bob"), mine.id, {})
    with pytest.raises(InvalidRequest):
        await store.resolve(alice, "nope", {})
