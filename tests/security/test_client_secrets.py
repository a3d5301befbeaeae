"""Client secrets against a real gateway process: minted with the official `openai` SDK in OpenAI's shape,
usable once, within a minute, as their key's owner, on both WebSockets and nowhere else; and the bundled
page opens its sockets with them, never with the key in a URL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI, AuthenticationError
from websockets.asyncio.client import ClientConnection, connect

from tests.security.conftest import GatewayProcess, StartGateway
from tests.support.audio import SPEECH_WAV
from tests.support.browser import MEDIA_FLAGS, chromium_page, needs_chromium

ALICE, BOB = "key-alice", "key-bob"
KEYS = f"{ALICE},{BOB}"


def sdk(gateway: GatewayProcess, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key)


async def mint(gateway: GatewayProcess, key: str = ALICE, **session: Any) -> str:
    created = await sdk(gateway, key).realtime.client_secrets.create(
        session={"type": "realtime", **session}  # type: ignore[typeddict-item]
    )
    return created.value


async def first_event(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def test_the_official_sdk_mints_a_secret_in_openais_shape(
    start_gateway: StartGateway, redis_url: str
) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEYS)
    created = await sdk(gateway, ALICE).realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 600},
        session={
            "type": "realtime",
            "model": "moshiko",
            "instructions": "You are terse.",
            "audio": {"output": {"voice": "moshika"}},
        },
    )
    assert created.value.startswith("ek_")
    assert 0 < created.expires_at - time.time() <= 61, "at most a minute, whatever was asked"
    assert created.session.type == "realtime"
    assert created.session.audio and created.session.audio.output
    assert created.session.audio.output.voice == "moshika"
    assert created.session.model == "moshika", "the model the socket runs: its native voice's own"
    # Redis holds the secret's digest with that TTL, never the secret itself.
    digest = hashlib.sha256(created.value.encode()).hexdigest()
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttl = await client.ttl(f"{gateway.key_prefix}client_secret:{digest}")
        assert 0 < ttl <= 60
        stored = [await client.get(k) async for k in client.scan_iter(f"{gateway.key_prefix}client_secret:*")]
        assert stored and all(created.value.encode() not in value for value in stored if value)
    finally:
        await client.aclose()
    shorter = await sdk(gateway, ALICE).realtime.client_secrets.create(expires_after={"seconds": 10})
    assert shorter.expires_at - time.time() <= 11
    # Another model's name answers the model the socket will run (as `?model=` does), not the name.
    other = await sdk(gateway, ALICE).realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-4o-realtime"}
    )
    assert other.session.model == "moshiko"


async def test_a_secret_opens_one_realtime_socket_with_its_session_config(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEYS)
    secret = await mint(gateway, instructions="You are terse.", audio={"output": {"voice": "moshika"}})
    async with connect(f"{gateway.ws_url}/v1/realtime?client_secret={secret}", open_timeout=10) as ws:
        created = await first_event(ws)
    assert created["type"] == "session.created"
    assert created["session"]["instructions"] == "You are terse."
    assert created["session"]["audio"]["output"]["voice"] == "moshika"

    async with connect(f"{gateway.ws_url}/v1/realtime?client_secret={secret}", open_timeout=10) as ws:
        refused = await first_event(ws)
        await ws.wait_closed()
    assert refused["type"] == "error" and refused["error"]["code"] == "unauthorized"
    assert "already used" in refused["error"]["message"]
    assert ws.close_code == 1008


async def test_an_expired_secret_opens_nothing(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEYS, CHORUS_CLIENT_SECRET_TTL_S="1")
    created = await sdk(gateway, ALICE).realtime.client_secrets.create(expires_after={"seconds": 60})
    assert created.expires_at - time.time() <= 2, "capped at CHORUS_CLIENT_SECRET_TTL_S"
    await asyncio.sleep(created.expires_at - time.time() + 1)
    async with connect(f"{gateway.ws_url}/v1/realtime?client_secret={created.value}", open_timeout=10) as ws:
        refused = await first_event(ws)
        await ws.wait_closed()
    assert refused["error"]["code"] == "unauthorized" and "expired" in refused["error"]["message"]
    assert ws.close_code == 1008


async def test_the_sdk_connects_with_a_secret_as_its_bearer_token(start_gateway: StartGateway) -> None:
    """What a browser or app given only the secret does: the SDK sends it as `Authorization: Bearer`."""
    gateway = start_gateway(CHORUS_API_KEYS=KEYS)
    secret = await mint(gateway)
    async with sdk(gateway, secret).realtime.connect(model="moshiko") as connection:
        event = await asyncio.wait_for(connection.recv(), 10)
    assert event.type == "session.created"


async def test_a_secret_opens_a_moshi_chat_socket_as_its_keys_owner(start_gateway: StartGateway) -> None:
    """Alice's persona is found through Alice's secret and not through Bob's: the secret is its owner's."""
    gateway = start_gateway(CHORUS_API_KEYS=KEYS, CHORUS_PLACEMENT_WAIT_S="0.5")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as rest:
        created = await rest.post(
            "/v1/personas",
            json={"name": "Alice's", "primer": "hello"},
            headers={"Authorization": f"Bearer {ALICE}"},
        )
    persona = created.json()["id"]

    async def open_chat(key: str) -> tuple[str | None, bytes]:
        secret = await mint(gateway, key)
        headers = {"Authorization": f"Bearer {secret}"}
        url = f"{gateway.ws_url}/api/chat?persona={persona}"
        async with connect(url, additional_headers=headers, open_timeout=10) as ws:
            assert ws.response is not None
            first = await ws.recv()
        assert isinstance(first, bytes)
        return ws.response.headers.get("x-chorus-session-id"), first

    session_id, _ = await open_chat(ALICE)
    assert session_id, "accepted as Alice: a session was opened with her persona"
    session_id, refused = await open_chat(BOB)
    assert session_id is None
    assert refused[0] == 0x05 and b"unknown persona" in refused


async def upload_voice(rest: httpx.AsyncClient) -> str:
    files = {"file": ("clip.wav", SPEECH_WAV.read_bytes())}
    created = await rest.post("/v1/voices", files=files, data={"name": "mine", "consent": "true"})
    assert created.status_code == 201, created.text
    voice: str = created.json()["voice"]
    return voice


async def test_a_secret_never_carries_another_keys_voice(start_gateway: StartGateway) -> None:
    """A secret's voice is checked like a `session.update`'s: another key's profile is refused when the
    secret is minted, and a profile gone by the time the secret is used refuses the socket."""
    gateway = start_gateway(CHORUS_API_KEYS=KEYS)
    alice = httpx.AsyncClient(base_url=gateway.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    bob = httpx.AsyncClient(base_url=gateway.url, headers={"Authorization": f"Bearer {BOB}"}, timeout=30)
    async with alice, bob:
        bobs_voice = await upload_voice(bob)
        session = {"type": "realtime", "audio": {"output": {"voice": bobs_voice}}}
        refused = await alice.post("/v1/realtime/client_secrets", json={"session": session})
        assert refused.status_code == 400, refused.text
        assert refused.json()["code"] == "invalid_request"
        assert f"unknown voice {bobs_voice!r}" in refused.json()["detail"]

        own_voice = await upload_voice(alice)
        secret = await mint(gateway, ALICE, audio={"output": {"voice": own_voice}})
        assert (await alice.delete(f"/v1/voices/{own_voice.removeprefix('profile:')}")).status_code == 204
    async with connect(f"{gateway.ws_url}/v1/realtime?client_secret={secret}", open_timeout=10) as ws:
        error = await first_event(ws)
        await ws.wait_closed()
    assert error["type"] == "error" and error["error"]["code"] == "invalid_request", error
    assert error["error"]["message"].startswith(f"unknown voice {own_voice!r}")
    assert (ws.close_code, ws.close_reason) == (1008, "invalid_request")


async def test_a_secret_of_a_revoked_key_opens_nothing(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Revoking a key revokes the secrets minted with it: they are not a way around the keys file."""
    keys = tmp_path / "keys"
    keys.write_text(f"{ALICE}\n{BOB}\n")
    reload_s = 0.2
    gateway = start_gateway(CHORUS_API_KEYS_FILE=str(keys), CHORUS_API_KEYS_RELOAD_S=str(reload_s))
    alices, bobs = await mint(gateway, ALICE), await mint(gateway, BOB)
    keys.write_text(f"{BOB}\n")  # Alice's key revoked
    await asyncio.sleep(reload_s + 0.3)
    async with connect(f"{gateway.ws_url}/v1/realtime?client_secret={alices}", open_timeout=10) as ws:
        error = await first_event(ws)
        await asyncio.wait_for(ws.wait_closed(), 10)
    assert error["type"] == "error" and error["error"]["code"] == "unauthorized", error
    assert "revoked" in error["error"]["message"]
    assert (ws.close_code, ws.close_reason) == (1008, "unauthorized")
    async with connect(f"{gateway.ws_url}/v1/realtime?client_secret={bobs}", open_timeout=10) as ws:
        assert (await first_event(ws))["type"] == "session.created", "Bob's key stands"


async def test_rest_routes_do_not_take_client_secrets(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEYS)
    secret = await mint(gateway)
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=10) as rest:
        assert (await rest.get("/v1/personas")).status_code == 401
        refused = await rest.post("/v1/realtime/client_secrets")
    assert refused.status_code == 401, "a secret cannot mint more secrets"


async def test_minting_needs_a_key(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEYS)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as rest:
        assert (await rest.post("/v1/realtime/client_secrets")).status_code == 401
        with pytest.raises(AuthenticationError):
            await sdk(gateway, "not-a-key").realtime.client_secrets.create()
        bad_voice = await rest.post(
            "/v1/realtime/client_secrets",
            json={"session": {"type": "realtime", "audio": {"output": {"voice": "moshiko\n"}}}},
            headers={"Authorization": f"Bearer {ALICE}"},
        )
    assert bad_voice.status_code == 422


@needs_chromium
async def test_the_bundled_page_opens_its_socket_with_a_secret_not_the_key(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_gateway(CHORUS_API_KEYS=KEYS, CHORUS_PLACEMENT_WAIT_S="30")
    async with chromium_page(tmp_path / "profile", "about:blank", *MEDIA_FLAGS) as page:
        await page.call("Network.enable")
        await page.call("Page.navigate", url=f"{gateway.url}/")
        await page.wait_for("window.chorus && window.chorus.ready === true")
        paste_key = f"const k = document.getElementById('apiKey'); k.value = {ALICE!r}; k.onchange();"
        await page.evaluate(f"(() => {{ {paste_key} }})()")
        await page.evaluate("document.getElementById('start').click()")
        await page.wait_for("window.chorus.sessionId !== null || window.chorus.errors.length > 0")
        state = json.loads(await page.evaluate("JSON.stringify(window.chorus)"))
        await page.evaluate("document.getElementById('stop').click()")
    assert state["errors"] == [] and state["sessionId"].startswith("sess_")
    sockets = [e["params"]["url"] for e in page.events if e["method"] == "Network.webSocketCreated"]
    assert len(sockets) == 1 and "client_secret=ek_" in sockets[0]
    requested = [
        e["params"]["request"]["url"] for e in page.events if e["method"] == "Network.requestWillBeSent"
    ]
    assert requested and all(ALICE not in url for url in requested + sockets), "the key is in no URL"


async def test_a_secrets_model_is_the_voice_of_a_moshi_protocol_socket_that_names_none(
    start_gateway: StartGateway,
) -> None:
    """Found by an attack: a secret minted for `moshika` opened an /api/chat session on moshiko (the
    Realtime socket took the model; this one ignored it), though the mint's answer promised moshika."""
    gateway = start_gateway(CHORUS_API_KEYS=KEYS)
    secret = await mint(gateway, model="moshika")
    headers = {"Authorization": f"Bearer {secret}"}
    async with connect(f"{gateway.ws_url}/api/chat", additional_headers=headers, open_timeout=10) as ws:
        assert ws.response is not None
        session_id = ws.response.headers["x-chorus-session-id"]
        async with httpx.AsyncClient(
            base_url=gateway.url, headers={"Authorization": f"Bearer {ALICE}"}
        ) as rest:
            sessions = (await rest.get("/v1/sessions")).json()["items"]
    assert [(s["id"], s["voice"]) for s in sessions] == [(session_id, "moshika")]
