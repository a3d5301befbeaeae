"""`ServiceRuntime` runs any service through one protocol (describe, warmup, run) and owns its presence:
`loading` (with the fields the worker gives for that time) while the service opens and warms up, the
service's own description once it serves, gone once it stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from shared.bus import Bus
from shared.errors import ModelLoadError
from shared.presence import WorkerFields, WorkerInfo, list_workers
from shared.runtime import ServiceRuntime
from shared.settings import CommonSettings


class ProbeService:
    """A service whose warmup waits for the test, so its `loading` presence can be seen."""

    def __init__(self) -> None:
        self.may_finish_warmup = asyncio.Event()
        self.ran_until_stopped = False

    def describe(self) -> WorkerFields:
        return {"capacity": 2, "free_slots": 1}

    async def warmup(self) -> None:
        await self.may_finish_warmup.wait()

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.ran_until_stopped = True


@pytest.fixture(autouse=True)
def root_logging_restored() -> Iterator[None]:
    """The runtime configures logging for its process; this one is pytest's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def probe_settings(redis_url: str, key_prefix: str, worker_id: str) -> CommonSettings:
    return CommonSettings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_url,
        key_prefix=key_prefix,
        worker_id=worker_id,
        heartbeat_interval_s=0.05,
        log_format="text",
    )


async def presence_of(bus: Bus, worker_id: str) -> WorkerInfo | None:
    return next((w for w in await list_workers(bus, "probe") if w.worker_id == worker_id), None)


async def until_presence(bus: Bus, worker_id: str, state: str, timeout_s: float = 10) -> WorkerInfo:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = await presence_of(bus, worker_id)
        if info is not None and info.fields.get("state") == state:
            return info
        await asyncio.sleep(0.02)
    raise AssertionError(f"presence never said {state!r} (waited {timeout_s:g} s)")


async def test_the_runtime_describes_a_service_loading_then_serving_and_closes_it_on_stop(
    bus: Bus, redis_url: str, key_prefix: str
) -> None:
    settings = probe_settings(redis_url, key_prefix, "probe-1")
    runtime = ServiceRuntime("probe", settings, loading={"capacity": 2, "free_slots": 0})
    service = ProbeService()
    closed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def open_probe(rt: ServiceRuntime) -> AsyncIterator[ProbeService]:
        try:
            yield service
        finally:
            closed.set()

    running = asyncio.create_task(runtime.run(open_probe))
    loading = await until_presence(bus, "probe-1", "loading")
    assert loading.fields["capacity"] == "2" and loading.free_slots == 0 and not runtime.serving

    service.may_finish_warmup.set()
    serving = await until_presence(bus, "probe-1", "serving")
    assert serving.free_slots == 1 and runtime.serving

    runtime.stop.set()
    await asyncio.wait_for(running, 10)
    assert service.ran_until_stopped and closed.is_set()
    assert await presence_of(bus, "probe-1") is None, "a stopped worker leaves at once"


async def test_a_service_that_cannot_open_stops_the_worker_with_its_error(
    bus: Bus, redis_url: str, key_prefix: str
) -> None:
    settings = probe_settings(redis_url, key_prefix, "probe-2")

    @contextlib.asynccontextmanager
    async def open_broken(rt: ServiceRuntime) -> AsyncIterator[ProbeService]:
        raise ModelLoadError("cannot load the probe's model")
        yield ProbeService()

    with pytest.raises(ExceptionGroup) as caught:
        await asyncio.wait_for(ServiceRuntime("probe", settings).run(open_broken), 10)
    assert caught.group_contains(ModelLoadError, match="probe's model")
    assert await presence_of(bus, "probe-2") is None
