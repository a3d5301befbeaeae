"""Adapters on a dialogue worker: loaded on first use into a bank slot, evicted least recently used when
no session uses them, refused when every slot is in use; sessions with and without one share a worker."""

from __future__ import annotations

import asyncio
import json
import signal
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from chorus.devtools.lora_adapter import write_random_adapter
from services.dialogue.adapter_cache import AdapterCache, refuse_with_quantized
from services.dialogue.adapters import NO_ADAPTER, AdapterBank, layer_shapes, read_adapter
from services.dialogue.model import MoshiModel
from shared.adapter_store import FILE, AdapterRecord, AdapterStore
from shared.adapters import check_adapter
from shared.bus import Bus
from shared.errors import ModelLoadError, NoCapacity, NotFound, Unprocessable, UnsupportedMedia
from shared.messages import (
    EventName,
    Failure,
    PersonaSpec,
    Placement,
    SessionStart,
    SessionStop,
    SessionUpdate,
)
from shared.presence import list_workers
from shared.sessions import SessionStore, start_of
from shared.storage import LocalStorage
from tests.services.dialogue.conftest import DialogueReader, RunningWorker, WorkerProcess
from tests.services.dialogue.test_worker import talk
from tests.support.sessions import open_session
from tests.support.waiting import wait_until

StartWorker = Callable[..., Awaitable[RunningWorker]]


async def store_adapters(
    store: AdapterStore, moshi_dir: Path, folder: Path, shapes: dict[str, tuple[int, int]], count: int
) -> list[str]:
    ids = []
    for n in range(count):
        data = write_random_adapter(folder / f"a{n}.safetensors", moshi_dir, seed=n).read_bytes()
        layout = check_adapter(data, shapes)
        record = AdapterRecord.of(f"adapter_{n}", "", f"a{n}", "moshiko", layout, len(data))
        await store.create(record, data)
        ids.append(record.id)
    return ids


@pytest.fixture
def bank(moshi_model: MoshiModel) -> Iterator[AdapterBank]:
    made = AdapterBank(moshi_model.lm, batch_size=2, slots=2, max_rank=8)
    yield made
    made.remove()


async def in_this_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


async def test_the_least_recently_used_idle_adapter_is_evicted_and_a_full_bank_refuses(
    bank: AdapterBank, moshi_dir: Path, tmp_path: Path
) -> None:
    store = AdapterStore(LocalStorage(tmp_path / "data"))
    a, b, c = await store_adapters(store, moshi_dir, tmp_path, bank.shapes, 3)
    cache = AdapterCache(bank, store, in_this_thread)

    slot_a, slot_b = await cache.acquire(a), await cache.acquire(b)
    assert {slot_a, slot_b} == {1, 2} and await cache.acquire(a) == slot_a and cache.loads == 2
    cache.release(a)
    cache.release(a)  # a: no session uses it any more, and it is the least recently used
    with pytest.raises(NotFound):
        await cache.acquire("adapter_deleted")  # its file is gone: a stays held, nothing was replaced
    assert cache.held() == [b, a] and cache.loads == 2
    assert await cache.acquire(c) == slot_a and cache.held() == [b, c] and cache.loads == 3
    with pytest.raises(NoCapacity, match="adapter slots"):
        await cache.acquire(a)  # b and c are in use
    weight = bank.lm.get_submodule("text_linear").lora_A.weight
    assert weight[slot_a].abs().sum() > 0 and not weight[NO_ADAPTER].any()


async def test_an_adapter_wider_than_the_bank_or_that_its_loader_refuses_is_unprocessable(
    bank: AdapterBank, moshi_dir: Path, tmp_path: Path
) -> None:
    """A rank past the worker's is refused from its record, before the file is read and converted on the
    model thread (a file since removed proves it was not read). A file safetensors' loader refuses, past
    the header checks (a lone surrogate in its metadata, which Python's JSON takes), is a 415, not an
    exception every session start repeats."""
    store = AdapterStore(LocalStorage(tmp_path / "data"))
    data = write_random_adapter(tmp_path / "wide.safetensors", moshi_dir, rank=16).read_bytes()
    record = AdapterRecord.of(
        "adapter_wide", "", "wide", "moshiko", check_adapter(data, bank.shapes), len(data)
    )
    await store.create(record, data)
    (file,) = (tmp_path / "data").rglob(FILE)
    file.unlink()  # read, it would be a NotFound
    cache = AdapterCache(bank, store, in_this_thread)
    with pytest.raises(Unprocessable, match="rank 16 is above this worker's 8"):
        await cache.acquire("adapter_wide")
    assert cache.loads == 0 and cache.held() == []

    narrow = write_random_adapter(tmp_path / "narrow.safetensors", moshi_dir, rank=4).read_bytes()
    (length,) = struct.unpack("<Q", narrow[:8])
    header = json.loads(narrow[8 : 8 + length])
    header["__metadata__"]["note"] = "\ud800"
    raw = json.dumps(header).encode()
    odd = struct.pack("<Q", len(raw)) + raw + narrow[8 + length :]
    with pytest.raises(UnsupportedMedia, match="does not load"):
        read_adapter(odd, bank.shapes, torch.device("cpu"), torch.float32)


def test_an_lm_with_int8_weights_is_refused() -> None:
    lm = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    lm[0].weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ModelLoadError, match="unquantized"):
        refuse_with_quantized(lm)


async def test_sessions_with_and_without_an_adapter_share_one_worker(
    bus: Bus, start_worker: StartWorker, moshi_model: MoshiModel, moshi_dir: Path, tmp_path: Path
) -> None:
    store = AdapterStore(LocalStorage(tmp_path))  # the worker's CHORUS_DATA_DIR
    (adapter,) = await store_adapters(store, moshi_dir, tmp_path, layer_shapes(moshi_model.lm), 1)
    running = await start_worker(dialogue_adapter_memory=50_000_000, dialogue_adapter_max_rank=8)
    worker = running.worker
    await open_session(bus, SessionStart(session_id="tuned", persona=PersonaSpec(adapter=adapter)))
    await open_session(bus, SessionStart(session_id="plain"))
    readers = [DialogueReader(bus, "tuned"), DialogueReader(bus, "plain")]
    for reader in readers:
        await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "no ready event")
        await talk(bus, reader.sid, range(0, 12))
    for reader in readers:
        await reader.until(lambda r: len(r.frames) >= 4, 30, "frames did not follow")

    assert worker.adapters is not None and worker.adapters.loads == 1
    rows = {sid: session.row for sid, session in worker.sessions.items()}
    assert worker.batcher.adapters is not None
    assert worker.adapters.bank.slot_of(rows["tuned"]) != NO_ADAPTER
    assert worker.adapters.bank.slot_of(rows["plain"]) == NO_ADAPTER

    async def listed() -> bool:
        workers = await list_workers(bus, "dialogue")
        return any(adapter in w.fields.get("adapters", "").split() for w in workers)

    await wait_until(listed, "the worker's presence never listed the adapter it holds", 10)
    assert await store.layers("moshiko") == layer_shapes(moshi_model.lm)
    await bus.append_control(SessionStop(session_id="tuned"))
    await readers[0].until(lambda r: r.event(EventName.ENDED) is not None, 10, "no ended event")
    assert worker.adapters.held() == [adapter], "kept on the device for the next session that names it"


async def test_a_worker_without_adapter_memory_refuses_a_session_naming_one(
    bus: Bus, start_worker: StartWorker
) -> None:
    await start_worker()
    await open_session(bus, SessionStart(session_id="tuned", persona=PersonaSpec(adapter="adapter_x")))
    reader = DialogueReader(bus, "tuned")
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 20, "never refused")
    error = reader.event(EventName.ERROR)
    assert error is not None and error.data_as(Failure).code == "no_capacity"
    assert "serves no LoRA adapters" in error.detail


async def test_a_start_naming_an_adapter_goes_to_a_worker_that_serves_adapters(
    bus: Bus,
    worker_processes: Callable[..., WorkerProcess],
    moshi_model: MoshiModel,
    moshi_dir: Path,
    tmp_path: Path,
) -> None:
    """Two `chorus dialogue` processes of one group, one without adapter memory (an int8 worker, say):
    whichever reads a start naming an adapter, the one serving adapters places it; also when it is not
    reading as the start comes (stopped for 0.3 s here: busy, or just joined). The plain worker used to
    read its own hand-offs straight back, 16 hops in 20 ms, and refuse the start as one serving no
    adapters (seen in a loaded `make test`)."""
    store = AdapterStore(LocalStorage(tmp_path / "data"))  # the processes' CHORUS_DATA_DIR
    (adapter,) = await store_adapters(store, moshi_dir, tmp_path, layer_shapes(moshi_model.lm), 1)
    plain = worker_processes("plain")
    tuned = worker_processes(
        "tuned", CHORUS_DIALOGUE_ADAPTER_MEMORY="50000000", CHORUS_DIALOGUE_ADAPTER_MAX_RANK="8"
    )

    async def both_serving() -> bool:
        return sum(w.free_slots for w in await list_workers(bus, "dialogue")) == 8

    await wait_until(both_serving, f"the workers never served: {plain.log_tail()}{tuned.log_tail()}", 90)
    assert [await placing_worker(bus, f"tuned{n}", adapter) for n in range(3)] == ["tuned"] * 3
    tuned.process.send_signal(signal.SIGSTOP)
    try:
        # Stopped, it would still be served an entry by the XREADGROUP it is blocked in: unblock every
        # blocked reader (the plain worker blocks again at once; the stopped one cannot).
        for client in await bus.redis.client_list():
            if "b" in client["flags"]:
                await bus.redis.client_unblock(int(client["id"]))
        await open_session(
            bus, SessionStart(session_id="while-stopped", persona=PersonaSpec(adapter=adapter))
        )
        await asyncio.sleep(0.3)
    finally:
        tuned.process.send_signal(signal.SIGCONT)
    reader = DialogueReader(bus, "while-stopped")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 30, f"no ready: {plain.log_tail()}")
    ready = reader.event(EventName.READY)
    assert ready is not None and ready.data_as(Placement).worker == "tuned"


async def placing_worker(bus: Bus, sid: str, adapter: str) -> str:
    """The worker that places (not refuses) a new session naming `adapter`."""
    await open_session(bus, SessionStart(session_id=sid, persona=PersonaSpec(adapter=adapter)))
    reader = DialogueReader(bus, sid)
    await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "no ready event")
    ready = reader.event(EventName.READY)
    assert ready is not None
    return ready.data_as(Placement).worker


async def test_a_start_naming_an_adapter_above_a_workers_rank_goes_to_one_whose_bound_takes_it(
    bus: Bus,
    worker_processes: Callable[..., WorkerProcess],
    moshi_model: MoshiModel,
    moshi_dir: Path,
    tmp_path: Path,
) -> None:
    """A mixed fleet: one worker's adapters go to rank 4, the other's to 8. A rank-8 adapter read by the
    narrow one is passed on (its presence publishes its bound), not refused: the wide one places it.
    Four adapters, each new to both (a worker holding one would draw it anyway), so that the narrow one
    reads some of the starts."""
    store = AdapterStore(LocalStorage(tmp_path / "data"))  # the processes' CHORUS_DATA_DIR
    adapters = await store_adapters(store, moshi_dir, tmp_path, layer_shapes(moshi_model.lm), 4)
    assert {(await store.get(a)).rank for a in adapters} == {8}
    memory = "50000000"
    narrow = worker_processes(
        "narrow", CHORUS_DIALOGUE_ADAPTER_MEMORY=memory, CHORUS_DIALOGUE_ADAPTER_MAX_RANK="4"
    )
    wide = worker_processes(
        "wide", CHORUS_DIALOGUE_ADAPTER_MEMORY=memory, CHORUS_DIALOGUE_ADAPTER_MAX_RANK="8"
    )

    async def both_serving() -> bool:
        workers = await list_workers(bus, "dialogue")
        return sum(w.free_slots for w in workers) == 8 and {
            w.worker_id: w.fields.get("adapter_max_rank") for w in workers
        } == {"narrow": "4", "wide": "8"}

    await wait_until(both_serving, f"the workers never served: {narrow.log_tail()}{wide.log_tail()}", 90)
    placed = [await placing_worker(bus, f"wide{n}", adapter) for n, adapter in enumerate(adapters)]
    assert placed == ["wide"] * len(adapters)


async def test_an_adapter_checked_for_another_model_is_refused_not_applied(
    bus: Bus, start_worker: StartWorker, moshi_model: MoshiModel, moshi_dir: Path, tmp_path: Path
) -> None:
    """moshiko and moshika share their layer shapes: an adapter uploaded for one would load on the other
    and silently steer a model it was never trained on."""
    store = AdapterStore(LocalStorage(tmp_path))  # the worker's CHORUS_DATA_DIR
    data = write_random_adapter(tmp_path / "a.safetensors", moshi_dir).read_bytes()
    other = "moshika" if moshi_model.name == "moshiko" else "moshiko"
    layout = check_adapter(data, layer_shapes(moshi_model.lm))
    await store.create(AdapterRecord.of("adapter_other", "", "a", other, layout, len(data)), data)
    await start_worker(dialogue_adapter_memory=50_000_000, dialogue_adapter_max_rank=8)
    start = SessionStart(
        session_id="tuned", voice=moshi_model.name, persona=PersonaSpec(adapter="adapter_other")
    )
    await open_session(bus, start)
    reader = DialogueReader(bus, "tuned")
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 20, "never refused")
    error = reader.event(EventName.ERROR)
    assert error is not None and error.data_as(Failure).code == "unprocessable"
    assert f"adapter_other was checked against {other}" in error.detail, error.detail


async def test_mid_session_switches_keep_the_hash_true_and_only_the_last_adapter_in_use(
    bus: Bus, start_worker: StartWorker, moshi_model: MoshiModel, moshi_dir: Path, tmp_path: Path
) -> None:
    """Switches as the gateway sends them (the hash written first, for a takeover, then the update): one
    the worker refuses (an adapter of the other model) must not stay in the hash, or a worker taking the
    session over would serve the refused adapter; after many switches back and forth only the last adapter
    is in use (the others may be evicted)."""
    store = AdapterStore(LocalStorage(tmp_path))  # the worker's CHORUS_DATA_DIR
    shapes = layer_shapes(moshi_model.lm)
    first, second = await store_adapters(store, moshi_dir, tmp_path, shapes, 2)
    data = write_random_adapter(tmp_path / "o.safetensors", moshi_dir).read_bytes()
    other_model = "moshika" if moshi_model.name == "moshiko" else "moshiko"
    record = AdapterRecord.of("adapter_other", "", "o", other_model, check_adapter(data, shapes), len(data))
    await store.create(record, data)
    worker = (await start_worker(dialogue_adapter_memory=50_000_000, dialogue_adapter_max_rank=8)).worker
    sessions = SessionStore(bus, 600)
    start = SessionStart(session_id="tuned", voice=moshi_model.name, persona=PersonaSpec(adapter=first))
    await open_session(bus, start)
    reader = DialogueReader(bus, "tuned")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "no ready event")

    async def switch(adapter: str) -> str:  # as the gateway's Conversation.update does
        await sessions.update("tuned", adapter=adapter)
        return await bus.append_control(SessionUpdate(session_id="tuned", adapter=adapter))

    async def takeover_adapter() -> str | None:
        taken = start_of(await sessions.get("tuned"))
        return None if taken is None else taken.persona.adapter

    await switch("adapter_other")
    await reader.until(lambda r: r.event(EventName.ERROR) is not None, 20, "the switch was not refused")
    assert worker.sessions["tuned"].start.persona.adapter == first
    await wait_until(lambda: _equal(takeover_adapter(), first), "the hash names the refused adapter", 10)

    for adapter in [second, first] * 5 + [second]:
        last = await switch(adapter)

    def all_switched() -> bool:  # every update read, and its switch done (one after the other, per session)
        read = worker.ownership.control.cursors.get("tuned") == last
        return read and "tuned" not in worker._switches  # noqa: SLF001

    # The end state, not one an earlier switch passes through (the first already ran `second`).
    await wait_until(all_switched, "the switches were not all applied", 20)
    assert await takeover_adapter() == second, "the hash names the last adapter"
    assert worker.sessions["tuned"].start.persona.adapter == second
    assert worker.adapters is not None
    users = {adapter: held.users for adapter, held in worker.adapters._held.items()}  # noqa: SLF001
    assert users == {first: 0, second: 1}, users
    # What the rows run, for a delete of the adapter switched away from (`SessionStore.using_adapter`).
    assert await _served(sessions) == second
    assert reader.event(EventName.ENDED) is None


async def _equal(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _served(sessions: SessionStore) -> str | None:
    info = await sessions.get("tuned")
    return None if info is None else info.adapter_served


async def test_a_slow_adapter_switch_holds_up_no_other_sessions_control(
    bus: Bus, start_worker: StartWorker, moshi_model: MoshiModel, moshi_dir: Path, tmp_path: Path
) -> None:
    """Loading an adapter may take seconds (hundreds of MB from the data volume): one session's switch
    must not hold up the stops and updates of the others, which one control loop serves."""
    store = AdapterStore(LocalStorage(tmp_path))  # the worker's CHORUS_DATA_DIR
    first, second = await store_adapters(store, moshi_dir, tmp_path, layer_shapes(moshi_model.lm), 2)
    worker = (await start_worker(dialogue_adapter_memory=50_000_000, dialogue_adapter_max_rank=8)).worker
    await open_session(bus, SessionStart(session_id="tuned", persona=PersonaSpec(adapter=first)))
    await open_session(bus, SessionStart(session_id="plain"))
    tuned, plain = DialogueReader(bus, "tuned"), DialogueReader(bus, "plain")
    for reader in (tuned, plain):
        await reader.until(lambda r: r.event(EventName.READY) is not None, 30, "no ready event")
    assert worker.adapters is not None
    async with worker.adapters._loading:  # noqa: SLF001  (another load under way, on a slow disk)
        await bus.append_control(SessionUpdate(session_id="tuned", adapter=second))
        # The control loop took it: its switch is under way, waiting on the load.
        await wait_until(lambda: "tuned" in worker._switches, "the update not taken", 10)  # noqa: SLF001
        await bus.append_control(SessionStop(session_id="plain"))
        await plain.until(lambda r: r.event(EventName.ENDED) is not None, 10, "the stop waited for the load")
    await wait_until(lambda: worker.sessions["tuned"].start.persona.adapter == second, "then switched", 20)
