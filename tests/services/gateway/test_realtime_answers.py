"""Every client event of the OpenAI Realtime GA API gets an answer, before any conversation runs: an
event, or an `error` with the code docs/protocols.md gives; never silence. Each answer validates against
the `openai` SDK's own types, GA or beta by the dialect the client connected with. The real gateway runs
in-process against the test's redis-server (`running_gateway`)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from shared.bus import Bus
from tests.services.gateway.test_session_faults import Gateway, ready, running_gateway
from tests.support.openai_conformance import conforming

TEXT_TURN = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}
TOOL_RESULT = {"type": "function_call_output", "call_id": "call_1", "output": "{}"}
TOOLS = [{"type": "function", "name": "lookup", "parameters": {}}]

# (client event, the answer's type, its error code if an error)
ANSWERS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"type": "input_audio_buffer.commit"}, "error", "input_audio_buffer_commit_empty"),
    ({"type": "input_audio_buffer.clear"}, "input_audio_buffer.cleared", None),
    ({"type": "response.cancel"}, "error", "response_cancel_not_active"),
    ({"type": "output_audio_buffer.clear"}, "error", "response_cancel_not_active"),
    ({"type": "response.create", "response": {"tools": TOOLS}}, "error", "function_calls_not_supported"),
    ({"type": "response.create", "response": {"output_modalities": ["text"]}}, "error", "not_supported"),
    ({"type": "conversation.item.create", "item": TEXT_TURN}, "error", "text_input_not_supported"),
    ({"type": "conversation.item.create", "item": TOOL_RESULT}, "error", "function_calls_not_supported"),
    ({"type": "conversation.item.retrieve", "item_id": "item_x"}, "error", "item_not_found"),
    ({"type": "conversation.item.delete", "item_id": "item_x"}, "error", "item_not_found"),
    (
        {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 0},
        "error",
        "item_not_found",
    ),
    ({"type": "session.update", "session": {"tools": TOOLS}}, "error", "function_calls_not_supported"),
    ({"type": "session.update", "session": {"type": "transcription"}}, "error", "not_supported"),
    (
        {"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/opus"}}}}},
        "error",
        "invalid_request",
    ),
    (
        {
            "type": "session.update",
            "session": {"voice": "moshiko", "audio": {"output": {"voice": "moshika"}}},
        },
        "error",
        "invalid_request",
    ),
    (  # the beta and GA shapes at once: neither wins silently over the other
        {
            "type": "session.update",
            "session": {
                "input_audio_format": "pcm16",
                "audio": {"input": {"format": {"type": "audio/opus"}}},
            },
        },
        "error",
        "invalid_request",
    ),
    (
        {
            "type": "session.update",
            "session": {
                "output_audio_format": "pcm16",
                "audio": {"output": {"format": {"type": "audio/pcma"}}},
            },
        },
        "error",
        "invalid_request",
    ),
    (
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "semantic_vad"}},
                    "output": {"format": {"type": "audio/pcma"}},
                },
            },
        },
        "session.updated",
        None,
    ),
]


@pytest.fixture
async def gateway(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_url, key_prefix, tmp_path) as running:
        yield running


async def answer(ws: ClientConnection, event: dict[str, Any], *, beta: bool = False) -> dict[str, Any]:
    await ws.send(json.dumps({**event, "event_id": "client_1"}))
    return conforming(await asyncio.wait_for(ws.recv(), 5), beta=beta)


async def answer_past_chorus_events(ws: ClientConnection, event: dict[str, Any]) -> dict[str, Any]:
    """`answer` (beta) on a socket whose conversation runs: Chorus's own events (`ready`) may come first."""
    got = await answer(ws, event, beta=True)
    while got["type"] == "chorus.event":
        got = conforming(await asyncio.wait_for(ws.recv(), 5), beta=True)
    return got


async def test_every_ga_client_event_is_answered_with_an_event_or_a_coded_error(gateway: Gateway) -> None:
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshika") as ws:
        assert conforming(await ws.recv())["type"] == "session.created"
        for event, answer_type, code in ANSWERS:
            got = await answer(ws, event)
            assert got["type"] == answer_type, (event, got)
            if code is not None:
                assert (got["error"]["code"], got["error"]["event_id"]) == (code, "client_1"), event
        assert got["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert got["session"]["audio"]["output"]["format"] == {"type": "audio/pcma"}


async def test_a_beta_client_gets_the_beta_session_and_sends_mu_law(gateway: Gateway, bus: Bus) -> None:
    headers = {"OpenAI-Beta": "realtime=v1"}
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshika", additional_headers=headers) as ws:
        created = conforming(await ws.recv(), beta=True)
        assert created["session"]["input_audio_format"] == "pcm16"
        update = {
            "type": "session.update",
            "session": {"input_audio_format": "g711_ulaw", "voice": "moshiko"},
        }
        updated = await answer(ws, update, beta=True)
        assert (updated["session"]["input_audio_format"], updated["session"]["voice"]) == (
            "g711_ulaw",
            "moshiko",
        )
        # μ-law silence in 80 ms messages, the first an odd number of bytes: fine in G.711 (one byte a
        # sample), where PCM16 would be refused.
        for size in (641, 640, 640, 640):
            audio = base64.b64encode(bytes([0xFF]) * size).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ready(bus, created["session"]["id"], "realtime", ws)  # the test plays the router
        got = await answer(ws, {"type": "input_audio_buffer.commit"}, beta=True)
        assert got["type"] == "input_audio_buffer.committed", got
        item = conforming(await asyncio.wait_for(ws.recv(), 5), beta=True)
        assert item["type"] == "conversation.item.created" and item["item"]["id"] == got["item_id"]
        retrieved = await answer(
            ws, {"type": "conversation.item.retrieve", "item_id": got["item_id"]}, beta=True
        )
        assert retrieved["item"]["role"] == "user"
        deleted = await answer(ws, {"type": "conversation.item.delete", "item_id": got["item_id"]}, beta=True)
        assert deleted["type"] == "conversation.item.deleted"
        # An item created under the id of one still kept is refused, and its audio is not heard.
        audio = base64.b64encode(bytes([0xFF]) * 640).decode()
        mine = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}]}
        create = {"type": "conversation.item.create", "item": {**mine, "id": "item_mine"}}
        assert (await answer(ws, create, beta=True))["type"] == "input_audio_buffer.committed"
        conforming(await asyncio.wait_for(ws.recv(), 5), beta=True)  # conversation.item.created
        again = await answer(ws, create, beta=True)
        assert (again["type"], again["error"]["code"]) == ("error", "invalid_request"), again
        # An item with one bad part is refused whole: none of its audio is heard.
        parts = [{"type": "input_audio", "audio": audio}, {"type": "input_audio", "audio": "not base64!"}]
        bad = {"type": "conversation.item.create", "item": {**mine, "content": parts}}
        refused = await answer(ws, bad, beta=True)
        assert (refused["type"], refused["error"]["code"]) == ("error", "invalid_request"), refused
        empty = await answer(ws, {"type": "input_audio_buffer.commit"}, beta=True)
        assert empty["error"]["code"] == "input_audio_buffer_commit_empty", empty
        # ... and so is one whose parts together carry more than a socket's burst (2 s): paced as one
        # message, where part by part its first parts were heard before a later one was refused.
        half = base64.b64encode(bytes([0xFF]) * 12_000).decode()  # 1.5 s of μ-law: each fits the burst
        over = [{"type": "input_audio", "audio": half}, {"type": "input_audio", "audio": half}]
        too_much = {"type": "conversation.item.create", "item": {**mine, "content": over}}
        assert (await answer_past_chorus_events(ws, too_much))["error"]["code"] == "payload_too_large"
        empty = await answer_past_chorus_events(ws, {"type": "input_audio_buffer.commit"})
        assert empty["error"]["code"] == "input_audio_buffer_commit_empty", empty


async def test_an_error_quotes_a_huge_client_value_cut_short(gateway: Gateway) -> None:
    """A client's value named in an error is an excerpt: a 100 kB string never comes back whole."""
    huge = "x" * 100_000
    events: list[dict[str, Any]] = [
        {"type": "session.update", "session": {"voice": huge}},
        {"type": "session.update", "session": {"input_audio_format": huge}},
        {"type": "session.update", "session": {"audio": {"output": {"format": {"type": huge}}}}},
        {"type": "conversation.item.create", "item": {"type": huge, "role": huge}},
        {"type": "response.cancel", "response_id": huge},
    ]
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshika", max_size=None) as ws:
        conforming(await ws.recv())
        for event in events:
            got = await answer(ws, event)
            assert got["type"] == "error" and len(got["error"]["message"]) < 1000, (event, len(str(got)))


async def test_a_refused_session_update_changes_nothing(gateway: Gateway) -> None:
    """An update answered with an error leaves the session as it was: its instructions (the primer the
    conversation would start with) included, when the adapter beside them was the refused part."""
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshika") as ws:
        conforming(await ws.recv())
        kept = await answer(ws, {"type": "session.update", "session": {"instructions": "Be brief."}})
        assert kept["session"]["instructions"] == "Be brief."
        both = {"instructions": "Something else.", "chorus_adapter": "adapter_nope"}
        refused = await answer(ws, {"type": "session.update", "session": both})
        assert refused["type"] == "error" and "unknown adapter" in refused["error"]["message"], refused
        after = await answer(ws, {"type": "session.update", "session": {}})
        assert after["session"]["instructions"] == "Be brief.", "the refused update was partly applied"


async def test_the_session_names_the_model_that_serves_it_never_the_clients_string(gateway: Gateway) -> None:
    for asked, served in (("moshika", "moshika"), ("gpt-realtime", "moshiko"), ("x" * 5000, "moshiko")):
        async with connect(f"{gateway.ws_url}/v1/realtime?model={asked}") as ws:
            created = conforming(await ws.recv())
        assert created["session"]["model"] == served, asked[:20]
    async with connect(f"{gateway.ws_url}/v1/realtime") as ws:
        conforming(await ws.recv())
        updated = await answer(
            ws, {"type": "session.update", "session": {"audio": {"output": {"voice": "moshika"}}}}
        )
        assert updated["session"]["model"] == "moshika", "a native voice is spoken by its own model"


async def test_a_large_event_that_carries_no_audio_is_refused_unread(gateway: Gateway) -> None:
    """A session.update padded to a megabyte of unknown fields cost ~100 ms of the gateway's loop to read
    and keep. An event is at most 64 Ki characters besides its audio: refused unparsed where it names
    neither audio type, before pydantic otherwise (padding the two audio events too), and each refusal
    is charged to the socket's audio pace by its size. The socket goes on."""
    padding = {f"k{i}": i for i in range(50_000)}  # ~800 KB
    padded = [
        {"type": "session.update", "session": {"type": "realtime", **padding}},
        {"type": "session.update", "session": padding, "note": "input_audio_buffer.append"},  # parsed
        {"type": "input_audio_buffer.append", "audio": "", **padding},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "assistant", **padding}},
    ]
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshika", max_size=None) as ws:
        conforming(await ws.recv())
        started = time.monotonic()
        for event in padded:
            got = await answer(ws, event)
            assert (got["type"], got["error"]["code"]) == ("error", "payload_too_large"), got
            named = (
                "an event of " if event is padded[0] else f"a {event['type']} event of "
            )  # the first unread
            assert got["error"]["message"].startswith(named), got
        # Each was charged a full burst (2 s) of the pace, refilled at 1.5 s a second: the last three
        # waited 4 s in all.
        assert time.monotonic() - started >= 3.5
        updated = await answer(ws, {"type": "session.update", "session": {"instructions": "Be brief."}})
        assert updated["type"] == "session.updated", updated
