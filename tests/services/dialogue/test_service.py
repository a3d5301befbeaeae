"""`chorus dialogue` as its container runs it (a process, the generated checkpoint, real Redis):
four sessions in one batch, and a dead worker's sessions resumed on a live one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.bus import Bus
from shared.messages import EventName, Placement, SessionStart, SessionStop
from shared.presence import list_workers
from shared.sessions import SessionStore
from tests.services.dialogue.conftest import DialogueReader, WorkerProcess
from tests.services.dialogue.test_worker import talk
from tests.support.sessions import open_session
from tests.support.waiting import wait_until

StartProcess = Callable[..., WorkerProcess]


async def serving(bus: Bus, *workers: WorkerProcess) -> None:
    async def all_up() -> bool:
        for worker in workers:
            assert worker.process.poll() is None, f"{worker.worker_id} exited:\n{worker.log_tail()}"
        up = {w.worker_id for w in await list_workers(bus, "dialogue") if w.free_slots > 0}
        return up >= {w.worker_id for w in workers}

    await wait_until(all_up, "the dialogue workers did not come up", 90)


async def test_chorus_dialogue_serves_four_sessions_in_one_batch(
    bus: Bus, worker_processes: StartProcess
) -> None:
    worker = worker_processes("solo", CHORUS_DIALOGUE_SLOTS="4")
    await serving(bus, worker)
    sids = [f"conv{i}" for i in range(4)]
    for sid in sids:
        await open_session(bus, SessionStart(session_id=sid))
    readers = [DialogueReader(bus, sid) for sid in sids]
    for reader in readers:
        await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "no ready event")
    await asyncio.gather(*(talk(bus, sid, range(0, 40)) for sid in sids))
    for reader in readers:
        await reader.until(lambda r: len(r.frames) >= 10, 30, "frames did not flow")

    readies = [r.event(EventName.READY) for r in readers]
    assert {e.data_as(Placement).worker for e in readies if e} == {"solo"}
    assert sorted(e.data_as(Placement).slot for e in readies if e) == [0, 1, 2, 3], (
        "one row each of one batch"
    )
    (info,) = await list_workers(bus, "dialogue")
    assert info.fields["capacity"] == "4" and info.free_slots == 0
    for sid in sids:
        await bus.append_control(SessionStop(session_id=sid))
    for reader in readers:
        await reader.until(lambda r: r.event(EventName.ENDED) is not None, 15, "no ended event")


async def test_dead_worker_sessions_are_resumed_on_a_live_worker(
    bus: Bus, worker_processes: StartProcess
) -> None:
    first = worker_processes("first")
    await serving(bus, first)
    await open_session(bus, SessionStart(session_id="survivor"))
    reader = DialogueReader(bus, "survivor")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "no ready event")
    await talk(bus, "survivor", range(0, 30))
    await reader.until(lambda r: len(r.frames) >= 5, 30, "frames did not flow")
    spoken_before = "".join(f.text for f in reader.frames)

    second = worker_processes("second")
    await serving(bus, second)
    first.kill()  # kill -9: no goodbye, its start entry stays pending and goes idle
    await reader.until(lambda r: r.event(EventName.RESUMED) is not None, 60, "never resumed")
    await talk(bus, "survivor", range(100, 140))
    resumed_at = len(reader.frames)
    await reader.until(lambda r: len(r.frames) >= resumed_at + 5, 30, "no frames after the resume")

    resumed = reader.event(EventName.RESUMED)
    assert resumed is not None
    assert (
        resumed.data_as(Placement).worker == "second"
        and resumed.data_as(Placement).previous_worker == "first"
    )
    assert resumed.data_as(Placement).primer_tokens > 0 or not spoken_before.strip(), (
        "re-primed with the transcript"
    )
    seqs = [e.seq for e in reader.entries]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "the new owner continued the numbering"
    survivor = await SessionStore(bus, 60).get("survivor")
    assert survivor is not None and survivor.workers["dialogue_worker"] == "second"
