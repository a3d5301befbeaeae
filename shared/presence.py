"""Worker presence: each worker keeps a hash `chorus:workers:{service}:{id}` alive with a heartbeat TTL,
and its id in the service's index `chorus:workers:{service}` (a sorted set by heartbeat).

Placement reads it (free slots), readiness reads it (is any worker of a service alive), and a worker
that stops beating disappears by itself when its TTL runs out. Listing reads the index and the hashes
it names: its cost follows the number of workers, never the size of the keyspace (`/readyz` is open to
anyone).
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
        index = self.bus.names.worker_index(self.service)
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping={k: str(v) for k, v in fields.items()})
            pipe.pexpire(self.key, self.ttl_ms)
            pipe.zadd(index, {self.worker_id: fields["heartbeat"]})
            await pipe.execute()

    async def refresh(self) -> None:
        """Beat now, not at the next interval (a slot taken or freed, the model ready): placement and
        readiness see it at once. A failure Redis may recover from is left to the next heartbeat."""
        try:
            await self.beat()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            log.warning("presence update failed (the next heartbeat retries): %s", exc)

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
            async with self.bus.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.key)
                pipe.zrem(self.bus.names.worker_index(self.service), self.worker_id)
                await pipe.execute()
        except Exception as exc:
            if not is_retryable(exc):
                raise


async def list_workers(bus: Bus, service: str) -> list[WorkerInfo]:
    """The service's live workers: those in its index whose hash has not expired. Ids whose hash is gone
    (a worker that died without leaving) are dropped from the index on the way."""
    index = bus.names.worker_index(service)
    ids = [member.decode() for member in await bus.redis.zrange(index, 0, -1)]
    if not ids:
        return []
    async with bus.redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.hgetall(bus.names.worker(service, worker_id))
        hashes = await pipe.execute()
    workers, gone = [], []
    for worker_id, raw in zip(ids, hashes, strict=True):
        if raw:
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            workers.append(WorkerInfo(service, fields.get("worker_id", worker_id), fields))
        else:
            gone.append(worker_id)
    if gone:
        await bus.redis.zrem(index, *gone)
    return workers


async def worker_alive(bus: Bus, service: str, worker_id: str) -> bool:
    return bool(await bus.redis.exists(bus.names.worker(service, worker_id)))
