"""Every Redis key Chorus uses, in one place (see docs/architecture.md, "Redis keys")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamNames:
    prefix: str = "chorus:"

    @property
    def control(self) -> str:
        """Placement: session `start`s, one consumer group per placement group (a session's `update`,
        `stop` and `flush` go to its own `session_control` stream)."""
        return f"{self.prefix}control"

    @property
    def dead_letter(self) -> str:
        """Entries a consumer gave up on (malformed, or failing past the retry limit), for inspection."""
        return f"{self.prefix}dead-letter"

    @property
    def tts_requests(self) -> str:
        """Voice preview / prepare requests, gateway -> one TTS worker (consumer group "tts")."""
        return f"{self.prefix}tts:requests"

    def tts_reply(self, request_id: str) -> str:
        """The answer to one request, TTS worker -> the gateway that asked (expires on its own)."""
        return f"{self.prefix}tts:reply:{request_id}"

    @property
    def voice_events(self) -> str:
        """Voice profile changes (deleted), gateway -> every TTS worker (tailed, no group)."""
        return f"{self.prefix}voices:events"

    def session_input(self, sid: str) -> str:
        """User audio, gateway -> dialogue."""
        return f"{self.prefix}s:{sid}:in"

    def session_dialogue(self, sid: str) -> str:
        """Moshi's text pieces and native audio, dialogue -> router, tts."""
        return f"{self.prefix}s:{sid}:dlg"

    def session_tts(self, sid: str) -> str:
        """Cloned audio and the words it covers, tts -> router."""
        return f"{self.prefix}s:{sid}:tts"

    def session_output(self, sid: str) -> str:
        """What the client gets (audio/text/event), router -> gateway."""
        return f"{self.prefix}s:{sid}:out"

    def session_control(self, sid: str) -> str:
        """`update` / `stop` / `flush` for one session, read only by its owners (gateway, router ->
        dialogue, tts, router): a worker's control reading grows with its own sessions, not the fleet's."""
        return f"{self.prefix}s:{sid}:ctl"

    def session(self, sid: str) -> str:
        """Hash: owner workers, state, voice, persona, heartbeat."""
        return f"{self.prefix}session:{sid}"

    def session_transcript(self, sid: str) -> str:
        """List of transcript utterances (JSON): the session detail, and re-priming after a failover."""
        return f"{self.prefix}session:{sid}:transcript"

    def session_lease(self, sid: str) -> str:
        """String with a TTL, renewed by the gateway serving the session's socket; gone = nobody is."""
        return f"{self.prefix}session:{sid}:lease"

    def session_streams(self, sid: str) -> list[str]:
        """The session's audio streams: deleted soon after it ends (they are most of its memory)."""
        return [
            self.session_input(sid),
            self.session_dialogue(sid),
            self.session_tts(sid),
            self.session_output(sid),
        ]

    def owners(self, group: str) -> str:
        """Set: the workers of a placement group that own sessions (failover looks for dead ones here)."""
        return f"{self.prefix}owners:{group}"

    def owned(self, group: str, worker_id: str) -> str:
        """Set: the session ids one worker serves (moved as a whole to live workers when it dies)."""
        return f"{self.prefix}owned:{group}:{worker_id}"

    def leftovers(self, group: str, worker_id: str) -> str:
        """Set: sessions a worker found in its owned set when it started (an earlier process with the
        same worker id died with them): they are taken over like a dead worker's."""
        return f"{self.prefix}leftovers:{group}:{worker_id}"

    def worker(self, service: str, worker_id: str) -> str:
        """Hash: a worker's capacity, free slots, model and heartbeat (expires when it stops beating)."""
        return f"{self.prefix}workers:{service}:{worker_id}"

    def worker_index(self, service: str) -> str:
        """Sorted set: a service's worker ids by last heartbeat, so listing workers reads them, not the
        keyspace (members whose hash expired are dropped by the next listing)."""
        return f"{self.prefix}workers:{service}"

    def owner_sessions(self, owner: str) -> str:
        """Set: an API key owner's live session ids (bounds listings, enforces sessions per key)."""
        return f"{self.prefix}owner:{owner or 'anonymous'}:sessions"

    @property
    def rate_limits(self) -> str:
        """Prefix of the rate limit counters (the `limits` library names the rest; they expire)."""
        return f"{self.prefix}limits"

    def adapter_lock(self, owner: str) -> str:
        """The owner's lock (`shared/adapter_store.py`, `OwnerLock`): held while one of its adapters is
        deleted, a persona or a session naming one is written, or a persona is replaced or deleted. The key
        keeps its first name, from when it guarded adapters alone."""
        return f"{self.prefix}adapters:lock:{owner or 'anonymous'}"

    def client_secret(self, digest: str) -> str:
        """String with a TTL: a realtime client secret's owner and session, under the secret's SHA-256;
        deleted by the socket that uses it."""
        return f"{self.prefix}client_secret:{digest}"
