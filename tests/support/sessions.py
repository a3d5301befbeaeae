"""Opening a session as the gateway does (hash, lease, then the `start`), for tests that drive workers
without a gateway."""

from __future__ import annotations

from typing import Any

from shared.bus import Bus
from shared.messages import SessionStart
from shared.sessions import SessionStore


async def open_session(
    bus: Bus, session: str | SessionStart, *, lease_s: float = 120, **start: Any
) -> SessionStart:
    message = session if isinstance(session, SessionStart) else SessionStart(session_id=session, **start)
    await SessionStore(bus, 600).open(message, lease_s=lease_s)
    return message
