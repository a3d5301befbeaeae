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

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.bus import Bus

log = logging.getLogger(__name__)

WorkerFields = dict[str, str | int | float]


@dataclass(frozen=True)
class WorkerInfo:
    service: str
    worker_id: str
    fields: dict[str, str]

    @property
    def free_slots(self) -> int:
        return int(self.fields.get("free_slots", "0"))

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
        while not stop.is_set():
            try:
                await self.beat()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def leave(self) -> None:
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await self.bus.redis.delete(self.key)


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
