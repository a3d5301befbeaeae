"""`OwnerLock`, the per-owner lock around adapter deletes and adapter-naming persona writes, against
redis-server: it holds while its block runs, however long, and a block whose lock is lost does not write."""

from __future__ import annotations

import asyncio

import pytest

from chorus.devtools.redis_server import EmbeddedRedis
from shared.adapter_store import OwnerLock
from shared.bus import Bus
from shared.errors import ServiceUnavailable
from shared.streams import StreamNames

OWNER = "a1b2c3d4e5f60718"


async def test_a_holder_slower_than_the_ttl_keeps_the_lock_until_it_is_done(bus: Bus) -> None:
    """A store stalled past the lock's TTL must not let a second writer in: the holder extends it."""
    references = OwnerLock(bus, ttl_s=0.5, wait_s=1.5)  # the second waits three TTLs
    inside, refused = asyncio.Event(), asyncio.Event()

    async def slow_write() -> None:
        async with references.held(OWNER):
            inside.set()
            await refused.wait()  # the write outlasts the TTL for as long as the second one tries

    holder = asyncio.create_task(slow_write())
    await inside.wait()
    try:
        with pytest.raises(ServiceUnavailable, match="being changed"):
            async with references.held(OWNER):
                pytest.fail("a second holder got in while the first was still writing")
    finally:
        refused.set()
    await holder
    async with references.held(OWNER):  # given back when done
        pass
    assert await bus.redis.exists(bus.names.adapter_lock(OWNER)) == 0


async def test_a_holder_whose_lock_was_lost_is_stopped_before_it_writes(bus: Bus) -> None:
    """Its lock expired and was taken by another (Redis restarted and lost it, say): the block is cancelled
    and answered 503, and the other's lock is left alone."""
    references = OwnerLock(bus, ttl_s=0.3, wait_s=0.5)
    key = bus.names.adapter_lock(OWNER)
    wrote = False
    with pytest.raises(ServiceUnavailable, match="lost"):
        async with references.held(OWNER):
            await bus.redis.set(key, "another-gateway", px=5000)
            await asyncio.sleep(2)  # the slow part of a delete
            wrote = True
    assert not wrote
    assert await bus.redis.get(key) == b"another-gateway"


async def test_a_change_made_is_not_answered_as_failed_when_redis_is_gone_by_the_release(
    names: StreamNames,
) -> None:
    """The persona is written when Redis goes away: a 503 now would have the client retry the create and
    get two personas. The lock lapses after its TTL instead."""
    redis = EmbeddedRedis().start()
    bus = await Bus.connect(redis.url, names, timeout_s=1, socket_timeout_s=1)
    try:
        async with OwnerLock(bus).held(OWNER):
            redis.stop()  # after the write, before the release
    finally:
        await bus.close()
