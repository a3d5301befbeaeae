"""A persona's default voice: a session speaks in it when its client names no voice, on both sockets; a
voice the client names (`?voice=`, a Realtime `model` that is one of Moshi's) comes first. Stored
personas from before personas' voices were used keep the sessions they had. The gateway is a real
process on a real Redis; the REST calls and sockets are a client's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from services.gateway.persona_store import PersonaFields, PersonaStore
from shared.bus import Bus
from shared.presence import WorkerPresence
from shared.storage import LocalStorage
from shared.streams import StreamNames
from tests.security.conftest import GatewayProcess, launch_gateway, stop_gateway
from tests.support.waiting import wait_until


async def realtime_voice(gw: GatewayProcess, query: str) -> str:
    """The voice `session.created` says a Realtime socket opened with `query` starts with."""
    async with connect(f"{gw.ws_url}/v1/realtime?{query}", open_timeout=10) as ws:
        created = json.loads(await ws.recv())
    assert created["type"] == "session.created", created
    voice: str = created["session"]["audio"]["output"]["voice"]
    return voice


async def moshi_voice(gw: GatewayProcess, client: httpx.AsyncClient, query: str) -> str:
    """The voice a Moshi socket opened with `query` started its session with (no dialogue worker runs:
    the session waits to be placed, and `/v1/sessions/{id}` shows it meanwhile)."""
    async with connect(f"{gw.ws_url}/api/chat?{query}", open_timeout=10) as ws:
        assert ws.response is not None
        session_id = ws.response.headers["x-chorus-session-id"]

        async def stored() -> bool:  # its voice and persona are in from the first: its count
            return (await client.get(f"/v1/sessions/{session_id}")).status_code == 200

        await wait_until(stored, "the session to be stored", 10)
        voice: str = (await client.get(f"/v1/sessions/{session_id}")).json()["voice"]
    return voice


async def test_a_session_speaks_in_its_personas_voice_unless_its_client_names_one(
    redis_url: str, tmp_path: Path
) -> None:
    gw = launch_gateway(redis_url, tmp_path, "persona-voice")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            made = await client.post("/v1/personas", json={"name": "Kay", "voice": "moshika"})
            assert made.status_code == 201, made.text
            kay = made.json()["id"]
            plain = await client.post("/v1/personas", json={"name": "Plain"})
            assert plain.status_code == 201 and plain.json()["voice"] is None, plain.text
            listed = (await client.get("/v1/personas")).json()["items"]
            realtime = {
                query: await realtime_voice(gw, query)
                for query in (
                    f"persona={kay}",
                    f"persona={kay}&model=gpt-realtime",  # not one of Moshi's: the persona's voice
                    f"persona={kay}&model=moshiko",  # Moshi's model named: its own voice
                    f"persona={kay}&voice=moshiko",
                    f"persona={plain.json()['id']}",
                    "persona=storyteller",
                    "",
                )
            }
            promised = {}
            for asked in ({}, {"model": "moshiko"}):  # a client secret's session, then one naming a model
                minted = await client.post("/v1/realtime/client_secrets", json={"session": asked})
                assert minted.status_code == 200, minted.text
                promised[str(asked)] = minted.json()["session"]["audio"]["output"].get("voice")
                query = f"persona={kay}&client_secret={minted.json()['value']}"
                realtime[f"secret {asked}"] = await realtime_voice(gw, query)
            moshi = {
                query: await moshi_voice(gw, client, query)
                for query in (f"persona={kay}", f"persona={kay}&voice=moshiko", "persona=tutor", "")
            }
    finally:
        stop_gateway(gw)
    assert realtime == {
        f"persona={kay}": "moshika",
        f"persona={kay}&model=gpt-realtime": "moshika",
        f"persona={kay}&model=moshiko": "moshiko",
        f"persona={kay}&voice=moshiko": "moshiko",
        f"persona={plain.json()['id']}": "moshiko",
        "persona=storyteller": "moshiko",
        "": "moshiko",
        "secret {}": "moshika",
        "secret {'model': 'moshiko'}": "moshiko",
    }
    assert moshi == {
        f"persona={kay}": "moshika",
        f"persona={kay}&voice=moshiko": "moshiko",
        "persona=tutor": "moshiko",
        "": "moshiko",
    }
    assert all(p["voice"] is None for p in listed if p["builtin"]), "built-ins name no voice: the model's own"
    assert promised == {"{}": None, "{'model': 'moshiko'}": "moshiko"}, "a secret promises only what it names"


async def test_a_session_naming_no_voice_speaks_in_the_native_voice_of_the_model_that_runs(
    redis_url: str, tmp_path: Path
) -> None:
    """moshiko by default; moshika where every dialogue worker runs moshika (moshiko would be refused
    there, `no_model_worker`)."""
    gw = launch_gateway(redis_url, tmp_path, "served-voice")
    bus = await Bus.connect(redis_url, StreamNames(gw.key_prefix))
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            voices = []
            for models in (("moshika",), ("moshika", "moshiko")):
                for n, model in enumerate(models):
                    fields = {"model": model, "free_slots": 1}
                    await WorkerPresence(
                        bus, "dialogue", f"w{n}", ttl_s=60, interval_s=5, describe=lambda f=fields: f
                    ).beat()
                voices.append(
                    (
                        await realtime_voice(gw, "persona=assistant"),
                        await moshi_voice(gw, client, "persona=assistant"),
                    )
                )
    finally:
        await bus.close()
        stop_gateway(gw)
    assert voices == [("moshika", "moshika"), ("moshiko", "moshiko")]


async def test_a_persona_stored_before_voices_were_used_keeps_the_voice_its_sessions_had(
    tmp_path: Path,
) -> None:
    """Before, `voice` was always stored ("moshika" when the client gave none) and never used: such a
    record reads as naming none. Any other stored voice was the client's own choice, and is kept; what is
    written now says its format and reads back as written."""
    storage = LocalStorage(tmp_path)
    store = PersonaStore(storage)
    old = {"name": "Old", "primer": "", "greeting": "", "sampling": {}, "owner": "alice"}
    await storage.put(
        "personas/p_defaulted.json", json.dumps({**old, "id": "p_defaulted", "voice": "moshika"}).encode()
    )
    await storage.put(
        "personas/p_chosen.json", json.dumps({**old, "id": "p_chosen", "voice": "moshiko"}).encode()
    )
    assert await store.voice_of("alice", "p_defaulted") is None
    assert await store.voice_of("alice", "p_chosen") == "moshiko"
    assert await store.voice_of("bob", "p_chosen") is None, "another key's persona names nothing"
    replaced = await store.replace("alice", "p_defaulted", PersonaFields(name="Old", voice="moshika"))
    assert replaced.voice == "moshika"
    assert json.loads(await storage.get("personas/p_defaulted.json"))["format"] == 2
    assert await store.voice_of("alice", "p_defaulted") == "moshika", "chosen now: used"


async def test_a_stored_persona_that_does_not_parse_names_no_voice_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The socket opens (its start then refuses the persona); the operator is told which file is bad."""
    storage = LocalStorage(tmp_path)
    await storage.put("personas/p_broken.json", b"{not json")
    (tmp_path / "personas" / "p_unreadable.json").mkdir()  # the volume refuses the read (EISDIR here)
    with caplog.at_level(logging.ERROR):
        assert await PersonaStore(storage).voice_of("alice", "p_broken") is None
        assert await PersonaStore(storage).voice_of("alice", "p_unreadable") is None
    assert [(r.getMessage(), r.persona_id) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("a stored persona cannot be read", "'p_broken'"),
        ("a stored persona cannot be read", "'p_unreadable'"),
    ]
