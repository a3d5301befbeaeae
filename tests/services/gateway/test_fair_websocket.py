"""The gateway's WebSocket protocol under a real uvicorn server and a real client: a socket is read on
while its app waits for messages, stops being read once messages wait for the app, and hands over a
message that was already waiting only after every other task ran once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect

from services.gateway.fair_websocket import FAIR_RECEIVE, FairWebSocketProtocol
from services.gateway.protocols.session_socket import receive_fairly
from tests.support.waiting import wait_until

MESSAGES = 2000
MESSAGE = b"\x01" + bytes(999)
ONE_READ = 256 * 1024  # asyncio's largest socket read


class App:
    """Takes the socket's messages once `take` is set, noting the other tasks' turns at each."""

    def __init__(self) -> None:
        self.take = asyncio.Event()
        self.all_taken = asyncio.Event()
        self.received: list[bytes] = []
        self.turns_seen: list[int] = []
        self.turns = 0
        self.yields_itself = False  # the protocol says it yields: receive_fairly adds no turn of its own

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.yields_itself = FAIR_RECEIVE in scope["extensions"]
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        await self.take.wait()
        while (message := await receive_fairly(websocket))["type"] != "websocket.disconnect":
            self.received.append(message["bytes"])
            self.turns_seen.append(self.turns)
            if len(self.received) == MESSAGES:
                self.all_taken.set()

    async def count_turns(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def serving(app: App) -> AsyncIterator[tuple[uvicorn.Server, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, ws=FairWebSocketProtocol, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        return server.started

    try:
        await wait_until(started, "uvicorn to listen")
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def test_messages_waiting_for_the_app_stop_the_reading_and_are_taken_in_turn() -> None:
    app = App()
    turns = asyncio.create_task(app.count_turns())
    try:
        await _flood_then_take(app)
    finally:
        turns.cancel()
    assert app.yields_itself
    assert app.received == [MESSAGE] * MESSAGES
    waiting = list(zip(app.turns_seen, app.turns_seen[1:], strict=False))
    assert all(later > earlier for earlier, later in waiting), "other tasks ran between two messages"


async def _flood_then_take(app: App) -> None:
    async with serving(app) as (server, port), connect(f"ws://127.0.0.1:{port}/api/chat") as client:
        try:
            protocol = await _sent_untaken(server, client, MESSAGE, MESSAGES)
            assert not protocol.transport.is_reading()
            assert protocol.queue.qsize() * len(MESSAGE) <= ONE_READ + len(MESSAGE)
        finally:
            app.take.set()  # else a failure leaves the app waiting, and the server's shutdown with it
        await asyncio.wait_for(app.all_taken.wait(), 30)
        assert protocol.transport.is_reading(), "nothing waits: the socket is read again"


async def _sent_untaken(
    server: uvicorn.Server, client: ClientConnection, message: bytes, count: int
) -> FairWebSocketProtocol:
    """Sends `count` messages the app does not take yet; the socket's protocol, once its reading paused
    and a while later (nothing more is read or parsed meanwhile)."""
    for _ in range(count):
        await client.send(message)
    (protocol,) = server.server_state.connections
    assert isinstance(protocol, FairWebSocketProtocol)

    async def paused() -> bool:
        return not protocol.transport.is_reading()

    await wait_until(paused, "messages waiting for the app to pause the socket's reading", 10)
    await asyncio.sleep(0.2)  # the app still takes nothing
    return protocol


async def test_a_malformed_upgrade_is_refused_quietly_and_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    """websockets refuses an upgrade without a key with 400: the handshake never reaches the app (there
    is no scope to mark). Nothing is logged at ERROR (anyone could fill the log with alarms), and the
    server keeps no connection for it (each would be held until shutdown, and hold the shutdown)."""
    request = (
        b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with caplog.at_level(logging.ERROR):
        async with serving(App()) as (server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(100), 5)
            writer.close()
            for _ in range(50):  # the server notices the close within a few loop turns
                if not server.server_state.connections:
                    break
                await asyncio.sleep(0.02)
            held = len(server.server_state.connections)
            server.force_exit = held > 0  # else the shutdown waits for the held connection forever
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert held == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_deflated_messages_waiting_are_what_one_slice_inflates_to() -> None:
    """With per-message deflate the client picks the ratio: a 1 MiB message of zeros is ~1 KiB on the
    wire, so one read (256 KiB) could become ~250 messages of 1 MiB waiting for the app. The next slice is
    parsed only once the app took what waits; every message still arrives, in order."""
    app = App()
    big = bytes(1 << 20)
    count = 300  # ~300 KiB deflated: more than one read
    async with serving(app) as (server, port), connect(f"ws://127.0.0.1:{port}/v1/realtime") as client:
        assert client.protocol.extensions, "the client offered per-message deflate and the server took it"
        try:
            waiting = (await _sent_untaken(server, client, big, count)).queue.qsize()
        finally:
            app.take.set()  # else a failure leaves the app waiting, and the server's shutdown with it
        assert waiting * len(big) <= 8 << 20  # ~4 from one 4 KiB slice; ~100 before

        async def all_taken() -> bool:
            return len(app.received) == count

        await wait_until(all_taken, "the app to take every message", 30)
    assert all(message == big for message in app.received)
