"""The session ownership protocol (shared/ownership.py) against a real redis-server: taking, failover,
liveness and the end of a session, as every worker kind uses them."""

from __future__ import annotations

import asyncio

from shared.bus import Bus
from shared.messages import CONTROL, SessionStart, SessionStop
from shared.ownership import Liveness, SessionOwnership, TakeOutcome
from shared.presence import WorkerPresence
from shared.sessions import SessionState, SessionStore
from tests.support.sessions import open_session


def ownership(bus: Bus, worker_id: str, group: str = "router") -> SessionOwnership:
    return SessionOwnership(
        bus, SessionStore(bus, 60), service="router", group=group, worker_id=worker_id, field="router_worker"
    )


async def alive(bus: Bus, worker_id: str) -> None:
    await WorkerPresence(bus, "router", worker_id, ttl_s=30, interval_s=1).beat()


async def test_a_live_session_is_taken_by_exactly_one_worker(bus: Bus) -> None:
    await open_session(bus, "s1")
    first, second = ownership(bus, "w1"), ownership(bus, "w2")
    outcomes = await asyncio.gather(first.take("s1"), second.take("s1"))
    assert sorted(outcomes) == [TakeOutcome.OWNED, TakeOutcome.TAKEN]
    winner = "w1" if outcomes[0] is TakeOutcome.TAKEN else "w2"
    info = await SessionStore(bus, 60).get("s1")
    assert info is not None and info.workers["router_worker"] == winner
    assert await bus.redis.smembers(bus.names.owned("router", winner)) == {b"s1"}
    assert await ownership(bus, winner).take("s1") is TakeOutcome.TAKEN, "taking again is harmless"


async def test_a_session_that_is_over_is_not_taken(bus: Bus) -> None:
    worker = ownership(bus, "w1")
    assert await worker.take("never-opened") is TakeOutcome.GONE
    await open_session(bus, "ended")
    await SessionStore(bus, 60).update("ended", state=SessionState.ENDED)
    assert await worker.take("ended") is TakeOutcome.ENDED
    await open_session(bus, "stopped")
    worker.stops.remember("stopped")
    assert await worker.take("stopped") is TakeOutcome.ENDED, "a stop seen before its start wins"
    await open_session(bus, "orphan")
    await bus.redis.delete(bus.names.session_lease("orphan"))
    assert await worker.take("orphan") is TakeOutcome.LEASE_LAPSED


async def test_a_dead_workers_sessions_move_to_exactly_one_live_worker_each(bus: Bus) -> None:
    dead = ownership(bus, "dead")  # it never beats: its presence is gone
    sids = [f"s{i}" for i in range(5)]
    for sid in sids:
        await open_session(bus, sid, voice="moshiko")
        assert await dead.take(sid) is TakeOutcome.TAKEN
    await SessionStore(bus, 60).update("s0", voice="moshika")  # an update after the start
    survivors = [ownership(bus, "a"), ownership(bus, "b")]
    for survivor in survivors:
        await alive(bus, survivor.worker_id)

    taken = await asyncio.gather(survivors[0].take_over(3), survivors[1].take_over(3))
    moved = [t.start.session_id for batch in taken for t in batch]
    assert sorted(moved) == sids, "every session moved, none twice"
    assert all(len(batch) <= 3 for batch in taken), "nobody takes more than its room"
    by_sid = {t.start.session_id: t for batch in taken for t in batch}
    assert by_sid["s0"].start.voice == "moshika", "served as it is now, not as it started"
    assert {t.previous_worker for t in by_sid.values()} == {"dead"}
    owners = await bus.redis.smembers(bus.names.owners("router"))
    assert b"dead" not in owners, "a dead worker with nothing left is forgotten"


async def test_a_live_workers_sessions_stay_where_they_are(bus: Bus) -> None:
    owner, other = ownership(bus, "owner"), ownership(bus, "other")
    await alive(bus, "owner")
    await open_session(bus, "s1")
    await owner.take("s1")
    assert await other.take_over(10) == []
    assert await owner.check(["s1"]) == {"s1": Liveness.LIVE}


async def test_liveness_says_why_a_session_is_not_live_any_more(bus: Bus) -> None:
    worker = ownership(bus, "w1")
    store = SessionStore(bus, 60)
    for sid in ("live", "moved", "lapsed", "ended"):
        await open_session(bus, sid)
        await worker.take(sid)
    await store.update("moved", router_worker="w2")  # another worker took it while this one was paused
    await bus.redis.delete(bus.names.session_lease("lapsed"))
    await store.update("ended", state=SessionState.ENDED)
    assert await worker.check(["live", "moved", "lapsed", "ended", "gone"]) == {
        "live": Liveness.LIVE,
        "moved": Liveness.MOVED,
        "lapsed": Liveness.LEASE_LAPSED,
        "ended": Liveness.ENDED,
        "gone": Liveness.GONE,
    }


async def test_a_lapsed_lease_ends_the_session_once_for_everyone(bus: Bus) -> None:
    store = SessionStore(bus, 60)
    start = SessionStart(session_id="lost", owner="alice")
    await store.register("alice", "lost", limit=4)
    await store.open(start, lease_s=60)
    await bus.redis.delete(bus.names.session_lease("lost"))
    await asyncio.gather(ownership(bus, "w1").end_lapsed("lost"), ownership(bus, "w2").end_lapsed("lost"))

    info = await store.get("lost")
    assert info is not None
    assert info.state == SessionState.ENDED and info.end_reason == "lease_expired"
    stops = [CONTROL.decode(e.fields) for e in await bus.range(bus.names.session_control("lost"))]
    assert [m for m in stops if isinstance(m, SessionStop)] == [
        SessionStop(session_id="lost", reason="lease_expired", created_at=stops[-1].created_at)
    ], "exactly one stop, so every owner ends it"
    assert await store.live_session_ids("alice") == [], "the owner's session budget is back"


async def test_a_worker_restarted_under_the_same_id_takes_over_what_it_owned_before(bus: Bus) -> None:
    before = ownership(bus, "pod-1")  # e.g. a container restarted as pid 1 with an explicit worker id
    for sid in ("s1", "s2"):
        await open_session(bus, sid)
        await before.take(sid)
    after = ownership(bus, "pod-1")
    await alive(bus, "pod-1")  # its presence is back at once: nobody else would take these over
    assert await after.set_leftovers_aside() == 2
    await open_session(bus, "new")
    assert await after.take("new") is TakeOutcome.TAKEN  # placed while the leftovers wait: not one of them
    taken = await after.take_over(10)
    assert sorted(t.start.session_id for t in taken) == ["s1", "s2"]
    assert await bus.redis.smembers(bus.names.owned("router", "pod-1")) == {b"s1", b"s2", b"new"}
    assert await after.take_over(10) == [], "adopted once"
    assert b"pod-1" in await bus.redis.smembers(bus.names.owners("router")), "still findable if it dies"


async def admit_after(worker: SessionOwnership, start: SessionStart, delay_s: float) -> SessionStart | None:
    await asyncio.sleep(delay_s)
    return await worker.admit(start)


async def test_a_start_read_while_its_session_is_taken_over_is_not_served_twice(bus: Bus) -> None:
    """The start (read late through the group) and the takeover of the same session race in one worker:
    the session is served once, as a takeover, whichever reply the event loop resumes first."""
    for round_ in range(60):
        sid, group = f"race{round_}", f"router{round_}"  # a group per round: nothing else to take over
        start = await open_session(bus, sid)
        assert await ownership(bus, "dead", group).take(sid) is TakeOutcome.TAKEN  # it never beats
        worker = ownership(bus, "live", group)

        # The start arrives at another point of the takeover each round.
        late_admit = admit_after(worker, start, delay_s=round_ * 0.00005)
        taken_over, admitted = await asyncio.gather(worker.take_over(10), late_admit)
        assert [t.start.session_id for t in taken_over] == [sid]
        assert admitted is None, f"round {round_}: the start was served too, afresh"
