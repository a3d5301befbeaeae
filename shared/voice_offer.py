"""Which voices the TTS workers can speak, as their presence hashes say: the gateway has no model, so
it lists catalog voices, refuses unknown ones and answers for uploads from this.

Each TTS worker publishes `voice_cloning` (1: it holds Pocket TTS's voice-cloning weights, 0: only the
weights without cloning, the gated ones being out of reach) and `catalog` (a `CatalogListing` as JSON).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from shared.bus import Bus
from shared.presence import WorkerFields, WorkerInfo, list_workers

log = logging.getLogger(__name__)

TTS_SERVICE = "tts"


class CatalogListing(BaseModel):
    """One worker's catalog: the language of its model, where the states come from, the voice names."""

    language: str
    source: str  # "hub" (Kyutai's published states) or "local" (the checkpoint's own)
    voices: list[str]


def presence_fields(can_clone: bool, catalog: CatalogListing) -> WorkerFields:
    return {"voice_cloning": int(can_clone), "catalog": catalog.model_dump_json()}


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    language: str
    source: str


@dataclass(frozen=True)
class VoiceOffer:
    """What the serving TTS workers can speak, together (`catalog`: the voices every one of them has)."""

    workers: int = 0
    cloning: int = 0  # workers that can clone
    catalog: dict[str, CatalogEntry] = field(default_factory=dict)
    models: frozenset[str] = frozenset()  # the model versions they run (voice states are keyed by them)

    @property
    def can_clone(self) -> bool:
        return self.cloning > 0

    @property
    def cloning_blocked(self) -> bool:
        """TTS workers are serving and none of them can clone: a clip could never be spoken. (With none
        serving, one that starts later may.)"""
        return self.workers > 0 and not self.can_clone

    def kinds(self) -> list[str]:
        """The voice kinds a session can use now: `native` always, `catalog` and `cloned` with TTS."""
        kinds = ["native"]
        if self.catalog:
            kinds.append("catalog")
        if self.can_clone:
            kinds.append("cloned")
        return kinds


def _catalog_of(worker: WorkerInfo) -> CatalogListing | None:
    raw = worker.fields.get("catalog")
    if raw is None:
        return None
    try:
        return CatalogListing.model_validate_json(raw)
    except ValidationError:
        log.warning("a TTS worker published an unreadable catalog", extra={"worker_id": worker.worker_id})
        return None


def offer_of(workers: list[WorkerInfo]) -> VoiceOffer:
    serving = [w for w in workers if w.serving]
    listings = [listing for w in serving if (listing := _catalog_of(w)) is not None]
    # Sessions and previews go to any worker: a voice is offered only if every worker can speak it.
    common = set.intersection(*(set(listing.voices) for listing in listings)) if listings else set()
    catalog: dict[str, CatalogEntry] = {}
    for listing in listings:
        for name in listing.voices:
            if name in common:
                catalog.setdefault(name, CatalogEntry(name, listing.language, listing.source))
    cloning = sum(w.fields.get("voice_cloning", "1") == "1" for w in serving)
    models = frozenset(w.fields["model"] for w in serving if "model" in w.fields)
    return VoiceOffer(
        workers=len(serving), cloning=cloning, catalog=dict(sorted(catalog.items())), models=models
    )


async def voice_offer(bus: Bus) -> VoiceOffer:
    return offer_of(await list_workers(bus, TTS_SERVICE))
