"""Fixtures of the dialogue tests: the small generated Moshi checkpoint, models and batchers on it,
in-process workers on the suite's redis-server, and `chorus dialogue` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint
from services.dialogue.batcher import Batcher
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.serving import DialogueWorker
from services.dialogue.settings import DialogueSettings
from shared.bus import Bus
from shared.messages import DIALOGUE, DialogueFrame, SessionEvent
from shared.presence import WorkerPresence, list_workers
from tests.support.paths import CHECKPOINT_CACHE, REPO_ROOT
from tests.support.stack import ProcessStack
from tests.support.waiting import wait_until

# Two cores serve the whole suite; one thread per model keeps ticks (and the box) predictable.
torch.set_num_threads(1)


@pytest.fixture
def triton_interpreter() -> Iterator[None]:
    """The int8 cache's Triton kernel (services/dialogue/int8_attention.py) run by Triton's interpreter
    on the CPU: tests/conftest.py sets TRITON_INTERPRET before Triton is imported; the kernel is jitted
    afresh, as interpreted, on its first use in the test."""
    from services.dialogue.int8_attention import _decode_kernel

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU machine runs the kernel itself: not in the interpreter, and not in these tests")
    _decode_kernel.cache_clear()
    yield
    _decode_kernel.cache_clear()


@pytest.fixture(scope="session")
def moshi_dir() -> Path:
    """Only the Moshi part of `chorus dev make-checkpoints` (cached in .cache/ across runs)."""
    return write_moshi_checkpoint(CHECKPOINT_CACHE / "moshi")


def settings_for(moshi_dir: Path, **overrides: Any) -> DialogueSettings:
    values: dict[str, Any] = {
        "moshi_dir": moshi_dir,
        "dialogue_slots": 4,
        "dialogue_audio_temperature": 0.8,
        "dialogue_http_port": 0,
        **overrides,
    }
    return DialogueSettings(**values)


@pytest.fixture(scope="session")
def moshi_model(moshi_dir: Path) -> MoshiModel:
    return load_moshi(settings_for(moshi_dir))


@pytest.fixture
def make_batcher(moshi_model: MoshiModel) -> Iterator[Callable[..., Batcher]]:
    """Batchers on the shared model; each leaves streaming mode at the end (one at a time per model)."""
    made: list[Batcher] = []

    def make(slots: int = 4, cls: type[Batcher] = Batcher, **kwargs: Any) -> Batcher:
        batcher = cls(moshi_model, slots, **kwargs)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()


@dataclass
class RunningWorker:
    worker: DialogueWorker
    settings: DialogueSettings
    stop: asyncio.Event


@pytest.fixture
async def start_worker(
    bus: Bus, redis_url: str, key_prefix: str, moshi_dir: Path, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[RunningWorker]]]:
    """In-process dialogue workers (their own model each), with presence heartbeats; stopped at the end."""
    tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> RunningWorker:
        settings = settings_for(
            moshi_dir,
            redis_url=redis_url,
            key_prefix=key_prefix,
            worker_id=f"w-{uuid.uuid4().hex[:6]}",
            heartbeat_interval_s=0.2,
            data_dir=tmp_path,
            **overrides,
        )
        model = await asyncio.to_thread(load_moshi, settings)
        worker = DialogueWorker(bus, settings, model)
        presence = WorkerPresence(
            bus, "dialogue", settings.worker_id, ttl_s=5, interval_s=0.2, describe=worker.describe
        )
        worker.presence = presence
        stop = asyncio.Event()

        async def serve() -> None:
            async with asyncio.TaskGroup() as group:
                group.create_task(presence.run(stop))
                group.create_task(worker.run(stop))
            await presence.leave()

        tasks.append((stop, asyncio.create_task(serve())))
        await wait_until(lambda: _has_free_slots(bus, settings.worker_id), "the worker never registered", 30)
        return RunningWorker(worker, settings, stop)

    yield start
    for stop, _ in tasks:
        stop.set()
    for _, task in tasks:
        await asyncio.wait_for(task, 15)


async def _has_free_slots(bus: Bus, worker_id: str) -> bool:
    return any(w.worker_id == worker_id and w.free_slots > 0 for w in await list_workers(bus, "dialogue"))


class DialogueReader:
    """Reads a session's :dlg stream from the start, keeping frames and events apart."""

    def __init__(self, bus: Bus, sid: str) -> None:
        self.bus = bus
        self.sid = sid
        self.stream = bus.names.session_dialogue(sid)
        self.cursor = "0-0"
        self.entries: list[DialogueFrame | SessionEvent] = []  # in stream order
        self.frames: list[DialogueFrame] = []
        self.events: list[SessionEvent] = []

    async def poll(self) -> None:
        for entry in await self.bus.read({self.stream: self.cursor}, count=500):
            self.cursor = entry.entry_id
            message = DIALOGUE.decode(entry.fields)
            self.entries.append(message)
            if isinstance(message, DialogueFrame):
                self.frames.append(message)
            else:
                self.events.append(message)

    def event(self, name: str) -> SessionEvent | None:
        return next((e for e in self.events if e.name == name), None)

    async def until(self, check: Callable[[DialogueReader], bool], timeout_s: float, failure: str) -> None:
        async def ready() -> bool:
            await self.poll()
            return check(self)

        await wait_until(ready, f"session {self.sid}: {failure}", timeout_s)


@dataclass
class WorkerProcess:
    worker_id: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def worker_processes(
    redis_url: str, key_prefix: str, moshi_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """`python -m chorus.cli dialogue` processes, as the container runs them (launched and stopped by
    the suite's process harness, tests/support/stack.py); stopped at the end."""
    stack = ProcessStack(workdir=tmp_path)

    def start(worker_id: str, **env: str) -> WorkerProcess:
        environment = {
            **os.environ,
            "CHORUS_REDIS_URL": redis_url,
            "CHORUS_KEY_PREFIX": key_prefix,
            "CHORUS_MOSHI_DIR": str(moshi_dir),
            "CHORUS_WORKER_ID": worker_id,
            "CHORUS_DATA_DIR": str(tmp_path / "data"),
            "CHORUS_DIALOGUE_HTTP_PORT": "0",
            "CHORUS_LOG_FORMAT": "text",
            "CHORUS_HEARTBEAT_INTERVAL_S": "0.5",
            "CHORUS_WORKER_TTL_S": "3",
            "CHORUS_CLAIM_IDLE_MS": "1500",
            "OMP_NUM_THREADS": "1",
            **env,
        }
        argv = [sys.executable, "-m", "chorus.cli", "dialogue"]
        process = stack.launch(worker_id, argv, environment, REPO_ROOT)
        return WorkerProcess(worker_id, process, tmp_path / f"{worker_id}.log")

    yield start
    stack.stop_all(timeout_s=15)
