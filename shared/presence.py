"""Worker presence: each worker keeps a hash `chorus:workers:{service}:{id}` alive with a heartbeat TTL.

Placement reads it (free slots), readiness reads it (is any worker of a service alive), and a worker
that stops beating disappears by itself when its TTL runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.bus import Bus
from shared.retry import is_retryable

log = logging.getLogger(__name__)

WorkerFields = dict[str, str | int | float]


@dataclass(frozen=True)
class WorkerInfo:
    service: str
    worker_id: str
    fields: dict[str, str]

    @property
    def free_slots(self) -> int:
        """Slots it can take now: none while it is still loading."""
        return int(self.fields.get("free_slots", "0")) if self.serving else 0

    @property
    def serving(self) -> bool:
        """Its model is loaded and warmed up (workers without a model say so at once)."""
        return self.fields.get("state", "serving") == "serving"

    @property
    def heartbeat_age_s(self) -> float:
        return time.time() - float(self.fields.get("heartbeat", "0"))


class WorkerPresence:
    def __init__(
        self,
        bus: Bus,
        service: str,
        worker_id: str,
        *,
        ttl_s: float,
        interval_s: float,
        describe: Callable[[], WorkerFields] = dict,
    ) -> None:
        self.bus = bus
        self.service = service
        self.worker_id = worker_id
        self.key = bus.names.worker(service, worker_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.interval_s = interval_s
        self.describe = describe
        self.started_at = time.time()

    async def beat(self) -> None:
        fields: WorkerFields = {
            "service": self.service,
            "worker_id": self.worker_id,
            "heartbeat": time.time(),
            "started_at": self.started_at,
        }
        fields.update(self.describe())
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping={k: str(v) for k, v in fields.items()})
            pipe.pexpire(self.key, self.ttl_ms)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self.beat()
                if failing:
                    log.info("heartbeat restored")
                failing = False
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                if not failing:
                    log.warning("heartbeat failed (retrying every beat): %s", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def leave(self) -> None:
        """Gone at once, not after the TTL: other workers take this one's sessions over now."""
        try:
            await self.bus.redis.delete(self.key)
        except Exception as exc:
            if not is_retryable(exc):
                raise


async def list_workers(bus: Bus, service: str) -> list[WorkerInfo]:
    workers = []
    async for key in bus.redis.scan_iter(match=bus.names.worker_pattern(service), count=100):
        raw = await bus.redis.hgetall(key)
        if raw:
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            workers.append(WorkerInfo(service, fields.get("worker_id", ""), fields))
    return workers


async def worker_alive(bus: Bus, service: str, worker_id: str) -> bool:
    return bool(await bus.redis.exists(bus.names.worker(service, worker_id)))
