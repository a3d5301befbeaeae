"""The owner index on this machine's disk: what one tenant's listing costs among many tenants, through the
index and as a scan of every tenant's files (how listings worked before it), and the start-up reconcile.

In process, over `LocalStorage` in a temporary directory: 100 owners, each with the same number of voice
profiles and personas (1,000 and 5,000 of each in all), one owner listing its own. The scan is
`VoiceProfileStore.profiles(None)` filtered to the owner, and every persona file read: what
`GET /v1/voices` and `GET /v1/personas` did before the index.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.gateway.persona_store import PersonaFields, PersonaStore
from shared.storage import LocalStorage
from shared.transcripts import TranscriptLog
from shared.voice_profiles import VoiceProfile, VoiceProfileStore, new_profile_id

OWNERS = 100
TOTALS = (1_000, 5_000)
REPEATS = 5
CLIP = np.zeros(240, dtype=np.float32)


async def median_ms(call: Callable[[], Awaitable[object]]) -> float:
    durations = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        await call()
        durations.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(durations), 2)


async def fill(root: Path, total: int) -> tuple[VoiceProfileStore, PersonaStore, TranscriptLog]:
    storage = LocalStorage(root)
    voices, personas, transcripts = VoiceProfileStore(storage), PersonaStore(storage), TranscriptLog(storage)
    for i in range(total):
        owner = f"{i % OWNERS:016x}"
        profile = VoiceProfile(
            id=new_profile_id(), owner=owner, name="n", duration_s=0.1, speech_s=0.1, consent=True
        )
        await voices.create(profile, CLIP)
        await personas.create(owner, PersonaFields(name="p"))
        await transcripts.begin(f"s_{i}", owner=owner, persona_id="default", voice="moshiko")
    return voices, personas, transcripts


async def scan_personas(personas: PersonaStore, owner: str) -> list[bytes]:
    """Every tenant's persona file read, as the listing did before the index."""
    keys = await personas.storage.list("personas/")
    return [data for key in keys if owner.encode() in (data := await personas.storage.get(key))]


async def measure(total: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-index-"))
    try:
        voices, personas, transcripts = await fill(root, total)
        owner = f"{0:016x}"
        stores = (voices, personas, transcripts)
        started = time.perf_counter()
        for store in stores:
            await store.reconcile_index()
        indexed_s = time.perf_counter() - started
        shutil.rmtree(root / "owners")
        started = time.perf_counter()
        for store in stores:
            await store.reconcile_index()
        rebuilt_s = time.perf_counter() - started

        async def scan_voices() -> list[VoiceProfile]:
            return [p for p in await voices.profiles(None) if p.owner == owner]

        return {
            "objects_each": total,
            "owners": OWNERS,
            "own_objects_each": total // OWNERS,
            "list_voices_ms": {
                "index": await median_ms(lambda: voices.profiles(owner)),
                "scan": await median_ms(scan_voices),
            },
            "list_personas_ms": {
                "index": await median_ms(lambda: personas.list(owner)),
                "scan": await median_ms(lambda: scan_personas(personas, owner)),
            },
            "reconcile_s": {"already_indexed": round(indexed_s, 2), "from_no_index": round(rebuilt_s, 2)},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict[str, Any]:
    results = [asyncio.run(measure(total)) for total in TOTALS]
    for r in results:
        print(
            f"   {r['objects_each']} voices, personas and transcripts ({r['owners']} owners): "
            f"list voices {r['list_voices_ms']} ms, personas {r['list_personas_ms']} ms, "
            f"reconcile {r['reconcile_s']} s",
            flush=True,
        )
    return {"repeats": REPEATS, "results": results}
