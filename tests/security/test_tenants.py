"""Tenants on one gateway (a real process): per-key quotas on voices, personas and transcripts, and
listings that never open another tenant's files (seen by the kernel: inotify on the data volume)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from services.gateway.auth import owner_of
from services.gateway.persona_store import PersonaFields, PersonaStore
from shared.storage import LocalStorage
from shared.voice_profiles import VoiceProfile, VoiceProfileStore, new_profile_id
from tests.security.conftest import GatewayProcess, StartGateway
from tests.security.file_access import FileAccessWatch
from tests.support.audio import SPEECH_WAV

KEY_A, KEY_B = "tenant-a-0123456789abcdef", "tenant-b-0123456789abcdef"
OTHER_TENANTS, OBJECTS_EACH = 20, 10


def client(gateway: GatewayProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def upload_voice(http: httpx.Client, data: bytes) -> httpx.Response:
    return http.post(
        "/v1/voices", files={"file": ("clip.wav", data)}, data={"name": "my voice", "consent": "true"}
    )


def assert_quota_problem(response: httpx.Response, resource: str, limit: int, count: int) -> None:
    assert response.status_code == 409, response.text
    body = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert (body["code"], body["reason"], body["resource"], body["limit"], body["count"]) == (
        "quota_exceeded",
        "quota_exceeded",
        resource,
        limit,
        count,
    )
    assert body["retryable"] is False and "delete one" in body["detail"]


# --- isolation -----------------------------------------------------------------------------------------


def assert_not_found(response: httpx.Response) -> None:
    """Another key's object answers exactly like a missing one: a 404 problem, nothing of the object."""
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "not_found"


def test_a_key_can_neither_see_nor_reach_another_keys_voices_personas_and_transcripts(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=f"{KEY_A},{KEY_B}", CHORUS_PLACEMENT_WAIT_S="0")
    with client(gateway, KEY_A) as a, client(gateway, KEY_B) as b:
        voice = upload_voice(b, SPEECH_WAV.read_bytes()).json()["id"]
        persona = b.post("/v1/personas", json={"name": "theirs", "primer": "a secret primer"}).json()["id"]
        session = asyncio.run(open_and_refuse(gateway, KEY_B))

        assert a.get("/v1/voices").json()["items"] == []
        assert [p for p in a.get("/v1/personas").json()["items"] if not p["builtin"]] == []
        assert_not_found(a.get(f"/v1/voices/{voice}"))
        assert_not_found(a.post(f"/v1/voices/{voice}/preview", json={"text": "hello"}))
        assert_not_found(a.delete(f"/v1/voices/{voice}"))
        assert_not_found(a.get(f"/v1/personas/{persona}"))
        assert_not_found(a.put(f"/v1/personas/{persona}", json={"name": "mine now"}))
        assert_not_found(a.delete(f"/v1/personas/{persona}"))
        assert_not_found(a.get(f"/v1/sessions/{session}"))
        assert_not_found(a.get(f"/v1/sessions/{session}/transcript"))
        assert session not in [s["id"] for s in a.get("/v1/sessions").json()["items"]]

        # Nothing of theirs was changed or removed by those attempts.
        assert b.get(f"/v1/voices/{voice}").status_code == 200
        assert b.get(f"/v1/personas/{persona}").json()["name"] == "theirs"
        assert b.get(f"/v1/sessions/{session}/transcript").json()["session_id"] == session

    # Nor used in a conversation: refused by the gateway when asked for, exactly like a missing one.
    refusal = asyncio.run(refused_at_open(gateway, KEY_A, f"persona={persona}"))
    assert refusal == (1008, "invalid_request", f"unknown persona {persona!r}")
    code, reason, detail = asyncio.run(refused_at_open(gateway, KEY_A, f"voice=profile:{voice}"))
    assert (code, reason) == (1008, "invalid_request") and detail.startswith(
        f"unknown voice 'profile:{voice}'"
    )
    error = asyncio.run(realtime_voice_update(gateway, KEY_A, f"profile:{voice}"))
    assert error["code"] == "invalid_request" and error["message"].startswith(
        f"unknown voice 'profile:{voice}'"
    )


async def realtime_voice_update(gateway: GatewayProcess, key: str, voice: str) -> dict[str, Any]:
    """The error event a realtime `session.update` to `voice` gets."""
    async with connect(
        f"{gateway.ws_url}/v1/realtime", additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "session.created"
        await ws.send(
            json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": voice}}}})
        )
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert event["type"] == "error", event
        error: dict[str, Any] = event["error"]
        return error


async def refused_at_open(gateway: GatewayProcess, key: str, query: str) -> tuple[int, str, str]:
    """A conversation refused before it starts: (close code, close reason, the error frame's text)."""
    async with connect(
        f"{gateway.ws_url}/api/chat?{query}", additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        first = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(first, bytes) and first[0] == 0x05, first
        await ws.wait_closed()
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or "", first[1:].decode()


# --- quotas --------------------------------------------------------------------------------------------


def test_past_the_voice_quota_an_upload_is_refused_before_its_body_is_read(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=f"{KEY_A},{KEY_B}", CHORUS_MAX_VOICES_PER_KEY="1")
    with client(gateway, KEY_A) as a, client(gateway, KEY_B) as b:
        first = upload_voice(a, SPEECH_WAV.read_bytes())
        assert first.status_code == 201, first.text
        assert_quota_problem(upload_voice(a, SPEECH_WAV.read_bytes()), "voices", 1, 1)
        # Not audio at all: a 415 had it been read; the quota answers first.
        assert_quota_problem(upload_voice(a, b"not audio" * 1000), "voices", 1, 1)
        assert upload_voice(b, SPEECH_WAV.read_bytes()).status_code == 201, "the quota is per key"
        assert a.delete(f"/v1/voices/{first.json()['id']}").status_code == 204
        assert upload_voice(a, SPEECH_WAV.read_bytes()).status_code == 201, "a deleted voice frees its place"
        assert len(a.get("/v1/voices").json()["items"]) == 1
        metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'chorus_limit_rejections_total{limit="voices_per_key"} 2.0' in metrics


def test_past_the_persona_quota_creating_one_is_refused_with_the_limit_and_the_count(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=f"{KEY_A},{KEY_B}", CHORUS_MAX_PERSONAS_PER_KEY="2")
    with client(gateway, KEY_A) as a, client(gateway, KEY_B) as b:
        created = [a.post("/v1/personas", json={"name": f"p{i}"}) for i in range(2)]
        assert [r.status_code for r in created] == [201, 201]
        assert_quota_problem(a.post("/v1/personas", json={"name": "third"}), "personas", 2, 2)
        assert b.post("/v1/personas", json={"name": "theirs"}).status_code == 201, "the quota is per key"
        assert a.put(f"/v1/personas/{created[0].json()['id']}", json={"name": "renamed"}).status_code == 200
        assert a.delete(f"/v1/personas/{created[0].json()['id']}").status_code == 204
        assert a.post("/v1/personas", json={"name": "third"}).status_code == 201
        own = [p for p in a.get("/v1/personas").json()["items"] if not p["builtin"]]
        assert sorted(p["name"] for p in own) == ["p1", "third"]


async def open_and_refuse(gateway: GatewayProcess, key: str) -> str:
    """A conversation that starts (its transcript begins) and is refused for want of a dialogue worker."""
    async with connect(
        f"{gateway.ws_url}/api/chat?voice=moshiko", additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        first = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(first, bytes) and first[0] == 0x05, first  # an error: no capacity
        assert ws.response is not None
        return ws.response.headers["x-chorus-session-id"]


def test_a_session_past_the_transcript_quota_deletes_the_keys_oldest_transcripts_and_is_not_refused(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(
        CHORUS_API_KEYS=f"{KEY_A},{KEY_B}",
        CHORUS_MAX_TRANSCRIPTS_PER_KEY="2",
        CHORUS_MAX_SESSIONS_PER_KEY="2",
        CHORUS_PLACEMENT_WAIT_S="0",
    )

    async def sessions() -> tuple[list[str], str]:
        mine = [await open_and_refuse(gateway, KEY_A) for _ in range(4)]
        return mine, await open_and_refuse(gateway, KEY_B)

    mine, theirs = asyncio.run(sessions())
    stored = {p.name for p in (gateway.data_dir / "transcripts").iterdir()}
    assert stored == {*mine[-2:], theirs}, "the key's newest two, and the other key's"
    with client(gateway, KEY_A) as a:
        assert a.get(f"/v1/sessions/{mine[0]}/transcript").status_code == 404
        assert a.get(f"/v1/sessions/{mine[-1]}/transcript").json()["session_id"] == mine[-1]
    assert "deleted the oldest transcripts of an owner past its quota" in gateway.log_text()


def test_a_transcript_quota_below_the_live_session_limit_is_a_start_up_error(
    start_gateway: StartGateway,
) -> None:
    """Pruning would delete the transcripts of conversations still going on: the gateway does not start."""
    gateway = start_gateway(
        wait=False, CHORUS_MAX_TRANSCRIPTS_PER_KEY="3", CHORUS_MAX_SESSIONS_PER_KEY="4", CHORUS_API_KEYS=KEY_A
    )
    assert gateway.process.wait(60) != 0
    assert "CHORUS_MAX_TRANSCRIPTS_PER_KEY (3) must be at least CHORUS_MAX_SESSIONS_PER_KEY (4)" in (
        gateway.log_text()
    )


# --- listings read only the caller's index -----------------------------------------------------------


async def store_other_tenants(data_dir: Path) -> list[Path]:
    """Voices and personas of other tenants, written by the stores as the gateway writes them. Returns
    every file and folder of theirs."""
    storage = LocalStorage(data_dir)
    voices, personas = VoiceProfileStore(storage), PersonaStore(storage)
    clip = np.zeros(2400, dtype=np.float32)
    theirs: list[Path] = []
    for tenant in range(OTHER_TENANTS):
        owner = owner_of(KEY_B) if tenant == 0 else f"{tenant:016x}"
        for _ in range(OBJECTS_EACH):
            profile = VoiceProfile(
                id=new_profile_id(), owner=owner, name="theirs", duration_s=0.1, speech_s=0.1, consent=True
            )
            await voices.create(profile, clip)
            persona = await personas.create(owner, PersonaFields(name="theirs"))
            theirs += [data_dir / "voices" / profile.id, data_dir / "personas" / f"{persona.id}.json"]
        theirs.append(data_dir / "owners" / owner)
    return theirs


def folders_to_watch(data_dir: Path, theirs: list[Path]) -> list[Path]:
    """The object folders, every voice folder, and every owner's index folders (the caller's too)."""
    owners = [p for p in (data_dir / "owners").iterdir()]
    index_folders = [p / kind for p in owners for kind in ("voices", "personas") if (p / kind).is_dir()]
    voice_folders = [p for p in (data_dir / "voices").iterdir() if p.is_dir()]
    return [
        data_dir / "voices",
        data_dir / "personas",
        data_dir / "owners",
        *owners,
        *index_folders,
        *voice_folders,
    ]


def listing_ms(http: httpx.Client, path: str, times: int = 7) -> float:
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        assert http.get(path).status_code == 200
        durations.append((time.perf_counter() - started) * 1000)
    return statistics.median(durations)


def test_listing_voices_and_personas_opens_no_file_of_another_tenant(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=f"{KEY_A},{KEY_B}")
    data_dir, me = gateway.data_dir, owner_of(KEY_A)
    with client(gateway, KEY_A) as a:
        my_voice = upload_voice(a, SPEECH_WAV.read_bytes()).json()["id"]
        my_personas = [a.post("/v1/personas", json={"name": f"mine {i}"}).json()["id"] for i in range(2)]
        alone = {path: listing_ms(a, path) for path in ("/v1/voices", "/v1/personas")}
        theirs = asyncio.run(store_other_tenants(data_dir))

        with FileAccessWatch() as watch:
            watch.watch(*folders_to_watch(data_dir, theirs))
            watch.accessed()
            voices = a.get("/v1/voices").json()["items"]
            personas = a.get("/v1/personas").json()["items"]
            seen = watch.accessed()
        crowded = {path: listing_ms(a, path) for path in ("/v1/voices", "/v1/personas")}

    assert [v["id"] for v in voices] == [my_voice]
    assert sorted(p["id"] for p in personas if not p["builtin"]) == sorted(my_personas)
    opened_of_theirs = sorted(
        str(p.relative_to(data_dir)) for p in seen if any(p == t or p.is_relative_to(t) for t in theirs)
    )
    assert opened_of_theirs == [], "another tenant's file or folder was opened"
    assert data_dir / "voices" not in seen and data_dir / "personas" not in seen, (
        "no folder of all tenants is listed"
    )
    # The watch works: the caller's own index and objects were seen being read.
    assert data_dir / "owners" / me / "voices" in seen and data_dir / "owners" / me / "personas" in seen
    assert data_dir / "voices" / my_voice / "profile.json" in seen
    assert {data_dir / "personas" / f"{p}.json" for p in my_personas} <= seen

    others = OTHER_TENANTS * OBJECTS_EACH
    figures: dict[str, Any] = {
        "other_tenants": OTHER_TENANTS,
        "their_voices": others,
        "their_personas": others,
        "files_of_theirs_opened": len(opened_of_theirs),
        "median_listing_ms_alone": {k: round(v, 1) for k, v in alone.items()},
        "median_listing_ms_among_them": {k: round(v, 1) for k, v in crowded.items()},
    }
    print(json.dumps(figures))


async def test_a_key_holds_a_bounded_number_of_sockets_open(start_gateway: StartGateway) -> None:
    """A realtime socket holds no session until its first audio, so the session limit does not bound idle
    ones: without a bound of its own one key could open sockets until the gateway's memory runs out."""
    gateway = start_gateway(CHORUS_API_KEYS=f"{KEY_A},{KEY_B}", CHORUS_WS_MAX_SOCKETS_PER_KEY="20")

    async def open_realtime(key: str) -> tuple[ClientConnection, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key}"}
        ws = await connect(f"{gateway.ws_url}/v1/realtime", additional_headers=headers, open_timeout=10)
        return ws, json.loads(await asyncio.wait_for(ws.recv(), 10))

    idle_mb = gateway.rss_mb()
    opened = [await open_realtime(KEY_A) for _ in range(20)]
    assert all(first["type"] == "session.created" for _, first in opened)
    per_socket_kb = (gateway.rss_mb() - idle_mb) * 1024 / 20
    print(f"\nan idle realtime socket: ~{per_socket_kb:.0f} KB of gateway memory")

    refused, error = await open_realtime(KEY_A)
    await asyncio.wait_for(refused.wait_closed(), 10)
    assert error["type"] == "error" and error["error"]["code"] == "rate_limited", error
    assert "20 WebSockets open on this gateway" in error["error"]["message"]
    assert (refused.close_code, refused.close_reason) == (1013, "rate_limited")
    chat = await connect(
        f"{gateway.ws_url}/api/chat", additional_headers={"Authorization": f"Bearer {KEY_A}"}, open_timeout=10
    )
    assert (await asyncio.wait_for(chat.recv(), 10))[:1] == b"\x05", "both protocols count"
    await asyncio.wait_for(chat.wait_closed(), 10)
    assert chat.close_code == 1013

    other, first = await open_realtime(KEY_B)
    assert first["type"] == "session.created", "another key is not affected"
    await opened[0][0].close()
    again, first = await open_realtime(KEY_A)
    assert first["type"] == "session.created", "a closed socket gives its place back"
    for ws in [again, other, *(ws for ws, _ in opened[1:])]:
        await ws.close()
