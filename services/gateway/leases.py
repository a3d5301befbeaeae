"""The gateway's side of session leases: one task renews the lease of every session whose socket this
gateway serves, and tells a conversation when its session ended without it.

A worker ends a session whose lease lapsed (the gateway serving it died): this is how a crashed gateway's
sessions free their slots. The other way round, a session can end under a live socket: a worker ended it
(its lease lapsed during a long Redis outage), or Redis lost it (a restart without persistence). The
renewal sees that (the hash says ended, or is gone) and the conversation tells its client why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shared.retry import is_retryable, sleep_unless_stopped
from shared.sessions import SessionState, SessionStore

log = logging.getLogger(__name__)

LostCallback = Callable[[str], None]  # called with why the session is over


class LeaseKeeper:
    def __init__(self, store: SessionStore, *, lease_s: float, renew_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self.renew_s = renew_s
        self._sessions: dict[str, LostCallback] = {}
        self._ended_seen: set[str] = set()

    def add(self, sid: str, on_lost: LostCallback) -> None:
        self._sessions[sid] = on_lost

    def discard(self, sid: str) -> None:
        self._sessions.pop(sid, None)
        self._ended_seen.discard(sid)

    async def run(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self.renew()
                if failing:
                    log.info("session leases renewed again")
                failing = False
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                if not failing:
                    log.warning("could not renew session leases (retrying): %s", exc)
                failing = True
            await sleep_unless_stopped(stop, self.renew_s)

    async def renew(self) -> None:
        states = await self.store.renew_leases(list(self._sessions), self.lease_s)
        for sid, state in states.items():
            if state is None:
                self._lost(sid, "session_lost")
            elif state == SessionState.ENDED:
                # Normally the router's `ended` reaches the socket first; if it has not by the next
                # renewal (the router is gone too), end the socket from here.
                if sid in self._ended_seen:
                    self._lost(sid, "ended")
                self._ended_seen.add(sid)

    def _lost(self, sid: str, why: str) -> None:
        on_lost = self._sessions.pop(sid, None)
        self._ended_seen.discard(sid)
        if on_lost is not None:
            log.warning("session is over without this gateway: %s", why, extra={"session_id": sid})
            on_lost(why)
