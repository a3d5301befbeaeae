"""Lifetime policies without a stack: the idle clock counted in output frames, played frame by frame, and
how a realtime client's `idle_timeout_ms` is read and bounded. The real stack: tests/e2e/test_lifetime.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.gateway.lifetime import Lifetime
from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.realtime import idle_timeout_s
from services.gateway.settings import GatewaySettings
from shared.errors import IdleTimeout, InvalidRequest, SessionExpired
from shared.messages import EventName, OutputAudio, SessionEvent

SID = "sess_test"
FRAME = OutputAudio(session_id=SID, seq=0, pcm=bytes(3840))


def speech(name: EventName) -> SessionEvent:
    return SessionEvent(session_id=SID, seq=0, name=name)


def test_idle_time_is_counted_in_output_frames_and_never_while_the_user_speaks() -> None:
    """Each frame counts once the next one has come without a speech edge between them (the edge of a
    natively voiced session's tick follows its audio): 5 frames of idleness take 6 frames to see."""
    lifetime = Lifetime(idle_s=0.4, started_at=0.0)  # 5 frames
    for _ in range(5):
        lifetime.observe(FRAME)
    assert lifetime.reached(now=1000.0) is None, "no max length: only the idle clock counts"
    lifetime.observe(speech(EventName.SPEECH_STARTED))  # on the 5th frame's tick, after its audio
    for _ in range(50):
        lifetime.observe(FRAME)
    assert lifetime.reached(now=1000.0) is None, "a user speaking longer than the timeout is not idle"
    lifetime.observe(speech(EventName.SPEECH_STOPPED))
    for _ in range(5):
        lifetime.observe(FRAME)
    assert lifetime.reached(now=1000.0) is None, "the clock restarts when the user stops speaking"
    lifetime.observe(FRAME)
    reached = lifetime.reached(now=1000.0)
    assert isinstance(reached, IdleTimeout) and reached.code == "idle_timeout"
    assert lifetime.quiet_ms == 400


def test_the_maximum_length_is_wall_clock_time_from_the_start() -> None:
    lifetime = Lifetime(max_s=3600.0, idle_s=0.0, started_at=100.0)
    for _ in range(100_000):
        lifetime.observe(FRAME)
    assert lifetime.reached(now=3699.0) is None, "the idle timeout is off"
    reached = lifetime.reached(now=3700.0)
    assert isinstance(reached, SessionExpired)
    assert "60 minutes" in reached.detail


def update(session: dict[str, Any]) -> ev.SessionConfig:
    event = ev.CLIENT_EVENT.validate_python({"type": "session.update", "session": session})
    assert isinstance(event, ev.SessionUpdateEvent)
    return event.session


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        (
            {"audio": {"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000}}}},
            (True, 5000),
        ),
        ({"turn_detection": {"type": "server_vad", "idle_timeout_ms": 7000}}, (True, 7000)),  # beta shape
        ({"audio": {"input": {"turn_detection": None}}}, (True, None)),  # null: back to the gateway's own
        ({"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}, (True, None)),
        ({"instructions": "Hi"}, (False, None)),
    ],
)
def test_idle_timeout_ms_is_read_from_both_session_shapes(
    session: dict[str, Any], expected: tuple[bool, int | None]
) -> None:
    assert update(session).idle_timeout_update() == expected


def test_idle_timeout_ms_must_be_an_integer() -> None:
    error = ev.parse_client_event(
        '{"type": "session.update", "session": {"turn_detection": {"idle_timeout_ms": "5000"}}}'
    )
    assert isinstance(error, ev.ErrorDetail) and error.code == "invalid_event"
    assert "idle_timeout_ms" in error.message


def test_idle_timeout_ms_may_shorten_the_gateways_limits_never_lengthen_them() -> None:
    settings = GatewaySettings(_env_file=None, idle_timeout_s=30.0, max_session_s=3600.0)  # type: ignore[call-arg]
    assert idle_timeout_s(5000, settings) == 5.0
    assert idle_timeout_s(None, settings) == 30.0
    for bad in (0, 999, 30_001, -5):
        with pytest.raises(InvalidRequest, match="from 1000 to 30000"):
            idle_timeout_s(bad, settings)
    no_idle = GatewaySettings(_env_file=None, idle_timeout_s=0.0, max_session_s=120.0)  # type: ignore[call-arg]
    with pytest.raises(InvalidRequest, match="from 1000 to 120000"):
        idle_timeout_s(10**400, no_idle)


@pytest.mark.parametrize("field", ["max_session_s", "idle_timeout_s"])
def test_an_infinite_limit_is_refused_at_start_zero_is_off(field: str) -> None:
    # Accepted, `inf` broke every realtime session: its idle_timeout_ms (round(inf * 1000)) overflows.
    with pytest.raises(ValidationError, match="finite number"):
        GatewaySettings(_env_file=None, **{field: "inf"})  # type: ignore[call-arg]


def test_a_gateway_idle_timeout_under_a_second_is_refused_at_start() -> None:
    # Accepted, session.created said idle_timeout_ms 500, and a client echoing it back was refused.
    with pytest.raises(ValidationError, match=r"IDLE_TIMEOUT_S \(0.5\) must be 0 \(off\) or at least 1 s"):
        GatewaySettings(_env_file=None, idle_timeout_s=0.5)  # type: ignore[call-arg]


def test_a_session_hash_that_would_expire_before_its_lease_is_refused_at_start() -> None:
    # Accepted, a dead gateway's sessions lost their hash before the lease lapsed: the workers let them go
    # as moved, and their transcripts never ended.
    with pytest.raises(
        ValidationError, match=r"SESSION_TTL_S \(20\) must be longer than CHORUS_SESSION_LEASE_S"
    ):
        GatewaySettings(_env_file=None, session_ttl_s=20)  # type: ignore[call-arg]
    GatewaySettings(_env_file=None, session_ttl_s=31)  # type: ignore[call-arg]
