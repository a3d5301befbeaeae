"""`/v1/adapters` against the real app and redis-server: upload checked against the model's published layer
shapes, owner scoping, the persona field, delete refused while a persona names the adapter."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save
from websockets.asyncio.client import connect

from chorus.devtools.lora_adapter import checkpoint_layers, write_random_adapter
from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint
from services.gateway.auth import ANONYMOUS
from services.gateway.problems import problem_response
from shared.adapter_store import AdapterStore
from shared.errors import Unprocessable
from shared.messages import (
    CONTROL,
    EventName,
    Failure,
    PersonaSpec,
    SessionEvent,
    SessionStart,
    SessionUpdate,
)
from shared.presence import WorkerPresence
from shared.sessions import SessionStore
from shared.storage import LocalStorage
from tests.services.gateway.app_client import gateway_client
from tests.services.gateway.test_session_faults import (
    ERROR,
    SILENCE_80MS,
    Gateway,
    open_session,
    ready,
    running_gateway,
)
from tests.support.openai_conformance import conforming
from tests.support.paths import CHECKPOINT_CACHE
from tests.support.waiting import wait_until

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    checkpoint = write_moshi_checkpoint(CHECKPOINT_CACHE / "moshi")
    path = tmp_path_factory.mktemp("adapter") / "lora.safetensors"
    return write_random_adapter(path, checkpoint, rank=4).read_bytes()


@pytest.fixture
async def client(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    shapes, _ = checkpoint_layers(write_moshi_checkpoint(CHECKPOINT_CACHE / "moshi"))
    await AdapterStore(LocalStorage(tmp_path)).publish_layers("moshiko", shapes)  # as a dialogue worker does
    async with gateway_client(
        redis_url, key_prefix, tmp_path, api_keys="key-alice,key-bob", adapter_max_upload_bytes=1_000_000
    ) as c:
        yield c


def upload(client: httpx.AsyncClient, data: bytes, headers: dict[str, str], **fields: str) -> httpx.Response:
    files = {"file": ("lora.safetensors", io.BytesIO(data), "application/octet-stream")}
    return client.post("/v1/adapters", files=files, data={"name": "pirate", **fields}, headers=headers)  # type: ignore[return-value]


async def test_an_adapter_is_uploaded_listed_and_scoped_to_its_key(
    client: httpx.AsyncClient, adapter_file: bytes
) -> None:
    created = await upload(client, adapter_file, ALICE)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["rank"] == 4 and body["scaling"] == 2.0 and body["model"] == "moshiko"
    assert body["size_bytes"] == len(adapter_file) and "owner" not in body
    aid = body["id"]
    assert [a["id"] for a in (await client.get("/v1/adapters", headers=ALICE)).json()["items"]] == [aid]
    assert (await client.get(f"/v1/adapters/{aid}", headers=ALICE)).json()["name"] == "pirate"
    assert (await client.get(f"/v1/adapters/{aid}", headers=BOB)).status_code == 404
    assert (await client.get("/v1/adapters", headers=BOB)).json()["items"] == []
    assert (await client.delete(f"/v1/adapters/{aid}", headers=BOB)).status_code == 404


async def test_an_adapter_a_persona_names_cannot_be_deleted(
    client: httpx.AsyncClient, adapter_file: bytes
) -> None:
    aid = (await upload(client, adapter_file, ALICE)).json()["id"]
    persona = {"name": "Tuned", "voice": "moshiko", "adapter": aid}
    assert (await client.post("/v1/personas", json=persona, headers=BOB)).status_code == 400, "not Bob's"
    created = await client.post("/v1/personas", json=persona, headers=ALICE)
    assert created.status_code == 201 and created.json()["adapter"] == aid
    refused = await client.delete(f"/v1/adapters/{aid}", headers=ALICE)
    assert refused.status_code == 409 and refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["personas"] == [created.json()["id"]]
    assert (await client.delete(f"/v1/personas/{created.json()['id']}", headers=ALICE)).status_code == 204
    assert (await client.delete(f"/v1/adapters/{aid}", headers=ALICE)).status_code == 204
    assert (await client.get(f"/v1/adapters/{aid}", headers=ALICE)).status_code == 404


async def test_no_persona_survives_naming_an_adapter_deleted_at_the_same_time(
    client: httpx.AsyncClient, adapter_file: bytes, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Two gateways on one store: each adapter is deleted through one while personas naming it are
    created and replaced through the other, all at once. Whoever comes second loses cleanly."""
    ids = [(await upload(client, adapter_file, ALICE)).json()["id"] for _ in range(8)]
    spare = (await client.post("/v1/personas", json={"name": "Spare"}, headers=ALICE)).json()["id"]
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys="key-alice,key-bob") as other:

        async def race(aid: str) -> tuple[int, int, int]:
            tuned = {"name": "Tuned", "adapter": aid}
            deleted, created, replaced = await asyncio.gather(
                client.delete(f"/v1/adapters/{aid}", headers=ALICE),
                other.post("/v1/personas", json=tuned, headers=ALICE),
                other.put(f"/v1/personas/{spare}", json=tuned, headers=ALICE),
            )
            return deleted.status_code, created.status_code, replaced.status_code

        outcomes = await asyncio.gather(*(race(aid) for aid in ids))
        for aid in ids:  # the ones whose personas won: a delete now is still refused
            if (await client.get(f"/v1/adapters/{aid}", headers=ALICE)).status_code == 200:
                assert (await other.delete(f"/v1/adapters/{aid}", headers=ALICE)).status_code == 409
    for deleted, created, replaced in outcomes:
        assert deleted in (204, 409) and created in (201, 400) and replaced in (200, 400)
        assert (deleted == 204) == (created == 400), "the delete and a persona naming it: exactly one won"
    remaining = {a["id"] for a in (await client.get("/v1/adapters", headers=ALICE)).json()["items"]}
    named = {p["adapter"] for p in (await client.get("/v1/personas", headers=ALICE)).json()["items"]}
    assert named - {None} <= remaining, "a persona names a deleted adapter"
    assert {s for s, (d, _, _) in zip(ids, outcomes, strict=True) if d == 204}.isdisjoint(remaining)


async def test_uploads_that_do_not_fit_are_refused_with_the_reason(
    client: httpx.AsyncClient, adapter_file: bytes
) -> None:
    wrong = {
        "transformer.layers.0.self_attn.out_projs.0.lora_A.weight": torch.zeros(4, 63),
        "transformer.layers.0.self_attn.out_projs.0.lora_B.weight": torch.zeros(64, 4),
    }
    misfit = await upload(client, save(wrong), ALICE)
    assert misfit.status_code == 422, misfit.text
    assert misfit.json()["tensor"] == "transformer.layers.0.self_attn.out_projs.0.lora_A.weight"
    assert misfit.headers["content-type"] == "application/problem+json"
    unknown = await upload(client, save({"decoder.proj.lora_A.weight": torch.zeros(4, 8)}), ALICE)
    assert unknown.status_code == 422 and "no linear layer decoder.proj" in unknown.json()["detail"]
    assert (await upload(client, adapter_file, ALICE, rank="8")).status_code == 422, "metadata says 4"
    assert (await upload(client, b"RIFF....WAVEfmt " * 20, ALICE)).status_code == 415
    not_multipart = await client.post("/v1/adapters", content=adapter_file, headers=ALICE)
    assert not_multipart.status_code == 415
    too_big = await upload(client, adapter_file + b"\0" * 1_000_000, ALICE)
    assert too_big.status_code == 413
    assert (await upload(client, adapter_file, ALICE, model="moshika")).status_code == 503, "no layers yet"
    assert (await client.get("/v1/adapters", headers=ALICE)).json()["items"] == []


async def test_uploads_are_streamed_to_the_store_and_no_refusal_leaves_a_file_behind(
    client: httpx.AsyncClient, adapter_file: bytes, tmp_path: Path
) -> None:
    """The file arrives in many 64 KiB chunks (httpx's), is stored byte for byte, and the scratch folder is
        empty after every answer: stored, too large, a hostile header, a misfit, a bad field (a client gone
    midway: tests/security/test_uploads.py)."""
    assert len(adapter_file) > 8 * 64 * 1024
    created = await upload(client, adapter_file, ALICE)
    assert created.status_code == 201, created.text
    stored = tmp_path / "adapters" / created.json()["id"] / "adapter.safetensors"
    assert stored.read_bytes() == adapter_file
    huge_header = struct.pack("<Q", 2 * 1024 * 1024) + b"{" + b" " * 1000
    refusals = [
        (await upload(client, adapter_file + b"\0" * 1_000_000, ALICE), 413),
        (await upload(client, huge_header, ALICE), 415),
        (await upload(client, adapter_file, ALICE, rank="8"), 422),
        (await upload(client, adapter_file, ALICE, model="moshiko-xl"), 400),
    ]
    for answer, status in refusals:
        assert answer.status_code == status, answer.text
    assert "past the 1048576" in refusals[1][0].json()["detail"]
    for parts, why in [
        ([("name", None, b"x" * 5000)], "over 4096 bytes"),
        ([(f"f{n}", None, b"x") for n in range(9)], "more than 8 fields"),
        ([("file", "a", b"1"), ("file", "b", b"2")], "one file is accepted"),
        ([("name", None, b"pirate")], "`file` field is missing"),
    ]:
        bad = await client.post("/v1/adapters", content=_multipart(parts), headers={**ALICE, **_FORM})
        assert bad.status_code == 400 and why in bad.json()["detail"], bad.text
    # A body cut short (a proxy, a client's bug) ends cleanly but without the closing boundary: its file
    # may be any prefix of what was sent, so it is refused, not stored (here: the whole file, cut after).
    cut = _multipart([("name", None, b"pirate"), ("file", "a", adapter_file)])[: -len(b"\r\n--edge--\r\n")]
    bad = await client.post("/v1/adapters", content=cut, headers={**ALICE, **_FORM})
    assert bad.status_code == 400 and "closing boundary" in bad.json()["detail"], bad.text
    assert list((tmp_path / ".incoming").iterdir()) == []


_FORM = {"content-type": "multipart/form-data; boundary=edge"}


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart body of (name, filename or None, value) parts."""
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--edge\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + b"--edge--\r\n"


def _with_header(adapter_file: bytes, edit: Callable[[dict[str, Any]], object], tail: bytes = b"") -> bytes:
    """The adapter with its safetensors header edited (the data section kept, `tail` appended)."""
    (length,) = struct.unpack("<Q", adapter_file[:8])
    header = json.loads(adapter_file[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + adapter_file[8 + length :] + tail


def _all_at_first_offsets(header: dict[str, Any]) -> None:
    """Every tensor of the first tensor's shape points at its bytes: overlapping entries."""
    first = header[min(k for k in header if k != "__metadata__")]
    for name, entry in header.items():
        if name != "__metadata__" and entry["shape"] == first["shape"]:
            entry["data_offsets"] = first["data_offsets"]


async def test_crafted_headers_are_refused_before_they_reach_a_worker(
    client: httpx.AsyncClient, adapter_file: bytes
) -> None:
    bomb = b"[" * 200_000  # nested past the JSON decoder's recursion limit
    nested = await upload(client, struct.pack("<Q", len(bomb)) + bomb, ALICE)
    assert nested.status_code == 415 and nested.headers["content-type"] == "application/problem+json"
    overlapping = await upload(client, _with_header(adapter_file, _all_at_first_offsets), ALICE)
    assert overlapping.status_code == 415 and "offsets" in overlapping.json()["detail"], overlapping.text
    trailing = await upload(client, _with_header(adapter_file, lambda h: h, tail=b"\0" * 64), ALICE)
    assert trailing.status_code == 415 and "not covered" in trailing.json()["detail"], trailing.text
    for scaling in ("0", "-2", "1e30"):
        absurd = _with_header(adapter_file, lambda h, s=scaling: h["__metadata__"].update(lora_scaling=s))
        refused = await upload(client, absurd, ALICE)
        assert refused.status_code == 422 and "lora_scaling" in refused.json()["detail"], refused.text
    assert (await client.get("/v1/adapters", headers=ALICE)).json()["items"] == []


def _first(header: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = header[min(k for k in header if k != "__metadata__")]
    return entry


def _renamed_first(header: dict[str, Any], name: str) -> None:
    header[name] = header.pop(min(k for k in header if k != "__metadata__"))


async def test_headers_safetensors_itself_would_refuse_are_refused_at_upload(
    client: httpx.AsyncClient, adapter_file: bytes
) -> None:
    """What Python's JSON reads but safetensors' own parser (the worker's loader) refuses was taken with a
    201 and failed every session that named it; two more gave a 500. Each is refused at upload now, with
    a problem body that is plain ASCII whatever the client's strings held."""
    refusals = {
        "a metadata value that is a number": (lambda h: h["__metadata__"].update(lora_rank=4), 415),
        "a lone surrogate in metadata": (lambda h: h["__metadata__"].update(note="\ud800"), 415),
        "a dtype that is a list": (lambda h: _first(h).update(dtype=["F32"]), 415),
        "a lone surrogate in a tensor's name": (lambda h: _renamed_first(h, "\ud800.lora_A.weight"), 415),
    }
    for case, (edit, status) in refusals.items():
        refused = await upload(client, _with_header(adapter_file, edit), ALICE)
        assert refused.status_code == status, (case, refused.status_code, refused.text)
        assert refused.content.isascii() and refused.json()["status"] == status, case
    assert (await client.get("/v1/adapters", headers=ALICE)).json()["items"] == []
    # A detail quoting such a string (the header checks name tensors) renders, escaped: it was a 500.
    quoted = problem_response(Unprocessable("tensor \ud800.lora_A.weight: not 2-D", tensor="\ud800"))
    assert bytes(quoted.body).isascii() and json.loads(quoted.body)["tensor"] == "\ud800"


async def test_a_session_fails_at_once_when_no_worker_serves_its_adapters_model(
    adapter_file: bytes, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A session naming an adapter needs a dialogue worker of the adapter's model with adapter memory:
    without one it is refused at once, with why; with one that is busy it waits for a slot as any does."""
    shapes, _ = checkpoint_layers(write_moshi_checkpoint(CHECKPOINT_CACHE / "moshi"))
    await AdapterStore(LocalStorage(tmp_path)).publish_layers("moshiko", shapes)
    async with running_gateway(redis_url, key_prefix, tmp_path, placement_wait_s=1.0) as gateway:
        http_url = gateway.ws_url.replace("ws://", "http://")
        async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
            adapter = (await upload(http, adapter_file, {})).json()["id"]

        async def first_words() -> tuple[bytes, str]:
            async with connect(f"{gateway.ws_url}/api/chat?voice=moshiko&adapter={adapter}") as ws:
                said = await asyncio.wait_for(ws.recv(), 10)
                await ws.wait_closed()
                assert isinstance(said, bytes) and ws.close_reason is not None
                return said, ws.close_reason

        async def worker(fields: dict[str, str | int]) -> None:
            bus = gateway.app.state.bus
            await WorkerPresence(
                bus, "dialogue", "w2", ttl_s=60, interval_s=5, describe=lambda: fields
            ).beat()

        # The fixture's worker (no model named) and one of the other model: neither serves it.
        await worker({"model": "moshika", "adapter_slots": 4, "free_slots": 4})
        said, reason = await first_words()
        assert said[0] == ERROR and b"no dialogue worker serves LoRA adapters for moshiko" in said, said
        assert reason == "no_capacity"
        await worker({"model": "moshiko", "adapter_slots": 4, "free_slots": 0})  # it serves, but it is busy
        said, reason = await first_words()
        assert said[0] == ERROR and b"no dialogue worker had a free slot within 1 s" in said, said
        assert reason == "no_capacity"


@pytest.fixture
async def adapter_gateway(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A real gateway whose dialogue workers (presence records) include one serving moshiko's adapters."""
    shapes, _ = checkpoint_layers(write_moshi_checkpoint(CHECKPOINT_CACHE / "moshi"))
    await AdapterStore(LocalStorage(tmp_path)).publish_layers("moshiko", shapes)
    async with running_gateway(redis_url, key_prefix, tmp_path, max_sessions_per_key=0) as gateway:
        serves = {"model": "moshiko", "adapter_slots": 4, "free_slots": 4}
        await WorkerPresence(
            gateway.app.state.bus, "dialogue", "w2", ttl_s=60, interval_s=5, describe=lambda: serves
        ).beat()
        yield gateway


async def test_an_adapter_a_live_session_runs_cannot_be_deleted(
    adapter_gateway: Gateway, adapter_file: bytes
) -> None:
    """A worker taking a session over loads the adapter the session runs now (the hash's): deleting it
    meanwhile is refused, naming the session, whether the session started with it or switched to it. The
    one it switches away from stays in use until the worker has switched (it may refuse the switch and
    keep it)."""
    bus = adapter_gateway.app.state.bus
    async with httpx.AsyncClient(base_url=adapter_gateway.ws_url.replace("ws://", "http://")) as http:
        first, second = [(await upload(http, adapter_file, {})).json()["id"] for _ in range(2)]
        async with connect(f"{adapter_gateway.ws_url}/v1/realtime?model=moshiko") as ws:
            sid = json.loads(await ws.recv())["session"]["id"]

            async def update(session: dict[str, Any]) -> None:
                await ws.send(json.dumps({"type": "session.update", "session": session}))
                event: dict[str, Any] = {"type": None}
                while event["type"] != "session.updated":
                    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert event["type"] != "error", event

            await update({"chorus_adapter": first})
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": SILENCE_80MS}))
            await ready(bus, sid, "realtime", ws)
            refused = await http.delete(f"/v1/adapters/{first}")
            assert refused.status_code == 409, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["sessions"] == [sid] and "live session" in refused.json()["detail"]
            assert (await http.delete(f"/v1/adapters/{second}")).status_code == 204, "nobody runs it"
            third = (await upload(http, adapter_file, {})).json()["id"]
            await update({"chorus_adapter": third})
            assert (await http.delete(f"/v1/adapters/{third}")).status_code == 409
            in_flight = await http.delete(f"/v1/adapters/{first}")
            assert in_flight.status_code == 409, "the worker has not switched yet: it may refuse and keep it"
            assert in_flight.json()["sessions"] == [sid], in_flight.text
            # The worker switches the rows, as serving.py writes it.
            await SessionStore(bus, 60).update(sid, adapter=third, adapter_served=third)
            assert (await http.delete(f"/v1/adapters/{first}")).status_code == 204, "switched away from"

        async def deleted() -> bool:  # once the gateway has ended the session
            return (await http.delete(f"/v1/adapters/{third}")).status_code == 204

        await wait_until(deleted, "the adapter to be deletable once the session ended")


async def test_after_the_worker_refused_a_switch_the_client_learns_the_adapter_in_use(
    adapter_gateway: Gateway, adapter_file: bytes
) -> None:
    """session.updated names the adapter asked for; the worker may then refuse it (an `error` event) and
    keep the one it had: a new session.updated names that one, and the session still runs it."""
    bus = adapter_gateway.app.state.bus
    async with httpx.AsyncClient(base_url=adapter_gateway.ws_url.replace("ws://", "http://")) as http:
        kept, refused = [(await upload(http, adapter_file, {})).json()["id"] for _ in range(2)]
        async with connect(f"{adapter_gateway.ws_url}/v1/realtime?model=moshiko&adapter={kept}") as ws:
            created = conforming(await ws.recv())
            sid = created["session"]["id"]
            assert created["session"]["chorus_adapter"] == kept
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": SILENCE_80MS}))
            await ready(bus, sid, "realtime", ws)

            async def next_event(*types: str) -> dict[str, Any]:
                while (event := conforming(await asyncio.wait_for(ws.recv(), 10)))["type"] not in types:
                    pass
                return event

            await ws.send(json.dumps({"type": "session.update", "session": {"chorus_adapter": refused}}))
            assert (await next_event("session.updated"))["session"]["chorus_adapter"] == refused
            # The worker refuses it as serving.py does: the hash back to the adapter kept, then the error.
            await SessionStore(bus, 60).update(sid, adapter=kept)
            error = SessionEvent.of(
                sid, 1, EventName.ERROR, "all adapter slots in use", Failure(code="no_capacity")
            )
            await bus.append(bus.names.session_output(sid), error)
            assert (await next_event("error"))["error"]["message"] == "all adapter slots in use"
            updated = await next_event("session.updated", "error")
            assert updated["type"] == "session.updated" and updated["session"]["chorus_adapter"] == kept
        assert (await http.delete(f"/v1/adapters/{refused}")).status_code == 204, "no session runs it"


async def test_a_session_starting_and_a_delete_of_its_adapter_at_once_never_both_win(
    adapter_gateway: Gateway, adapter_file: bytes
) -> None:
    """Each adapter is deleted while a session naming it starts: either the delete is refused (409) and
    the session runs, or the adapter is gone and the session is refused; never a session running an
    adapter nobody could load again."""
    bus = adapter_gateway.app.state.bus
    async with httpx.AsyncClient(base_url=adapter_gateway.ws_url.replace("ws://", "http://")) as http:
        ids = [(await upload(http, adapter_file, {})).json()["id"] for _ in range(6)]

        async def race(adapter: str) -> tuple[int, bool]:
            url = f"{adapter_gateway.ws_url}/api/chat?voice=moshiko&adapter={adapter}"
            deleted, ws = await asyncio.gather(http.delete(f"/v1/adapters/{adapter}"), connect(url))
            async with ws:
                assert ws.response is not None
                sid = ws.response.headers["x-chorus-session-id"]
                assert deleted.status_code in (204, 409), deleted.text  # a 503: a lock wait ran out
                if deleted.status_code == 409:
                    assert deleted.json()["sessions"] == [sid], deleted.text
                    await ready(bus, sid, "moshi", ws)  # the handshake, not an error, comes first
                    return 409, True
                said = await asyncio.wait_for(ws.recv(), 10)
                assert isinstance(said, bytes) and said[0] == ERROR and b"unknown adapter" in said, said
                return deleted.status_code, False

        outcomes = await asyncio.gather(*(race(adapter) for adapter in ids))
    assert all(status in (204, 409) for status, _ in outcomes), outcomes


async def test_a_session_counted_before_its_hash_is_written_is_not_dropped_by_another_starting(
    adapter_gateway: Gateway, adapter_file: bytes
) -> None:
    """A start counts the session in its owner's set, then writes its hash; another session of the owner
    starting in between prunes the set of the sessions whose hash expired. The first must stay counted:
    dropped, a delete of its adapter would miss it once its hash names the adapter (both winning)."""
    store = SessionStore(adapter_gateway.app.state.bus, 600)
    async with httpx.AsyncClient(base_url=adapter_gateway.ws_url.replace("ws://", "http://")) as http:
        adapter = (await upload(http, adapter_file, {})).json()["id"]
        await store.register(ANONYMOUS, "first", 0)
        await store.register(ANONYMOUS, "second", 0)  # as Conversation.start does, between the first's steps
        start = SessionStart(session_id="first", owner=ANONYMOUS, persona=PersonaSpec(adapter=adapter))
        await store.create(start, lease_s=60)
        deleted = await http.delete(f"/v1/adapters/{adapter}")
    assert deleted.status_code == 409 and deleted.json()["sessions"] == ["first"], deleted.text


@asynccontextmanager
async def _switching_gateway(
    adapter_file: bytes, redis_url: str, key_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[Gateway, list[str]]]:
    """A gateway (one switch a minute per session), a live dialogue worker's presence serving adapters of
    the checkpoint's model, and two uploaded adapters."""
    shapes, _ = checkpoint_layers(write_moshi_checkpoint(CHECKPOINT_CACHE / "moshi"))
    await AdapterStore(LocalStorage(tmp_path)).publish_layers("moshiko", shapes)
    async with running_gateway(redis_url, key_prefix, tmp_path, adapter_switch_interval_s=60) as gateway:
        serves = {"model": "moshiko", "adapter_slots": 4, "free_slots": 4}
        presence = WorkerPresence(
            gateway.app.state.bus, "dialogue", "w2", ttl_s=60, interval_s=5, describe=lambda: serves
        )
        await presence.beat()
        async with httpx.AsyncClient(base_url=gateway.ws_url.replace("ws://", "http://"), timeout=30) as http:
            adapters = [(await upload(http, adapter_file, {})).json()["id"] for _ in range(2)]
        yield gateway, adapters


async def test_mid_session_switches_are_spaced_and_one_the_worker_refused_can_be_asked_for_again(
    adapter_file: bytes, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A worker may refuse a switch (its adapter slots all in use, say: an `error` event) and the session
    goes on with the adapter it had: asking for that adapter again must reach the worker again, not be
    taken for the adapter already in use. Switching to another one at once is refused: each switch may
    load an adapter where the worker's steps run, pausing every session on it."""
    async with _switching_gateway(adapter_file, redis_url, key_prefix, tmp_path) as (gateway, adapters):
        bus = gateway.app.state.bus
        adapter, other = adapters
        ws, sid = await open_session("realtime", gateway.ws_url)
        async with ws:
            await ready(bus, sid, "realtime", ws)

            async def switch(to: str) -> dict[str, Any]:
                await ws.send(json.dumps({"type": "session.update", "session": {"chorus_adapter": to}}))
                while (event := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] not in (
                    "session.updated",
                    "error",
                ):
                    pass
                return event

            for _ in range(2):  # the second after the worker refused the first
                assert (await switch(adapter))["type"] == "session.updated"
            refused = await switch(other)
            assert refused["type"] == "error" and refused["error"]["code"] == "rate_limited", refused
            assert "chorus_adapter may change once every 60 s" in refused["error"]["message"], refused
        controls = [CONTROL.decode(e.fields) for e in await bus.range(bus.names.session_control(sid))]
        asked = [c.adapter for c in controls if isinstance(c, SessionUpdate) and c.adapter is not None]
        assert asked == [adapter, adapter], controls


async def test_asking_for_the_adapter_of_the_sessions_persona_mid_session_is_no_switch(
    adapter_file: bytes, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A session of a persona that names an adapter runs it: asking for that one is no switch, so a switch
    to another right after is not refused by the interval between switches."""
    async with _switching_gateway(adapter_file, redis_url, key_prefix, tmp_path) as (gateway, adapters):
        bus = gateway.app.state.bus
        own, other = adapters
        async with httpx.AsyncClient(base_url=gateway.ws_url.replace("ws://", "http://"), timeout=30) as http:
            persona = (await http.post("/v1/personas", json={"name": "Tuned", "adapter": own})).json()["id"]
        async with connect(f"{gateway.ws_url}/v1/realtime?model=moshiko&persona={persona}") as ws:
            sid = json.loads(await ws.recv())["session"]["id"]
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": SILENCE_80MS}))
            await ready(bus, sid, "realtime", ws)
            for adapter in (own, other):
                await ws.send(json.dumps({"type": "session.update", "session": {"chorus_adapter": adapter}}))
                event: dict[str, Any] = {"type": None}
                while event["type"] != "session.updated":
                    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert event["type"] != "error", event
                assert event["session"]["chorus_adapter"] == adapter


async def test_a_gateway_starting_removes_the_files_crashed_uploads_left(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """A gateway killed mid-upload leaves its scratch file; the next start removes it once nobody has
    written to it for CHORUS_VOICE_SWEEP_GRACE_S, and leaves one being written now alone."""
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    (stale := incoming / ".upload-crashed.part").write_bytes(b"half an adapter")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (fresh := incoming / ".upload-now.part").write_bytes(b"an upload in progress")
    async with gateway_client(redis_url, key_prefix, tmp_path, voice_sweep_grace_s=600):
        assert not stale.exists() and fresh.exists()


async def test_a_gateway_starting_leaves_another_gateways_upload_alone_whatever_its_grace(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Gateways may share a data directory: one starting with no grace must not remove the file another is
    receiving an upload into (not written to for a while: its client is slow, or it is being checked), nor
    the voice profile another is writing."""
    (incoming := tmp_path / ".incoming").mkdir()
    (receiving := incoming / ".upload-elsewhere.part").write_bytes(b"the first half of an adapter")
    os.utime(receiving, (time.time() - 20, time.time() - 20))
    (writing := tmp_path / "voices" / "voice_elsewhere").mkdir(parents=True)
    (writing / "clip.wav").write_bytes(b"RIFF")
    (pending := writing / "pending.json").write_text(json.dumps({"started_at": time.time() - 20}))
    async with gateway_client(redis_url, key_prefix, tmp_path, voice_sweep_grace_s=0, upload_timeout_s=60):
        assert receiving.exists() and writing.exists()
    os.utime(receiving, (time.time() - 3600, time.time() - 3600))  # past any upload's time bound: a crash's
    pending.write_text(json.dumps({"started_at": time.time() - 3600}))
    async with gateway_client(redis_url, key_prefix, tmp_path, voice_sweep_grace_s=0, upload_timeout_s=60):
        assert not receiving.exists() and not writing.exists()
