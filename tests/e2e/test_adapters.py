"""Fine-tuned personas end to end: an adapter uploaded through the gateway, a persona naming it, and two
conversations at once on the one dialogue worker, one with the adapter and one without."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save
from websockets.asyncio.client import connect

from chorus.devtools.lora_adapter import write_random_adapter
from services.gateway.protocols.realtime import REFUSAL_TOLD_EVERY_S
from shared.bus import Bus
from shared.presence import list_workers
from shared.streams import StreamNames
from tests.support.audio import speech_like
from tests.support.clients import MoshiClient, RealtimeClient
from tests.support.stack import ChorusStack
from tests.support.waiting import wait_until


def upload(http: httpx.AsyncClient, data: bytes, name: str = "pirate") -> httpx.Response:
    files = {"file": ("lora.safetensors", data, "application/octet-stream")}
    return http.post("/v1/adapters", files=files, data={"name": name})  # type: ignore[return-value]


@pytest.fixture(scope="module")
def adapter_file(stack: ChorusStack, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("adapter") / "lora.safetensors"
    return write_random_adapter(path, stack.checkpoints / "moshi", rank=8).read_bytes()


async def held_adapters(stack: ChorusStack) -> set[str]:
    bus = await Bus.connect(stack.redis_url, StreamNames(stack.key_prefix))
    try:
        return {a for w in await list_workers(bus, "dialogue") for a in w.fields.get("adapters", "").split()}
    finally:
        await bus.close()


async def test_an_adapter_persona_and_a_plain_session_talk_at_once_on_one_worker(
    stack: ChorusStack, adapter_file: bytes
) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        created = await upload(http, adapter_file)
        assert created.status_code == 201, created.text
        adapter = created.json()["id"]
        persona = await http.post(
            "/v1/personas", json={"name": "Tuned", "voice": "moshiko", "adapter": adapter}
        )
        assert persona.status_code == 201, persona.text

        tuned = await MoshiClient.open(stack.ws_url, voice="moshiko", persona=persona.json()["id"])
        plain = await MoshiClient.open(stack.ws_url, voice="moshiko")
        await asyncio.gather(*(c.send_audio(speech_like(2.0)) for c in (tuned, plain)))
        await asyncio.gather(*(c.drain(1.0) for c in (tuned, plain)))
        for client in (tuned, plain):
            await client.ws.close()
            assert client.audio_seconds > 1.0 and not client.errors, client.errors
        assert adapter in await held_adapters(stack), "the worker holds the adapter it loaded"

        refused = await http.delete(f"/v1/adapters/{adapter}")
        assert refused.status_code == 409 and refused.json()["reason"] == "in_use"
        assert (await http.delete(f"/v1/personas/{persona.json()['id']}")).status_code == 204
        await wait_until(lambda: _ended(http, tuned.session_id), "the closed session to end")
        assert (await http.delete(f"/v1/adapters/{adapter}")).status_code == 204


async def test_uploads_that_are_no_adapter_for_the_model_are_refused(
    stack: ChorusStack, adapter_file: bytes, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        await wait_until(lambda: _layers_published(http, adapter_file), "no worker published its layers", 60)
        assert (await upload(http, b"not a safetensors file at all")).status_code == 415
        header_length = int.from_bytes(adapter_file[:8], "little")
        truncated = adapter_file[: 8 + header_length]  # the header promises data that is not there
        assert (await upload(http, truncated)).status_code == 415
        other_model = {
            "text_linear.lora_A.weight": torch.zeros(8, 63),
            "text_linear.lora_B.weight": torch.zeros(9, 8),
        }
        misfit = await upload(http, save(other_model))
        assert misfit.status_code == 422 and misfit.json()["tensor"] == "text_linear.lora_A.weight", (
            misfit.text
        )
        assert (await http.get("/v1/adapters")).json()["items"] == []


async def _layers_published(http: httpx.AsyncClient, adapter_file: bytes) -> bool:
    """The dialogue worker published its model's layers: a good upload goes through (and is removed)."""
    response = await upload(http, adapter_file, "probe")
    if response.status_code == 201:
        assert (await http.delete(f"/v1/adapters/{response.json()['id']}")).status_code == 204
    return response.status_code == 201


async def test_a_realtime_session_picks_an_adapter_with_chorus_adapter(
    stack: ChorusStack, adapter_file: bytes
) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        created = await upload(http, adapter_file, "realtime")
        assert created.status_code == 201, created.text
        adapter = created.json()["id"]
        client = await RealtimeClient.open(stack.ws_url)
        await client.send({"type": "session.update", "session": {"chorus_adapter": "adapter_nope"}})
        error = await client.wait_for("error")
        assert error["error"]["code"] == "invalid_request" and "adapter_nope" in error["error"]["message"]
        await client.send({"type": "session.update", "session": {"chorus_adapter": adapter}})
        await client.wait_for("session.updated")
        await client.append(speech_like(2.0))
        await client.drain(1.0)
        assert client.audio_seconds() > 0.5
        assert adapter in await held_adapters(stack), "the session's start named it: the worker loaded it"

        # Mid-session: another adapter, loaded by the worker for this session's row, which goes on.
        other = (await upload(http, adapter_file, "realtime-2")).json()["id"]
        heard, seen = client.audio_seconds(), len(client.events)
        await client.send({"type": "session.update", "session": {"chorus_adapter": other}})
        await client.wait_for("session.updated")
        await wait_until(lambda: _holds(stack, other), "the worker to load the session's new adapter", 30)

        async def switched_away() -> bool:  # refused (409) until the worker's rows run the new one
            return (await http.delete(f"/v1/adapters/{adapter}")).status_code == 204

        await wait_until(switched_away, "the adapter switched away from to be deletable, the session live")
        await client.append(speech_like(2.0))
        await client.drain(1.0)
        await client.ws.close()
        assert client.audio_seconds() > heard + 0.5
        assert not [e for e in client.events[seen:] if e["type"] == "error"], client.events[seen:]
        assert "session adapter switched" in stack.log_tail("dialogue", 50_000)
        sid = client.events[0]["session"]["id"]
        await wait_until(lambda: _ended(http, sid), "the closed session to end")
        assert (await http.delete(f"/v1/adapters/{other}")).status_code == 204


async def test_an_adapter_no_worker_can_take_is_refused_for_what_it_is_and_not_retried(
    stack: ChorusStack, tmp_path: Path
) -> None:
    """A rank-16 adapter (the gateway takes ranks up to 1024; this worker serves 8): its session's start is
    refused by the worker as `unprocessable`, naming the rank (it was reported as `no_capacity`, which
    clients retry), before the worker reads the file. On /v1/realtime later audio is answered the same,
    without another session start (one per append before), while the session asks for the same, and at
    most once a second (an error per append before: 12 a second); what was sent while the start was
    placed is still handled (it was lost with the refusal: an update never answered); a session.update
    that changes it (here the instructions) starts again. /api/chat closes with 1008: what the client
    asked for cannot be served (it was 1011, an internal error)."""
    refusal = "adapter rank 16 is above this worker's 8"
    wide = write_random_adapter(tmp_path / "wide.safetensors", stack.checkpoints / "moshi", rank=16)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        created = await upload(http, wide.read_bytes(), "wide")
        assert created.status_code == 201, created.text
        adapter = created.json()["id"]
        client = await RealtimeClient.open(stack.ws_url, adapter=adapter)
        for _ in range(2):
            for _ in range(6):  # a burst, the rest sent while the first's start is placed: one error
                await client.append_frame(speech_like(0.08))
            # An update that changes nothing starts nothing; its answer comes after any error of the burst.
            await client.send({"type": "session.update", "session": {"chorus_events": True}})
            client.events.remove(await client.wait_for("session.updated"))
            errors = client.of_type("error")
            assert len(errors) == 1, errors
            assert errors[0]["error"]["code"] == "unprocessable" and refusal in errors[0]["error"]["message"]
            client.events.remove(errors[0])
            await asyncio.sleep(REFUSAL_TOLD_EVERY_S)  # told again once the second has passed
        assert stack.log_tail("dialogue", 200_000).count(refusal) == 1, "one start: later audio started none"

        await client.send({"type": "session.update", "session": {"instructions": "Speak like a pirate."}})
        await client.wait_for("session.updated")
        await client.append_frame(speech_like(0.08))
        assert (await client.wait_for("error"))["error"]["code"] == "unprocessable"
        await wait_until(lambda: _logged(stack, refusal, 2), "the changed session's new start")
        await client.ws.close()

        async with connect(f"{stack.ws_url}/api/chat?voice=moshiko&adapter={adapter}") as ws:
            said = await asyncio.wait_for(ws.recv(), 30)
            await ws.wait_closed()
        assert isinstance(said, bytes) and said[0] == 5 and refusal.encode() in said, said
        assert ws.close_code == 1008 and ws.close_reason == "unprocessable", (ws.close_code, ws.close_reason)


async def test_a_realtime_sockets_query_is_checked_at_the_handshake(stack: ChorusStack) -> None:
    """`?adapter=` and `?voice=` are checked as `session.update` checks them, before anything else: an
    unknown adapter came back in `session.created` (and a session.update naming it again skipped the
    check), `?voice=` was ignored; a setting given twice is refused, not picked from."""
    for query, why in [
        ("adapter=adapter_nope", "adapter_nope"),
        ("voice=nobody", "unknown voice"),
        ("voice=moshiko&voice=moshika", "voice is given 2 times"),
        ("adapter=adapter_a&adapter=adapter_b", "adapter is given 2 times"),
    ]:
        async with connect(f"{stack.ws_url}/v1/realtime?{query}", open_timeout=30) as ws:
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert event["type"] == "error" and event["error"]["code"] == "invalid_request", (query, event)
            assert why in event["error"]["message"], (query, event)
            await ws.wait_closed()
            assert ws.close_code == 1008, query
    client = await RealtimeClient.open(stack.ws_url, voice="catalog:alba")
    created = client.of_type("session.created")[0]["session"]
    assert created["audio"]["output"]["voice"] == "catalog:alba", created
    await client.ws.close()


async def _logged(stack: ChorusStack, text: str, times: int) -> bool:
    return stack.log_tail("dialogue", 200_000).count(text) == times


async def _ended(http: httpx.AsyncClient, sid: str) -> bool:
    """The gateway ends a session once its socket closed; until then the adapter it runs is not deleted."""
    return sid not in {s["id"] for s in (await http.get("/v1/sessions")).json()["items"]}


async def _holds(stack: ChorusStack, adapter: str) -> bool:
    return adapter in await held_adapters(stack)
