"""Both WebSocket protocols stop their conversation however the socket's life ends: the client leaving
while the session waits for a slot, a malformed event, an error inside a loop, the server shutting down.

The real gateway runs in-process under uvicorn against the test's redis-server and is reached over real
sockets. The test plays the workers: presence records say a dialogue worker has free slots and a router
runs, and the test writes what the router would (`ready` on the session's `:out`). A stopped session is
one whose hash says `ended` (with why), whose `stop` is on the control stream for every worker, and whose
id left its owner's set of live sessions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chorus.devtools.redis_server import free_port
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from shared.bus import Bus
from shared.messages import CONTROL, INPUT, EventName, SessionEvent, SessionStop
from shared.presence import WorkerPresence
from shared.sessions import SessionState
from tests.support.waiting import wait_until

HANDSHAKE, ERROR = 0x00, 0x05
OWNER = ""  # auth is off: every caller is the anonymous owner
SILENCE_80MS = base64.b64encode(bytes(3840)).decode()
PROTOCOLS = ["moshi", "realtime"]

T = TypeVar("T")


@dataclass
class Gateway:
    app: FastAPI
    server: uvicorn.Server
    serving: asyncio.Task[None]
    ws_url: str

    async def shut_down(self) -> None:
        """What SIGTERM does: uvicorn closes every socket (code 1012), waits, runs the lifespan's exit."""
        self.server.should_exit = True
        await self.serving

    def cancel_handlers(self) -> None:
        """What uvicorn does to handlers still running after its graceful shutdown timeout."""
        for task in self.server.server_state.tasks:
            task.cancel()


@asynccontextmanager
async def running_gateway(
    redis_url: str, key_prefix: str, data_dir: Path, **overrides: Any
) -> AsyncIterator[Gateway]:
    port = free_port()
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": key_prefix,
        "data_dir": data_dir,
        "port": port,
        "session_ready_timeout_s": 30.0,  # longer than any test waits: nothing here ends by timing out
    }
    values.update(overrides)
    app = create_app(GatewaySettings(_env_file=None, **values))  # type: ignore[call-arg]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await wait_until(started, "uvicorn to listen")
    gateway = Gateway(app, server, serving, f"ws://127.0.0.1:{port}")
    # Real presence records: one dialogue worker with free slots and one router.
    for service, fields in (("dialogue", {"free_slots": 8}), ("router", {})):
        await WorkerPresence(
            app.state.bus, service, "w1", ttl_s=60, interval_s=5, describe=lambda f=fields: f
        ).beat()
    try:
        yield gateway
    finally:
        if not serving.done():
            await gateway.shut_down()


@pytest.fixture
async def gateway(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_url, key_prefix, tmp_path) as running:
        yield running


# --- the two protocols, as a client opens a session -------------------------------------------------


async def open_session(protocol: str, ws_url: str) -> tuple[ClientConnection, str]:
    """Connect and start a conversation (it now waits for its dialogue slot); the socket and session id."""
    if protocol == "moshi":
        ws = await connect(f"{ws_url}/api/chat?voice=moshika")
        assert ws.response is not None
        return ws, ws.response.headers["x-chorus-session-id"]
    ws = await connect(f"{ws_url}/v1/realtime?model=moshika")
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created"
    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": SILENCE_80MS}))
    return ws, created["session"]["id"]


async def placing(bus: Bus, sid: str) -> None:
    async def written() -> bool:
        return await bus.redis.hget(bus.names.session(sid), "state") is not None

    await wait_until(written, f"session {sid} to be placed")


async def ready(bus: Bus, sid: str, protocol: str, ws: ClientConnection) -> None:
    """Play the router: the session has its slot. The moshi client waits for the handshake."""
    await placing(bus, sid)
    await bus.append(bus.names.session_output(sid), SessionEvent(session_id=sid, seq=0, name=EventName.READY))
    if protocol == "moshi":
        assert await asyncio.wait_for(ws.recv(), 5) == bytes([HANDSHAKE])
    else:
        await wait_until(lambda: _active(bus, sid), "the gateway to read ready")


async def _active(bus: Bus, sid: str) -> bool:
    # The realtime client sees nothing on ready; the audio it sent before goes to `:in` once it is.
    return bool(await bus.redis.xlen(bus.names.session_input(sid)))


async def received_until_closed(ws: ClientConnection) -> list[str | bytes]:
    messages: list[str | bytes] = []
    try:
        async with asyncio.timeout(5):
            async for message in ws:
                messages.append(message)
    except ConnectionClosed:
        pass
    return messages


# --- what a stopped session looks like --------------------------------------------------------------


async def stop_entries(bus: Bus, sid: str) -> list[SessionStop]:
    entries = [CONTROL.decode(e.fields) for e in await bus.range(bus.names.session_control(sid))]
    return [e for e in entries if isinstance(e, SessionStop) and e.session_id == sid]


async def session_info(bus: Bus, sid: str) -> dict[str, str]:
    raw = await bus.redis.hgetall(bus.names.session(sid))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def assert_stopped(bus: Bus, sid: str, reason: str, *, timeout_s: float = 5.0) -> None:
    async def ended() -> dict[str, str] | None:
        info = await session_info(bus, sid)
        return info if info.get("state") == SessionState.ENDED else None

    info = await wait_until(ended, f"session {sid} to end", timeout_s)
    assert info["end_reason"] == reason
    assert [stop.reason for stop in await stop_entries(bus, sid)] == [reason], "every worker is told"
    assert not await bus.redis.sismember(bus.names.owner_sessions(OWNER), sid), "its key's slot is free"


# --- the client leaves ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_client_that_leaves_while_its_session_waits_for_a_slot_ends_it(
    gateway: Gateway, bus: Bus, protocol: str
) -> None:
    ws, sid = await open_session(protocol, gateway.ws_url)
    await placing(bus, sid)
    await ws.close()
    # Not after the 30 s ready timeout: the slot a worker may be priming for it is freed at once.
    await assert_stopped(bus, sid, "client_closed")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_client_that_leaves_mid_session_ends_it(gateway: Gateway, bus: Bus, protocol: str) -> None:
    ws, sid = await open_session(protocol, gateway.ws_url)
    await ready(bus, sid, protocol, ws)
    await ws.close()
    await assert_stopped(bus, sid, "client_closed")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_session_whose_client_broke_the_websocket_protocol_ends_saying_so(
    gateway: Gateway, bus: Bus, protocol: str
) -> None:
    """A text frame that is not UTF-8: the server's WebSocket layer closes with 1007. The session used to
    end as `client_closed`, as if the client had left."""
    ws, sid = await open_session(protocol, gateway.ws_url)
    await ready(bus, sid, protocol, ws)
    await ws.send(b"\xff\xfe not UTF-8", text=True)
    await assert_stopped(bus, sid, "invalid_payload")


async def test_a_realtime_clients_pcm16_reaches_the_input_stream_byte_for_byte_in_whole_frames(
    gateway: Gateway, bus: Bus
) -> None:
    """Appends of any even length are cut into 80 ms frames as they came: nothing resampled, rounded or
    lost at a chunk's edge; the remainder waits for the next append."""
    ws, sid = await open_session("realtime", gateway.ws_url)
    await ready(bus, sid, "realtime", ws)
    sent = np.random.default_rng(7).integers(-32768, 32768, 5 * 1920, dtype="<i2").tobytes()
    for start, end in ((0, 1000), (1000, 3842), (3842, 11000), (11000, 11002), (11002, len(sent) - 6)):
        await ws.send(
            json.dumps(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(sent[start:end]).decode()}
            )
        )

    async def frames() -> list[bytes]:
        return [INPUT.decode(e.fields).pcm for e in await bus.range(bus.names.session_input(sid))]

    await wait_until(lambda: _count_at_least(frames, 5), "the appended frames on :in")
    written = await frames()
    assert written[0] == bytes(3840), "the opening append's silence"
    assert b"".join(written[1:]) == sent[: 4 * 3840], "four whole frames, as sent; the rest still waits"
    await ws.close()


async def _count_at_least(read: Callable[[], Awaitable[list[bytes]]], count: int) -> bool:
    return len(await read()) >= count


# --- malformed input --------------------------------------------------------------------------------


async def test_an_event_id_that_is_a_number_gets_an_error_event_and_the_socket_stays_usable(
    gateway: Gateway,
) -> None:
    async with connect(f"{gateway.ws_url}/v1/realtime") as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "event_id": 5, "audio": "!!"}))
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert error["type"] == "error"
        assert error["error"]["code"] == "invalid_event"
        assert error["error"]["event_id"] == "5", "the client learns which of its events failed"
        assert "event_id" in error["error"]["message"]
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        updated = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert updated["type"] == "session.updated"
        assert updated["session"]["instructions"] == "Be brief."


# --- an error inside a loop -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_error_in_a_loop_is_logged_told_to_the_client_and_ends_the_session(
    gateway: Gateway, bus: Bus, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    ws, sid = await open_session(protocol, gateway.ws_url)
    await ready(bus, sid, protocol, ws)
    # A real Redis error in the emit loop's read: `:out` is no longer a stream (WRONGTYPE).
    out = bus.names.session_output(sid)
    with caplog.at_level(logging.ERROR, logger="services.gateway"):
        await bus.redis.delete(out)
        await bus.redis.set(out, "not a stream")
        messages = await received_until_closed(ws)
        await assert_stopped(bus, sid, "error")
    if protocol == "moshi":
        assert messages[-1] == bytes([ERROR]) + b"internal error; the session ended"
    else:
        error = json.loads(messages[-1])
        assert error["type"] == "error"
        assert (error["error"]["type"], error["error"]["code"]) == ("server_error", "internal_error")
    assert ws.close_code == 1011
    (record,) = [r for r in caplog.records if r.exc_info and getattr(r, "session_id", None) == sid]
    assert "WRONGTYPE" in str(record.exc_info[1])


# --- the server shuts down --------------------------------------------------------------------------


async def open_in_phase(
    protocol: str, phase: str, gateway: Gateway, bus: Bus
) -> tuple[ClientConnection, str]:
    ws, sid = await open_session(protocol, gateway.ws_url)
    if phase == "live":
        await ready(bus, sid, protocol, ws)
    else:
        await placing(bus, sid)
    return ws, sid


@pytest.mark.parametrize("phase", ["waiting_for_a_slot", "live"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_server_shutting_down_stops_its_sessions_before_it_exits(
    gateway: Gateway, bus: Bus, protocol: str, phase: str
) -> None:
    ws, sid = await open_in_phase(protocol, phase, gateway, bus)
    await gateway.shut_down()
    await assert_stopped(bus, sid, "shutdown", timeout_s=0)
    assert ws.close_code == 1012


@pytest.mark.parametrize("phase", ["waiting_for_a_slot", "live"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_cancelled_handler_still_stops_its_session(
    gateway: Gateway, bus: Bus, protocol: str, phase: str
) -> None:
    ws, sid = await open_in_phase(protocol, phase, gateway, bus)
    gateway.cancel_handlers()
    await assert_stopped(bus, sid, "shutdown")
    await ws.close()


# --- the session is lost under a live socket --------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_session_whose_state_vanishes_tells_its_client_why_and_closes(
    redis_url: str, key_prefix: str, tmp_path: Path, bus: Bus, protocol: str
) -> None:
    async with running_gateway(redis_url, key_prefix, tmp_path, session_lease_renew_s=0.2) as gateway:
        ws, sid = await open_session(protocol, gateway.ws_url)
        await ready(bus, sid, protocol, ws)
        await bus.redis.delete(bus.names.session(sid))  # what a Redis restart without persistence does
        messages = await received_until_closed(ws)
    if protocol == "moshi":
        assert messages[-1].startswith(bytes([ERROR])) and b"Redis restarted" in messages[-1]
    else:
        error = json.loads(messages[-1])
        assert error["type"] == "error" and error["error"]["code"] == "session_lost"
    assert ws.close_code == 1013, "try again: a new session will work"
    assert not await bus.redis.sismember(bus.names.owner_sessions(OWNER), sid)


@pytest.mark.parametrize("phase", ["waiting_for_a_slot", "live"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_session_ended_for_its_lapsed_lease_is_an_outage_to_its_client_not_a_normal_end(
    gateway: Gateway, bus: Bus, protocol: str, phase: str
) -> None:
    """Redis away past the lease: the gateway could not renew it, the workers end the session
    (`lease_expired`) and the router forwards `ended` once Redis is back. The client still reading is told
    of the outage (service_unavailable, 1013: try again), not closed as if the conversation had ended."""
    ws, sid = await open_session(protocol, gateway.ws_url)
    if phase == "live":
        await ready(bus, sid, protocol, ws)
    else:
        await placing(bus, sid)
    ended = SessionEvent(session_id=sid, seq=1, name=EventName.ENDED, detail="lease_expired")
    await bus.append(bus.names.session_output(sid), ended)
    if protocol == "realtime" and phase == "waiting_for_a_slot":  # a refused start keeps the socket
        async with asyncio.timeout(5):
            while (error := json.loads(await ws.recv()))["type"] != "error":
                pass
        assert error["error"]["code"] == "service_unavailable", error
        await ws.close()
    else:
        messages = await received_until_closed(ws)
        if protocol == "moshi":
            assert messages[-1].startswith(bytes([ERROR])) and b"could not renew its lease" in messages[-1]
        else:
            error = json.loads(messages[-1])
            assert error["type"] == "error" and error["error"]["code"] == "service_unavailable", error
        assert ws.close_code == 1013
    await assert_stopped(bus, sid, "service_unavailable")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_native_voice_no_worker_runs_the_model_of_is_refused_at_once_naming_it(
    redis_url: str, key_prefix: str, tmp_path: Path, protocol: str
) -> None:
    """moshika speaks only on moshika: with moshiko workers alone, its session is refused at once (not
    after the placement wait, which no slot could end), saying which model is missing and which runs."""
    async with running_gateway(redis_url, key_prefix, tmp_path, placement_wait_s=60.0) as gateway:
        await WorkerPresence(
            gateway.app.state.bus,
            "dialogue",
            "w1",
            ttl_s=60,
            interval_s=5,
            describe=lambda: {"model": "moshiko"},
        ).beat()
        async with asyncio.timeout(10):
            ws, _ = await open_session(protocol, gateway.ws_url)  # asks for moshika
            if protocol == "moshi":
                said = (await received_until_closed(ws))[-1]
                assert said.startswith(bytes([ERROR])) and b"no dialogue worker runs moshika" in said, said
                assert b"use moshiko" in said
                return
            while (event := json.loads(await ws.recv()))["type"] != "error":  # the socket stays open
                pass
    assert event["error"]["code"] == "no_capacity", event
    assert "no dialogue worker runs moshika" in event["error"]["message"]


async def test_a_live_session_keeps_its_lease_and_loses_it_when_its_socket_goes(
    redis_url: str, key_prefix: str, tmp_path: Path, bus: Bus
) -> None:
    overrides = {"session_lease_s": 1.0, "session_lease_renew_s": 0.2}
    async with running_gateway(redis_url, key_prefix, tmp_path, **overrides) as gateway:
        ws, sid = await open_session("moshi", gateway.ws_url)
        await ready(bus, sid, "moshi", ws)
        await asyncio.sleep(2.0)  # twice the lease: renewed all along
        assert await bus.redis.exists(bus.names.session_lease(sid))
        await ws.close()
        await assert_stopped(bus, sid, "client_closed")
        assert not await bus.redis.exists(bus.names.session_lease(sid)), "an ended session holds no lease"


@pytest.mark.parametrize("phase", ["waiting_for_a_slot", "live"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_cancelled_handler_raises_its_cancellation_once_its_session_is_stopped(
    gateway: Gateway, bus: Bus, protocol: str, phase: str
) -> None:
    # What the handler does with the cancellation, seen from the server that runs it (uvicorn logs it).
    outcomes: list[BaseException | None] = []
    app = gateway.server.config.loaded_app

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            outcomes.append(exc)
            raise
        outcomes.append(None)

    gateway.server.config.loaded_app = recording
    ws, sid = await open_in_phase(protocol, phase, gateway, bus)
    gateway.cancel_handlers()
    await assert_stopped(bus, sid, "shutdown")

    async def handler_done() -> bool:
        return bool(outcomes)

    await wait_until(handler_done, "the handler to end")
    assert isinstance(outcomes[0], asyncio.CancelledError), "the cancellation propagates, never swallowed"
    assert not gateway.app.state.open_sockets.count[OWNER], "and the socket's place is given back"
    await ws.close()
