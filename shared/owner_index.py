"""Which objects each owner has: one small entry per object under `owners/{owner}/{kind}/`, so listing
and counting one tenant's voices, personas or transcripts reads that tenant's folder and nothing else.

Layout under the storage root (`CHORUS_DATA_DIR`), beside the objects themselves:

    owners/{owner}/voices/{profile id}
    owners/{owner}/personas/{persona id}
    owners/{owner}/transcripts/{start, ms}.{session id}     (names sort oldest first)

Each entry holds `{"created": unix time}`. `{owner}` is the owner id (a hash of the API key), `anonymous`
when auth is off.

Crash consistency, with every single write atomic (`Storage`) but no transaction across two:
- an entry is written *before* its object and removed *after* it, so no object is ever stored without
  its entry (it could not be listed, nor counted against the quota);
- a crash in between leaves an entry without an object. Listings skip it; once it is older than
  `stale_after_s` (an upload in progress holds a fresh one for a moment) it is removed by `reconcile`
  at start-up, and by `reserve` when it stands between an owner and their quota;
- objects stored before this index existed (or put back by an operator) have no entry: `reconcile`,
  run when the gateway starts, lists every object's name and writes the missing entries from each
  object's own `owner` field. That start-up pass is the only read of other tenants' objects.

Quotas: `reserve` writes the new entry first and counts the owner's entries after: past the limit it
removes its own entry again and refuses. Two creators racing for the last place never both win (each
counts after its own write, so whichever counts last sees both); at worst both are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from shared import metrics
from shared.errors import NotFound, QuotaExceeded
from shared.storage import Storage

log = logging.getLogger(__name__)

PREFIX = "owners/"
ANONYMOUS_FOLDER = "anonymous"
STALE_AFTER_S = 600.0  # as long as an upload may take to be written (see CHORUS_VOICE_SWEEP_GRACE_S)
_OWNER_ID = re.compile(r"[0-9a-f]{8,64}")  # what `owner_of` makes of a key


def owner_folder(owner: str) -> str:
    """The folder name of an owner: its id when that is a plain hex hash, else a hash of it."""
    if owner == "":
        return ANONYMOUS_FOLDER
    if _OWNER_ID.fullmatch(owner):
        return owner
    return "h-" + hashlib.sha256(owner.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Reconciled:
    added: int
    removed: int


class OwnerIndex:
    """The entries of one kind of object (`voices`, `personas`, `transcripts`)."""

    def __init__(self, storage: Storage, kind: str, *, stale_after_s: float = STALE_AFTER_S) -> None:
        self.storage = storage
        self.kind = kind
        self.stale_after_s = stale_after_s

    def _folder(self, owner: str) -> str:
        return f"{PREFIX}{owner_folder(owner)}/{self.kind}/"

    async def names(self, owner: str) -> list[str]:
        """The names of the owner's entries, sorted; one listing of the owner's own folder."""
        folder = self._folder(owner)
        return [key.removeprefix(folder) for key in await self.storage.list(folder)]

    async def add(self, owner: str, name: str) -> None:
        await self.storage.put(self._folder(owner) + name, json.dumps({"created": time.time()}).encode())

    async def remove(self, owner: str, name: str) -> None:
        await self.storage.delete(self._folder(owner) + name)

    async def count(self, owner: str) -> int:
        return len(await self.names(owner))

    async def check(self, owner: str, limit: int) -> None:
        """Refuse early (before any work) when the owner is at the quota already; `reserve` decides."""
        if limit and (count := await self.count(owner)) >= limit:
            raise self._over(limit, count)

    async def reserve(
        self, owner: str, name: str, limit: int, exists: Callable[[str], Awaitable[bool]]
    ) -> None:
        """Write the entry of an object about to be stored, within the owner's quota (0 = none);
        QuotaExceeded otherwise. `exists(name)`: whether the object of an entry is stored."""
        await self.add(owner, name)
        if not limit:
            return
        names = await self.names(owner)
        if len(names) > limit:
            others = [n for n in names if n != name]
            names = [name, *[n for n in others if not await self._remove_if_stale(owner, n, exists)]]
        if len(names) > limit:
            await self.remove(owner, name)
            raise self._over(limit, len(names) - 1)

    def _over(self, limit: int, count: int) -> QuotaExceeded:
        metrics.LIMIT_REJECTIONS.labels(limit=f"{self.kind}_per_key").inc()
        return QuotaExceeded(
            f"this API key has {count} {self.kind}, its quota is {limit}: delete one first",
            reason="quota_exceeded",
            resource=self.kind,
            limit=limit,
            count=count,
        )

    async def _age_s(self, key: str) -> float | None:
        """How long ago the entry was written (an unreadable one: as old as can be); None: it is gone."""
        try:
            raw = await self.storage.get(key)
        except NotFound:
            return None
        try:
            return time.time() - float(json.loads(raw)["created"])
        except (ValueError, KeyError, TypeError):
            return float("inf")

    async def _remove_if_stale(self, owner: str, name: str, exists: Callable[[str], Awaitable[bool]]) -> bool:
        """Whether the entry is gone: removed here (no object, and too old to be an upload in progress),
        or meanwhile by its own creator (refused, or deleted)."""
        key = self._folder(owner) + name
        age_s = await self._age_s(key)
        if age_s is None:
            return True
        if age_s < self.stale_after_s or await exists(name):
            return False
        await self.storage.delete(key)
        log.warning("removed an index entry without its object", extra={"kind": self.kind, "entry": name})
        return True

    async def reconcile(
        self,
        present: Collection[str],
        describe: Callable[[str], Awaitable[tuple[str, str] | None]],
        object_id: Callable[[str], str] = lambda name: name,
    ) -> Reconciled:
        """Start-up repair: an entry for each stored object that has none, and no stale entry without an
        object. `present`: the ids of the stored objects; `describe(id)`: (owner, entry name) read from
        the object (None: gone meanwhile or unreadable); `object_id(name)`: the id an entry names."""
        entries = [key.removeprefix(PREFIX).split("/") for key in await self.storage.list(PREFIX)]
        mine = [
            (folder, name) for folder, kind, name in (e for e in entries if len(e) == 3) if kind == self.kind
        ]
        indexed = {object_id(name) for _, name in mine}
        added = 0
        for missing in sorted(set(present) - indexed):
            described = await describe(missing)
            if described is not None:
                await self.add(*described)
                added += 1
        removed = 0
        for folder, name in mine:
            key = f"{PREFIX}{folder}/{self.kind}/{name}"
            if object_id(name) not in present and (await self._age_s(key) or 0.0) >= self.stale_after_s:
                await self.storage.delete(key)
                removed += 1
        if added or removed:
            log.warning(
                "owner index repaired",
                extra={"kind": self.kind, "entries_added": added, "entries_removed": removed},
            )
        return Reconciled(added, removed)
