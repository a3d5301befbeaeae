"""Durable transcripts: written while a session runs, one record per utterance, so the export is
complete for any session length and survives whichever process dies.

Storage layout (`shared.storage`, under CHORUS_DATA_DIR), one folder per session:
- `transcripts/{sid}/meta.json`: who and what (owner, persona, voice, start time), by the gateway at start;
- `transcripts/{sid}/utterances.jsonl`: one JSON line per finished utterance, by the dialogue worker
  serving the session (after a failover, by the one that took it over);
- `transcripts/{sid}/end.json`: when and why it ended, by whoever finalized the session (the gateway, or
  a worker that found its lease lapsed). Missing if every process died: the rest is still there.

The export (`GET /v1/sessions/{id}/transcript`) is read from these files, never from Redis.

Each owner's transcripts are indexed (`shared.owner_index`: `owners/{owner}/transcripts/{start ms}.{sid}`,
written before `meta.json`, removed after the folder), oldest first by name. Past `max_per_owner` a new
session is never refused: the owner's oldest transcripts of ended sessions are deleted instead (never a
live one's), and the log says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Collection
from typing import Any

from shared.errors import NotFound
from shared.owner_index import OwnerIndex, Reconciled
from shared.storage import Storage

log = logging.getLogger(__name__)

PREFIX = "transcripts/"


class TranscriptUnreadable(NotFound):
    """The transcript is stored, but its record of who and what cannot be read (logged): a 404 to everyone,
    as it cannot be told whose it is, and not to be taken for one not written yet."""


def _key(sid: str, name: str) -> str:
    return f"{PREFIX}{sid}/{name}"


def _entry(sid: str, started_at: float) -> str:
    """The index entry's name: sorts by start time (ms, fixed width), then session id."""
    return f"{round(started_at * 1000):015d}.{sid}"


def _session_of(entry: str) -> str:
    return entry.split(".", 1)[-1]


class TranscriptLog:
    """`max_per_owner`: transcripts kept per owner (0 = no limit); `begin` prunes the oldest past it."""

    def __init__(self, storage: Storage, *, max_per_owner: int = 0) -> None:
        self.storage = storage
        self.max_per_owner = max_per_owner
        self.index = OwnerIndex(storage, "transcripts")

    async def begin(
        self, sid: str, *, owner: str, persona_id: str, voice: str, live: Collection[str] = ()
    ) -> None:
        """Start the session's transcript; past the quota, delete the owner's oldest, never one of the
        `live` sessions' (they go once ended, when a later session begins)."""
        started_at = time.time()
        meta = {"session_id": sid, "owner": owner, "persona_id": persona_id, "voice": voice}
        entry = _entry(sid, started_at)
        await self.index.add(owner, entry)
        try:
            await self.storage.put(
                _key(sid, "meta.json"), json.dumps({**meta, "started_at": started_at}).encode()
            )
        except BaseException:
            with contextlib.suppress(OSError):  # an index entry without its transcript counts for nothing
                await self.index.remove(owner, entry)
            raise
        await self._prune(owner, {sid, *live})

    async def _prune(self, owner: str, live: set[str]) -> None:
        """Delete the owner's oldest transcripts past the quota, sparing the live sessions': a conversation
        is never refused for the records of old ones."""
        entries = await self.index.names(owner)
        if not self.max_per_owner or len(entries) <= self.max_per_owner:
            return
        ended = [entry for entry in entries if _session_of(entry) not in live]
        oldest = ended[: len(entries) - self.max_per_owner]
        if not oldest:
            return
        for entry in oldest:
            await self.storage.delete_prefix(f"{PREFIX}{_session_of(entry)}/")
            await self.index.remove(owner, entry)
        log.warning(
            "deleted the oldest transcripts of an owner past its quota",
            extra={
                "owner": owner,
                "limit": self.max_per_owner,
                "session_ids": [_session_of(e) for e in oldest],
            },
        )

    async def append(self, sid: str, utterance: dict[str, Any]) -> None:
        line = json.dumps(utterance, ensure_ascii=False, separators=(",", ":")) + "\n"
        await self.storage.append(_key(sid, "utterances.jsonl"), line.encode())

    async def end(self, sid: str, reason: str, *, unless_ended: bool = False) -> None:
        """Record when and why the session ended; `unless_ended`: only if nobody recorded it yet (a
        session whose end was not this caller's to decide, say its hash lost with Redis)."""
        if unless_ended and await self.storage.exists(_key(sid, "end.json")):
            return
        await self.storage.put(
            _key(sid, "end.json"), json.dumps({"ended_at": time.time(), "reason": reason}).encode()
        )

    async def document(self, sid: str) -> dict[str, Any]:
        """The whole transcript of a session (NotFound if it never started here; TranscriptUnreadable if its
        record of who and what cannot be read)."""
        try:
            meta = json.loads(await self.storage.get(_key(sid, "meta.json")))
        except ValueError:
            log.error("a transcript's meta.json cannot be read", extra={"session_id": sid})
            raise TranscriptUnreadable(f"no transcript for {sid}") from None
        if not isinstance(meta, dict):
            log.error("a transcript's meta.json is not an object", extra={"session_id": sid})
            raise TranscriptUnreadable(f"no transcript for {sid}")
        end = await self._optional_json(sid, "end.json")
        return {
            **meta,
            "ended_at": end.get("ended_at"),
            "end_reason": end.get("reason"),
            "turns": await self._utterances(sid),
        }

    async def _utterances(self, sid: str) -> list[dict[str, Any]]:
        try:
            raw = await self.storage.get(_key(sid, "utterances.jsonl"))
        except NotFound:
            return []
        turns = []
        for line in raw.decode(errors="replace").splitlines():
            try:
                turns.append(json.loads(line))
            except json.JSONDecodeError:
                # A line cut by a crash mid-write (a full disk): the others are intact.
                log.warning("skipped a damaged transcript line", extra={"session_id": sid})
        return turns

    async def _optional_json(self, sid: str, name: str) -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads(await self.storage.get(_key(sid, name)))
            return document
        except (NotFound, json.JSONDecodeError):
            return {}

    async def sweep(self, retention_s: float, now: float | None = None) -> int:
        """Delete the transcripts of sessions that ended (or, with no end, started) longer than
        `retention_s` ago; returns how many went."""
        now = now if now is not None else time.time()
        removed = 0
        for sid in sorted(await self._sessions()):
            end = await self._optional_json(sid, "end.json")
            meta = await self._optional_json(sid, "meta.json")
            when = end.get("ended_at") or meta.get("started_at") or 0
            if now - float(when) > retention_s:
                await self.storage.delete_prefix(f"{PREFIX}{sid}/")
                if "owner" in meta and "started_at" in meta:
                    await self.index.remove(str(meta["owner"]), _entry(sid, float(meta["started_at"])))
                removed += 1
        return removed

    async def _sessions(self) -> set[str]:
        return {key[len(PREFIX) :].split("/", 1)[0] for key in await self.storage.list(PREFIX)}

    async def reconcile_index(self) -> Reconciled:
        """At start-up: index entries for transcripts that lack one, none left for transcripts gone."""

        async def describe(sid: str) -> tuple[str, str] | None:
            meta = await self._optional_json(sid, "meta.json")
            try:
                return str(meta["owner"]), _entry(sid, float(meta["started_at"]))
            except (KeyError, TypeError, ValueError):
                return None  # no header (yet): nothing says whose it is

        return await self.index.reconcile(await self._sessions(), describe, _session_of)


class TranscriptWriter:
    """Writes a worker's transcript records off its hot path: one queue, one task, so each session's
    records land in order and a slow or full disk never delays a tick (a failed write is logged; the
    live list in Redis still has the utterance)."""

    def __init__(self, log_: TranscriptLog, max_pending: int = 10_000) -> None:
        self.log = log_
        self._queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue(max_pending)

    def append(self, sid: str, utterance: dict[str, Any]) -> None:
        self._put(("append", sid, utterance))

    def end(self, sid: str, reason: str) -> None:
        self._put(("end", sid, reason))

    def _put(self, item: tuple[str, str, Any]) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            log.error("transcript writes are backed up; one was dropped", extra={"session_id": item[1]})

    async def run(self) -> None:
        """Until cancelled; `drain` first to write what is queued."""
        while True:
            kind, sid, value = await self._queue.get()
            try:
                if kind == "append":
                    await self.log.append(sid, value)
                else:
                    await self.log.end(sid, value)
            except Exception:
                log.exception("could not write the transcript", extra={"session_id": sid})
            finally:
                self._queue.task_done()

    async def drain(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
