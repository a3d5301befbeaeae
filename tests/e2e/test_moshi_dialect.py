"""The moshi protocol as Kyutai's clients speak it: Kyutai's own Python client (`moshi.client.Connection`,
from the `moshi` package on PyPI) holds a conversation headless with generation settings in the query
string; the settings reach the session's start; the wire's metadata, control and ping messages; a bad
setting is refused with an error message and close 1008."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import types
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from shared.audio import FRAME_SAMPLES
from shared.bus import Bus
from shared.messages import PersonaSpec, Sampling
from shared.sessions import SessionStore
from shared.streams import StreamNames
from tests.support.audio import speech_like
from tests.support.stack import ChorusStack
from tests.support.waiting import wait_until

SETTINGS = {
    "text_temperature": "0.5",
    "text_topk": "10",
    "audio_temperature": "0.6",
    "audio_topk": "100",
    "pad_mult": "1.5",
    "repetition_penalty": "1.2",
    "repetition_penalty_context": "32",
    "text_seed": "7",
    "audio_seed": "8",
}
EXPECTED = Sampling(
    text_temperature=0.5,
    text_top_k=10,
    audio_temperature=0.6,
    audio_top_k=100,
    pad_mult=1.5,
    repetition_penalty=1.2,
    repetition_penalty_context=32,
    text_seed=7,
    audio_seed=8,
)


class HeadlessStream:
    """A sounddevice stream with no device: the test is the microphone and the speaker."""

    def __init__(self, **_: Any) -> None:
        pass

    def __enter__(self) -> HeadlessStream:
        return self

    def __exit__(self, *_: object) -> None:
        pass


class CapturingPrinter:
    """What Kyutai's client prints: the text tokens and its log lines."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.logs: list[tuple[str, str]] = []

    def print_header(self) -> None:
        pass

    def print_token(self, token: str) -> None:
        self.tokens.append(token)

    def log(self, level: str, msg: str) -> None:
        self.logs.append((level, msg))

    def print_lag(self) -> None:
        pass

    def print_pending(self) -> None:
        pass


@pytest.fixture
def kyutai_client() -> Iterator[types.ModuleType]:
    """`moshi.client` with a headless `sounddevice` (PortAudio is not installed: no sound card here)."""
    headless = types.ModuleType("sounddevice")
    headless.InputStream = HeadlessStream  # type: ignore[attr-defined]
    headless.OutputStream = HeadlessStream  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in ("sounddevice", "moshi.client")}
    sys.modules["sounddevice"] = headless
    sys.modules.pop("moshi.client", None)
    import moshi.client

    yield moshi.client
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


async def session_persona(stack: ChorusStack, session_id: str) -> PersonaSpec | None:
    """The persona of the session's start, as the gateway wrote it for the workers."""
    bus = await Bus.connect(stack.redis_url, StreamNames(stack.key_prefix))
    try:
        info = await SessionStore(bus, 60).get(session_id)
        return None if info is None or info.start is None else info.start.persona
    finally:
        await bus.close()


async def test_kyutais_client_converses_with_generation_settings(
    stack: ChorusStack, kyutai_client: types.ModuleType
) -> None:
    query = urlencode({**SETTINGS, "worker_auth_id": "ignored"})
    printer = CapturingPrinter()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{stack.ws_url}/api/chat?{query}") as ws,
    ):
        session_id = ws._response.headers["x-chorus-session-id"]
        connection = kyutai_client.Connection(printer, ws, asyncio.get_running_loop())
        receiving = asyncio.create_task(connection.run())
        speech = speech_like(3.0)
        for start in range(0, len(speech) - FRAME_SAMPLES + 1, FRAME_SAMPLES):
            # The client's microphone callback: a [frames, channels] block, as sounddevice gives it.
            connection._on_audio_input(speech[start : start + FRAME_SAMPLES, None], FRAME_SAMPLES, None, None)
            await asyncio.sleep(0.08)
        await wait_until(
            lambda: connection._output_queue.qsize() > 5 and printer.tokens, "audio and text played", 20
        )
        await ws.close()
        await asyncio.wait_for(receiving, 10)

    played = [connection._output_queue.get() for _ in range(connection._output_queue.qsize())]
    assert all(frame.shape == (FRAME_SAMPLES,) for frame in played), "its Opus reader decodes our audio"
    assert np.concatenate(played).any(), "Moshi's audio reached its speaker"
    assert printer.tokens, "text tokens reached its printer"
    unknown = [msg for level, msg in printer.logs if level == "warning"]
    assert unknown == ["unknown message kind 0", "unknown message kind 4"], "it skips handshake and metadata"
    assert not [msg for level, msg in printer.logs if level == "error"]
    persona = await session_persona(stack, session_id)
    assert persona is not None and persona.sampling == EXPECTED, "the settings reach the start"


async def test_metadata_control_and_ping(stack: ChorusStack) -> None:
    query = urlencode(
        {"text_topk": "5", "text_prompt": "You are a lighthouse keeper.", "worker_auth_id": "ignored"}
    )
    async with connect(f"{stack.ws_url}/api/chat?{query}", open_timeout=30) as ws:
        assert await asyncio.wait_for(ws.recv(), 60) == b"\x00"
        kind, payload = (message := await ws.recv())[0], message[1:]
        assert kind == 0x04
        meta = json.loads(payload)
        assert ws.response is not None
        assert meta["session_id"] == ws.response.headers["x-chorus-session-id"]
        assert meta["text_topk"] == 5 and meta["text_temperature"] == 0.7, "the query over the persona"
        assert isinstance(meta["text_seed"], int) and isinstance(meta["audio_seed"], int), "seeds drawn"
        persona = await session_persona(stack, meta["session_id"])
        assert persona is not None and persona.primer == "You are a lighthouse keeper.", "text_prompt primes"
        seeds = (persona.sampling.text_seed, persona.sampling.audio_seed)
        assert seeds == (meta["text_seed"], meta["audio_seed"]), "the metadata tells the seeds in force"

        await ws.send(b"\x03\x00")  # control: start
        await ws.send(b"\x06are you there")
        replies = []
        while (message := await asyncio.wait_for(ws.recv(), 10))[0] != 0x06:
            replies.append(message)
        assert message == b"\x06are you there"
        assert not [m for m in replies if m[0] == 0x05], "control messages are accepted"

    log = (stack.workdir / "gateway.log").read_text(errors="replace")
    assert log.count("unknown /api/chat query parameter 'worker_auth_id'") == 1, "logged once, not per socket"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({"text_temperature": "hot"}, "text_temperature='hot': expected a number"),
        ({"text_topk": "0"}, "text_topk='0': Input should be greater than or equal to 1"),
        ({"audio_seed": "-1"}, "audio_seed='-1': Input should be greater than or equal to 0"),
        ({"pad_mult": "nan"}, "pad_mult='nan': expected a finite number"),
        ({"text_topk": "\u0661\u0662"}, "text_topk='\u0661\u0662': expected an integer in ASCII digits"),
        ([("text_seed", "1"), ("text_seed", "2")], "text_seed is given 2 times: give it once"),
        ([("voice", "moshiko"), ("voice", "moshika")], "voice is given 2 times: give it once"),
        (
            {"primer": "a pirate", "text_prompt": "a nurse"},
            "primer and text_prompt are the same setting: give one",
        ),
    ],
)
async def test_a_bad_setting_is_refused_with_an_error_and_1008(
    stack: ChorusStack, query: dict[str, str] | list[tuple[str, str]], reason: str
) -> None:
    async with connect(f"{stack.ws_url}/api/chat?{urlencode(query)}", open_timeout=30) as ws:
        assert await asyncio.wait_for(ws.recv(), 30) == b"\x05" + reason.encode()
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1008
