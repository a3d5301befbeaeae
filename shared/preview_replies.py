"""Answers to voice previews: each request gets a reply stream of its own (`chorus:tts:reply:{id}`).

A TTS worker appends the one reply and puts the stream on a TTL, so a reply the gateway no longer waits for
goes by itself; the gateway reads it with `Bus.read` and deletes it once answered or given up on.
"""

from __future__ import annotations

from shared.bus import Bus
from shared.messages import VoicePreviewReply

REPLY_TTL_S = 60


class PreviewReplies:
    def __init__(self, bus: Bus, ttl_s: int = REPLY_TTL_S) -> None:
        self.bus = bus
        self.ttl_s = ttl_s

    def stream(self, request_id: str) -> str:
        return self.bus.names.tts_reply(request_id)

    async def send(self, reply: VoicePreviewReply) -> None:
        """Answer the request `reply.session_id` names; unread, the answer expires after `ttl_s`."""
        stream = self.stream(reply.session_id)
        await self.bus.append(stream, reply, maxlen=10)
        await self.bus.redis.expire(stream, self.ttl_s)

    async def discard(self, request_id: str) -> None:
        """The gateway is done with the request (answered, or given up on): its reply stream goes."""
        await self.bus.redis.delete(self.stream(request_id))
