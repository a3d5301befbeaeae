"""`run_loops`, the task plumbing both WebSocket protocols share, with plain coroutines for loops: one
TaskGroup holds every task of a socket, the first loop to end ends the session, and a cancellation from
outside cancels them all and propagates. (With a real gateway, Redis and sockets:
tests/services/gateway/test_session_faults.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field

import pytest

from services.gateway.protocols.session_socket import Ending, SocketClosed, run_loops
from shared.errors import ChorusError, InvalidRequest, NoCapacity


@dataclass
class Socket:
    """Loops that run until told otherwise, recording how each ended."""

    started: set[str] = field(default_factory=set)
    ended: dict[str, str] = field(default_factory=dict)
    reported: list[ChorusError] = field(default_factory=list)
    drained: int = 0
    all_running: asyncio.Event = field(default_factory=asyncio.Event)

    def loop(
        self, name: str, body: Callable[[], Awaitable[None]] | None = None
    ) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            self.started.add(name)
            if len(self.started) == 4:
                self.all_running.set()
            try:
                await (body() if body else asyncio.Event().wait())
            except asyncio.CancelledError:
                self.ended[name] = "cancelled"
                raise
            self.ended[name] = "returned"

        return run

    async def drain(self) -> None:
        self.drained += 1

    def serve(
        self, place: Callable[[], Awaitable[None]] | None = None, **bodies: Callable[[], Awaitable[None]]
    ) -> Coroutine[None, None, Ending]:
        loops = {name: self.loop(name, bodies.get(name)) for name in ("send", "receive", "emit", "key")}
        return run_loops(
            {"session_id": "s1"},
            self.reported.append,
            send=loops["send"],
            drained=self.drain,
            place=place,
            receive=loops["receive"],
            emit=loops["emit"],
            key=loops["key"],
        )


async def returns() -> None:
    await asyncio.sleep(0)


async def test_the_first_loop_to_end_ends_the_session_and_every_other_task_is_cancelled() -> None:
    socket = Socket()
    ending = await socket.serve(emit=returns)
    assert ending == Ending("session_ended")
    assert socket.ended == {
        "emit": "returned",
        "receive": "cancelled",
        "key": "cancelled",
        "send": "cancelled",
    }
    assert socket.drained == 1, "what is queued for the client is sent first"


async def test_a_loop_that_fails_ends_the_session_with_its_error_told_to_the_client() -> None:
    async def invalid() -> None:
        raise InvalidRequest("no")

    async def client_left() -> None:
        raise SocketClosed(1001)

    socket = Socket()
    ending = await socket.serve(receive=invalid)
    assert isinstance(ending.error, InvalidRequest) and ending.reason == InvalidRequest.code
    assert socket.reported == [ending.error]
    assert await Socket().serve(receive=client_left) == Ending("client_closed")


async def test_a_refused_placement_ends_the_session_before_any_loop_starts() -> None:
    async def refused() -> None:
        await asyncio.sleep(0)  # placing waits for the session's slot
        raise NoCapacity("no slot")

    socket = Socket()
    ending = await socket.serve(place=refused)
    assert ending.reason == NoCapacity.code
    assert socket.started == {"send"}, "only the sender ran: it tells the client why"
    assert socket.ended == {"send": "cancelled"}
    assert socket.drained == 1


async def test_an_outside_cancellation_cancels_every_task_and_propagates() -> None:
    socket = Socket()
    serving = asyncio.create_task(socket.serve())
    await socket.all_running.wait()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert set(socket.ended.values()) == {"cancelled"} and len(socket.ended) == 4
    assert socket.drained == 0, "a cancelled handler does not wait for a client"


async def test_a_failing_send_loop_is_logged_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    send_failed = asyncio.Event()

    async def broken() -> None:
        send_failed.set()
        raise ValueError("encoder broke")

    emit_may_end = asyncio.Event()

    async def emit() -> None:
        await emit_may_end.wait()

    socket = Socket()
    with caplog.at_level(logging.ERROR):
        serving = asyncio.create_task(socket.serve(send=broken, emit=emit))
        await send_failed.wait()
        await asyncio.sleep(0)  # the failure reaches the send loop's wrapper
        assert not serving.done()
        emit_may_end.set()
        assert await serving == Ending("session_ended")
    (record,) = [r for r in caplog.records if r.exc_info]
    assert getattr(record, "session_id", None) == "s1"
    assert record.exc_info is not None and str(record.exc_info[1]) == "encoder broke"
