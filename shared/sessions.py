"""Live session state in Redis: the `chorus:session:{sid}` hash and its transcript list.

Redis holds only live, rebuildable state; the durable transcript export belongs to the storage layer.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shared.bus import Bus

TRANSCRIPT_MAX_TURNS = 2000

# Set a hash field only if it still holds the expected value ('' = unset): safe hand-over of ownership.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


class SessionState:
    PLACING = "placing"
    ACTIVE = "active"
    RESUMING = "resuming"
    ENDED = "ended"


class SessionStore:
    def __init__(self, bus: Bus, ttl_s: int) -> None:
        self.bus = bus
        self.ttl_s = ttl_s
        self._cas = bus.redis.register_script(_COMPARE_AND_SET)

    async def update(self, sid: str, **fields: str | int | float) -> None:
        """Set fields and refresh the TTL (live sessions keep refreshing it; dead ones age out)."""
        key = self.bus.names.session(sid)
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={k: str(v) for k, v in {**fields, "updated_at": time.time()}.items()})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def get(self, sid: str) -> dict[str, str]:
        raw = await self.bus.redis.hgetall(self.bus.names.session(sid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def compare_and_set(self, sid: str, field: str, expected: str, new: str) -> bool:
        return bool(await self._cas(keys=[self.bus.names.session(sid)], args=[field, expected, new]))

    async def incr(self, sid: str, counter: str, by: int = 1) -> int:
        return int(await self.bus.redis.hincrby(self.bus.names.session(sid), counter, by))

    async def append_transcript(self, sid: str, speaker: str, text: str, **extra: Any) -> None:
        """Append to the running transcript (bounded); readers join consecutive pieces of a speaker."""
        key = self.bus.names.session_transcript(sid)
        turn = json.dumps({"speaker": speaker, "text": text, "t": time.time(), **extra})
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, turn)
            pipe.ltrim(key, -TRANSCRIPT_MAX_TURNS, -1)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def transcript(self, sid: str) -> list[dict[str, Any]]:
        raw = await self.bus.redis.lrange(self.bus.names.session_transcript(sid), 0, -1)
        return [json.loads(item) for item in raw]
