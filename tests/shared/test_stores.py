"""The stores services use in place of a Redis client (shared/), against a real redis-server: what each
keeps, for how long, and what it answers."""

from __future__ import annotations

import json
import time

from limits import RateLimitItemPerMinute

from shared.bus import Bus
from shared.client_secrets import OneUseSecrets
from shared.messages import VoicePreviewReply
from shared.preview_replies import PreviewReplies
from shared.rate_windows import RateWindows
from shared.sessions import SessionState, SessionStore
from tests.support.sessions import open_session


async def test_a_tick_marks_sessions_live_and_keeps_only_utterances_in_progress(bus: Bus) -> None:
    store = SessionStore(bus, 60)
    for sid in ("live", "speaking", "done"):
        await open_session(bus, sid)
    await store.update("done", utterance=json.dumps({"text": "old"}))
    await store.save_progress(["live"], {"speaking": json.dumps({"text": "hel"}), "done": None})
    live, speaking, done = [await store.get(sid) for sid in ("live", "speaking", "done")]
    assert live is not None and live.state == SessionState.ACTIVE
    assert speaking is not None and speaking.utterance == {"text": "hel"}
    assert done is not None and done.utterance is None
    await store.clear_utterance("speaking")
    cleared = await store.get("speaking")
    assert cleared is not None and cleared.utterance is None


async def test_the_workers_named_in_a_session_hash(bus: Bus) -> None:
    store = SessionStore(bus, 60)
    await open_session(bus, "s1")
    await open_session(bus, "s2")
    assert await store.dialogue_worker("s1") == ""
    await store.update("s1", dialogue_worker="w1", tts_worker="t1")
    assert await store.dialogue_worker("s1") == "w1"
    assert await store.tts_workers(["s1", "s2", "gone"]) == ["t1", "", ""]


async def test_a_preview_reply_expires_unread_and_goes_once_discarded(bus: Bus) -> None:
    replies = PreviewReplies(bus, ttl_s=30)
    await replies.send(VoicePreviewReply(session_id="req_1", pcm=b"\x01\x00"))
    stream = replies.stream("req_1")
    assert [entry.stream for entry in await bus.range(stream)] == [stream]
    assert 0 < await bus.redis.ttl(stream) <= 30
    await replies.discard("req_1")
    assert await bus.range(stream) == []


async def test_a_one_use_secret_grants_once_and_is_stored_only_as_its_digest(bus: Bus) -> None:
    secrets = OneUseSecrets(bus)
    await secrets.put("ek_secret", {"owner": "alice"}, ttl_s=30)
    keys = [key.decode() async for key in bus.redis.scan_iter(match=f"{bus.names.prefix}client_secret:*")]
    assert len(keys) == 1 and "ek_secret" not in keys[0]
    assert await secrets.take("ek_secret") == {"owner": "alice"}
    assert await secrets.take("ek_secret") is None, "used already"
    assert await secrets.take("ek_unknown") is None


async def test_rate_windows_count_per_identity_and_say_when_there_is_room(bus: Bus) -> None:
    windows, item = RateWindows(bus), RateLimitItemPerMinute(2, namespace="test")
    assert [await windows.hit(item, "alice") for _ in range(3)] == [True, True, False]
    assert await windows.hit(item, "bob"), "each identity has its own window"
    now = time.time()
    assert now < await windows.reset_at(item, "alice") <= now + 60, "within the minute"


async def test_memory_use_reports_redis_usage_and_its_limit(bus: Bus) -> None:
    use = await bus.memory_use()
    assert use.used > 0
    assert use.share == (use.used / use.limit if use.limit else 0.0)
