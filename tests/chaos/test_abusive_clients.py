"""Two hundred abusive connections: sockets that go before their handshake, garbage on both protocols,
clients that vanish mid-session. Afterwards nothing may be left held (every dialogue slot free, the API
key's live-session set empty, within the lease time), the gateway must still be healthy, and a normal
conversation must work. Every abusive client also checks what it is owed on the way: an answer (an error,
a refusal or a close), never a hang, and no crash of its socket over a malformed message."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from shared.audio import float_to_pcm16
from tests.chaos.conftest import LEASE_S, SESSION_CHECK_S, SLOTS
from tests.chaos.harness import Call, Observer
from tests.support.audio import speech_like
from tests.support.clients import AUDIO, ERROR, HANDSHAKE, MoshiClient, frames
from tests.support.stack import ChorusStack
from tests.support.waiting import seconds_until, wait_until

pytestmark = pytest.mark.chaos

MakeStack = Callable[..., ChorusStack]
Observe = Callable[[ChorusStack], Awaitable[Observer]]

CONNECTS = 200
AT_ONCE = 20
CLIENT_BOUND_S = 20.0  # placement wait (2 s here) + priming + the client's own steps, generously
ALLOWANCE_S = 2.0


class Violation(AssertionError):
    """The server answered an abusive client in a way it must not (crashed its socket, went silent)."""


def drop_tcp(ws: ClientConnection) -> None:
    """Go away without a close frame: an RST, as a crashed client or a lost network does."""
    raw: socket.socket = ws.transport.get_extra_info("socket")  # type: ignore[attr-defined]
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()  # type: ignore[attr-defined]


async def replies(ws: ClientConnection, wait_s: float) -> list[str | bytes]:
    """What the server sent within `wait_s` (the socket must stay open: ConnectionClosed is a crash)."""
    got: list[str | bytes] = []
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(await asyncio.wait_for(ws.recv(), left))
        except TimeoutError:
            break
        except ConnectionClosed as closed:
            raise Violation(f"the server closed the socket over a malformed message: {closed}") from None
    return got


# --- the abusive clients: each returns how it ended -----------------------------------------------------


async def closes_before_handshake(stack: ChorusStack, i: int) -> str:
    ws = await connect(f"{stack.ws_url}/api/chat?voice=moshiko", open_timeout=10)
    await ws.close()
    return "closed early"


async def drops_tcp_before_handshake(stack: ChorusStack, i: int) -> str:
    path = "/api/chat?voice=moshiko" if i % 2 else "/v1/realtime?model=moshiko"
    ws = await connect(f"{stack.ws_url}{path}", open_timeout=10)
    drop_tcp(ws)
    return "dropped early"


async def sends_garbage_instead_of_http(stack: ChorusStack, i: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.ports["gateway"])
    half_upgrade = b"GET /api/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    writer.write(half_upgrade if i % 2 else bytes(range(256)) * 4)
    await writer.drain()
    writer.close()
    return "garbage http"


async def moshi_with_garbage(stack: ChorusStack, i: int) -> str:
    """Bad kinds, an empty message, text, garbage Opus: each gets an error; the session goes on."""
    try:
        client = await MoshiClient.open(stack.ws_url, voice="moshiko")
    except ConnectionRefusedError:  # no slot or the key's limit: a refusal with a reason is an answer
        return "refused"
    ws = client.ws
    garbage: list[str | bytes] = [bytes([0x07, 1, 2, 3]), b"", "text on a binary protocol"]
    garbage += [bytes([AUDIO]) + b"OggS" + bytes(200), bytes([AUDIO]) + bytes(range(256)), bytes([HANDSHAKE])]
    for message in garbage:
        await ws.send(message)
    got = await replies(ws, 1.0)
    errors = [m for m in got if isinstance(m, bytes) and m[:1] == bytes([ERROR])]
    if len(errors) < 4:
        raise Violation(f"malformed Moshi messages got {len(errors)} errors: {got[-5:]}")
    await ws.close()
    return "garbage moshi"


async def moshi_vanishing_mid_session(stack: ChorusStack, i: int) -> str:
    try:
        client = await MoshiClient.open(stack.ws_url, voice="moshiko")
    except ConnectionRefusedError:
        return "refused"
    for frame in frames(speech_like(0.4, seed=i)):
        await client.ws.send(bytes([AUDIO]) + client.encoder.encode(frame))
    drop_tcp(client.ws)
    return "vanished moshi"


REALTIME_GARBAGE: list[str] = [
    "{not json",
    "[1, 2, 3]",
    "null",
    json.dumps({"type": "no.such.event", "event_id": 5}),
    json.dumps({"type": "session.update", "event_id": 12345, "session": {"voice": "moshiko"}}),
    json.dumps({"type": "input_audio_buffer.append", "event_id": ["x"], "audio": "@@@"}),
    json.dumps({"type": "no.such.event", "event_id": "e" * 100_000}),
    json.dumps({"type": "x" * 200_000}),
    json.dumps({"type": "session.update", "session": {"instructions": 7}}),
]


async def realtime_with_garbage(stack: ChorusStack, i: int) -> str:
    """Invalid JSON, integer event ids, huge strings within the message limit: errors, not a crash."""
    ws = await connect(f"{stack.ws_url}/v1/realtime?model=moshiko", open_timeout=10, max_size=1 << 22)
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "session.created", first
    for message in REALTIME_GARBAGE:
        await ws.send(message)
    got = [json.loads(m) for m in await replies(ws, 1.5)]
    errors = [e for e in got if e.get("type") == "error"]
    if len(errors) < len(REALTIME_GARBAGE):
        raise Violation(f"{len(REALTIME_GARBAGE)} malformed events got {len(errors)} errors: {got[-5:]}")
    await ws.close()
    return "garbage realtime"


async def realtime_huge_instructions_then_vanishing(stack: ChorusStack, i: int) -> str:
    """A persona primer far over its bound, then audio (the session starts), then gone mid-session."""
    ws = await connect(f"{stack.ws_url}/v1/realtime?model=moshiko", open_timeout=10, max_size=1 << 22)
    await asyncio.wait_for(ws.recv(), 10)
    update = {"type": "session.update", "session": {"instructions": "You are terse. " * 20_000}}
    await ws.send(json.dumps(update))
    pcm = float_to_pcm16(speech_like(0.4, seed=i))
    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
    got = [json.loads(m) for m in await replies(ws, 1.0)]
    if not any(e.get("type") == "error" for e in got):
        raise Violation(f"a 300 kB primer was not refused: {[e.get('type') for e in got]}")
    drop_tcp(ws)
    return "huge realtime"


async def realtime_vanishing_mid_session(stack: ChorusStack, i: int) -> str:
    ws = await connect(f"{stack.ws_url}/v1/realtime?model=moshiko", open_timeout=10, max_size=1 << 22)
    await asyncio.wait_for(ws.recv(), 10)
    for frame in frames(speech_like(0.4, seed=i)):
        audio = base64.b64encode(float_to_pcm16(frame)).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
    await asyncio.sleep(0.05 * (i % 10))  # mid-placement, mid-priming or mid-session
    drop_tcp(ws)
    return "vanished realtime"


ABUSERS = [
    closes_before_handshake,
    drops_tcp_before_handshake,
    sends_garbage_instead_of_http,
    moshi_with_garbage,
    moshi_vanishing_mid_session,
    realtime_with_garbage,
    realtime_huge_instructions_then_vanishing,
    realtime_vanishing_mid_session,
]


async def abuse(stack: ChorusStack, i: int) -> str:
    abuser = ABUSERS[i % len(ABUSERS)]
    try:
        return await asyncio.wait_for(abuser(stack, i), CLIENT_BOUND_S)
    except TimeoutError:
        return f"VIOLATION {abuser.__name__}: no answer within {CLIENT_BOUND_S:g} s"
    except Violation as violation:
        return f"VIOLATION {abuser.__name__}: {violation}"
    except (ConnectionClosed, InvalidHandshake, OSError) as exc:
        # Refused at the door (e.g. too many sessions for the key): an answer, as long as it came.
        return f"refused: {type(exc).__name__}"


@pytest.mark.chaos_smoke
async def test_two_hundred_abusive_connections_leave_nothing_held_and_the_gateway_healthy(
    make_stack: MakeStack, observe: Observe
) -> None:
    stack = make_stack(CHORUS_PLACEMENT_WAIT_S="2")
    stack.start_services("router", "tts", "dialogue")
    observer = await observe(stack)
    began = time.monotonic()
    outcomes: list[str] = []
    for batch in range(0, CONNECTS, AT_ONCE):
        outcomes += await asyncio.gather(*(abuse(stack, i) for i in range(batch, batch + AT_ONCE)))
    abused_at = time.monotonic()
    kinds = Counter(o.split(":")[0] for o in outcomes)
    print(f"{CONNECTS} abusive connections in {abused_at - began:.1f} s: {dict(kinds)}")

    async def nothing_held() -> bool:
        free, capacity = await observer.dialogue_slots()
        return free == capacity == SLOTS and not await observer.live_sessions_of("")

    took = await seconds_until(
        nothing_held, "every slot free, the key's set empty", LEASE_S + SESSION_CHECK_S + ALLOWANCE_S
    )
    print(f"nothing held {took:.2f} s after the last abusive connection")
    violations = [o for o in outcomes if o.startswith("VIOLATION")]
    assert not violations, "\n".join(violations[:10])

    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
    call = await Call.open(stack.ws_url, voice="moshiko")
    await wait_until(lambda: call.audio_flowing(0, 15), "a normal conversation after the abuse", 15)
    assert not call.errors, call.errors
    await call.hang_up()
    assert stack.processes["gateway"].poll() is None
