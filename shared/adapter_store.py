"""LoRA adapters in durable storage: the file as uploaded, its metadata, and the layer shapes of each model.

Layout under the storage root (`CHORUS_DATA_DIR`):

    adapters/{id}/adapter.safetensors   the file as moshi-finetune wrote it (checked on upload)
    adapters/{id}/adapter.json          the metadata (`AdapterRecord`); written last: its presence = complete
    models/{model}/layers.json          (out, in) of every linear layer of a model, written by its
                                        dialogue workers at start-up: what an upload is checked against

Each owner's adapters are indexed (`owners/{owner}/adapters/{id}`), like voices. Delete removes the
metadata first (the adapter is gone for every reader), then the file, then the index entry.

Deleting an adapter (after checking no persona names it) and writing a persona that names one (after
checking it exists) are two check-then-write steps over files: `OwnerLock` runs them one at a time
per owner, across every gateway, so no persona is left naming a deleted adapter.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from shared.adapters import AdapterLayout, LayerShapes
from shared.bus import Bus
from shared.errors import NotFound, ServiceUnavailable, excerpt
from shared.messages import ProfileId, valid_id
from shared.owner_index import OwnerIndex
from shared.storage import Storage

log = logging.getLogger(__name__)

PREFIX = "adapters/"
FILE = "adapter.safetensors"
RECORD = "adapter.json"


def new_adapter_id() -> str:
    return "adapter_" + uuid.uuid4().hex[:16]


class AdapterRecord(BaseModel):
    """An adapter's metadata, as stored in adapter.json and shown by the REST API."""

    model_config = ConfigDict(extra="ignore")

    id: ProfileId
    owner: str = Field(description="Hash of the API key that uploaded it ('' = no auth).")
    name: str = Field(min_length=1, max_length=100)
    model: str = Field(description="The Moshi model (moshiko / moshika) whose layers it was checked against.")
    rank: int
    scaling: float
    dtype: str
    layers: int = Field(description="Linear layers it updates.")
    parameters: int
    size_bytes: int
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def of(
        cls, adapter_id: str, owner: str, name: str, model: str, layout: AdapterLayout, size: int
    ) -> AdapterRecord:
        return cls(
            id=adapter_id,
            owner=owner,
            name=name,
            model=model,
            rank=layout.rank,
            scaling=layout.scaling,
            dtype=layout.dtype,
            layers=len(layout.layers),
            parameters=layout.parameters,
            size_bytes=size,
        )


def _key(adapter_id: str, name: str = "") -> str:
    if not valid_id(adapter_id):  # ids come from URLs and starts: only ours may become storage keys
        raise NotFound(f"no adapter {excerpt(adapter_id)}")
    return f"{PREFIX}{adapter_id}/{name}"


def _layers_key(model: str) -> str:
    if not valid_id(model):
        raise NotFound(f"no model {excerpt(model)}")
    return f"models/{model}/layers.json"


class AdapterStore:
    """`max_per_owner`: adapters one owner may have (0 = no limit)."""

    def __init__(self, storage: Storage, *, max_per_owner: int = 0) -> None:
        self.storage = storage
        self.max_per_owner = max_per_owner
        self.index = OwnerIndex(storage, "adapters")

    async def check_quota(self, owner: str) -> None:
        await self.index.check(owner, self.max_per_owner)

    async def create(self, record: AdapterRecord, data: bytes | Path) -> AdapterRecord:
        """The file (its bytes, or a file in the storage's `scratch()` folder, moved into place), then the
        metadata (only the metadata makes it visible); a failed write removes both."""
        await self.index.reserve(record.owner, record.id, self.max_per_owner, self._complete)
        try:
            if isinstance(data, Path):
                await self.storage.put_file(_key(record.id, FILE), data)
            else:
                await self.storage.put(_key(record.id, FILE), data)
            await self.storage.put(_key(record.id, RECORD), record.model_dump_json().encode())
        except BaseException:
            await self.storage.delete_prefix(_key(record.id))
            await self.index.remove(record.owner, record.id)
            raise
        return record

    async def _complete(self, adapter_id: str) -> bool:
        return await self.storage.exists(_key(adapter_id, RECORD))

    async def get(self, adapter_id: str) -> AdapterRecord:
        try:
            raw = await self.storage.get(_key(adapter_id, RECORD))
        except NotFound:
            raise NotFound(f"no adapter {excerpt(adapter_id)}") from None
        return AdapterRecord.model_validate_json(raw)

    async def get_owned(self, adapter_id: str, owner: str) -> AdapterRecord:
        """Another owner's adapter is indistinguishable from a missing one."""
        record = await self.get(adapter_id)
        if record.owner != owner:
            raise NotFound(f"no adapter {excerpt(adapter_id)}")
        return record

    async def adapters(self, owner: str) -> list[AdapterRecord]:
        """The owner's adapters (read through its index), oldest first."""
        records = []
        for adapter_id in await self.index.names(owner):
            try:
                record = await self.get(adapter_id)
            except NotFound:
                continue
            if record.owner == owner:
                records.append(record)
        return sorted(records, key=lambda r: (r.created, r.id))

    async def data(self, adapter_id: str) -> bytes:
        try:
            return await self.storage.get(_key(adapter_id, FILE))
        except NotFound:
            raise NotFound(f"adapter {excerpt(adapter_id)} has no file") from None

    async def delete(self, adapter_id: str) -> None:
        record = await self.get(adapter_id)
        await self.storage.delete(_key(adapter_id, RECORD))
        await self.storage.delete_prefix(_key(adapter_id).rstrip("/"))
        await self.index.remove(record.owner, adapter_id)

    # --- the models' layer shapes ------------------------------------------------------------------

    async def publish_layers(self, model: str, shapes: LayerShapes) -> None:
        payload = {name: list(shape) for name, shape in sorted(shapes.items())}
        await self.storage.put(_layers_key(model), json.dumps(payload).encode())

    async def layers(self, model: str) -> dict[str, tuple[int, int]]:
        """The layer shapes a dialogue worker of `model` published; 503 while none has."""
        try:
            raw = await self.storage.get(_layers_key(model))
        except NotFound:
            raise ServiceUnavailable(
                f"no dialogue worker of model {excerpt(model)} has published its layers yet: adapters for it "
                "can be checked once one has started"
            ) from None
        return {name: (int(shape[0]), int(shape[1])) for name, shape in json.loads(raw).items()}

    async def models(self) -> list[str]:
        """The models whose layer shapes are published."""
        return sorted(
            {key.split("/")[1] for key in await self.storage.list("models/") if key.endswith("layers.json")}
        )


# Compare-and-delete / compare-and-extend: a holder whose lock expired (and was taken by another) must
# neither release nor prolong the other's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class OwnerLock:
    """One owner's adapter deletes, adapter-naming persona and session writes, and persona replaces and
    deletes, one at a time across gateways.

    A lock in Redis per owner (`SET NX PX`, a random token, released by compare-and-delete): a gateway
    that dies holding it frees it after `ttl_s`. A live holder extends it every third of `ttl_s` for as
    long as its block runs (a store slowed past the TTL must not let a second writer in); a holder that
    finds it lost (Redis restarted, or its extensions could not reach Redis in time) has its block cancelled
    and answered 503 instead of writing unguarded. A caller that cannot take it within `wait_s` is answered
    503 (retryable). Its Redis key keeps its first name (`adapter_lock`): gateways before and after the
    lock took persona writes too still exclude each other."""

    def __init__(self, bus: Bus, *, ttl_s: float = 10.0, wait_s: float = 5.0) -> None:
        self.bus = bus
        self.ttl_ms = int(ttl_s * 1000)
        self.wait_s = wait_s
        self._release = bus.redis.register_script(_RELEASE)
        self._extend = bus.redis.register_script(_EXTEND)

    @asynccontextmanager
    async def held(self, owner: str) -> AsyncIterator[None]:
        key, token = self.bus.names.adapter_lock(owner), secrets.token_hex(16)
        await self._take(key, token)
        try:
            async with asyncio.timeout(None) as bound:
                keeper = asyncio.create_task(self._keep(key, token), name=f"adapter-lock-{owner}")
                cut_short = functools.partial(_cut_short, bound)
                keeper.add_done_callback(cut_short)
                try:
                    yield
                finally:
                    # Once the block is over the keeper must not touch its timeout: a reschedule then
                    # raises (seen once in tests/shared/test_adapter_store.py: a keeper ran past its cancel).
                    keeper.remove_done_callback(cut_short)
                    keeper.cancel()
        except TimeoutError:
            if not bound.expired():
                raise
            raise ServiceUnavailable(
                "this API key's lock was lost before the change was written: retry"
            ) from None
        finally:
            await self._give_back(key, token)

    async def _give_back(self, key: str, token: str) -> None:
        """Release the lock, shielded: a cancelled request still gives it back now, not after the TTL. Redis
        gone by then is no failure of the change, made already (a 503 would have a client retry a persona
        create it got): the lock lapses after its TTL instead."""
        try:
            await asyncio.shield(self._release(keys=[key], args=[token]))
        except RedisError:
            log.warning(
                "adapter lock not released (Redis unreachable): it lapses after its TTL", exc_info=True
            )

    async def _keep(self, key: str, token: str) -> None:
        """Extend the lock while its block runs; return once the lock is, or may be, not ours (its block is
        then cancelled: `_cut_short`)."""
        loop, period = asyncio.get_running_loop(), self.ttl_ms / 3000
        ours_until = loop.time() + 3 * period  # taken just before this started
        while True:
            await asyncio.sleep(period)
            asked = loop.time()
            try:
                if not await self._extend(keys=[key], args=[token, self.ttl_ms]):
                    break  # expired and maybe taken by another: too late to extend
                ours_until = asked + 3 * period
            except RedisError:  # unreachable for now: try again while the lock surely lasts
                log.warning("adapter lock not extended: Redis unreachable", exc_info=True)
                if loop.time() + period >= ours_until:
                    break
        log.error("adapter lock lost while held: the change is cancelled", extra={"lock": key})

    async def _take(self, key: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self.wait_s, 0.002
        while not await self.bus.redis.set(key, token, nx=True, px=self.ttl_ms):
            if loop.time() >= deadline:
                raise ServiceUnavailable(
                    "this API key's adapters or personas are being changed: retry in a moment"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


def _cut_short(bound: asyncio.Timeout, keeper: asyncio.Task[None]) -> None:
    """The keeper returned (the lock is lost) or failed: its block is cancelled, answered 503."""
    if not keeper.cancelled():
        bound.reschedule(asyncio.get_running_loop().time())
