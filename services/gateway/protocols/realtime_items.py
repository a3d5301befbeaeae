"""The conversation's items as a realtime client sees them: the user's committed audio turns and Moshi's
responses, kept (bounded) so `conversation.item.retrieve / delete / truncate` can answer.

Chorus keeps no audio: an item is its id, role and, for Moshi's, the transcript with the time (in the
item's own audio, 80 ms a delta) at which each piece of text came. Truncating at `audio_end_ms` keeps the
text that came before that point: what the user heard.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from services.gateway.protocols import realtime_events as ev
from shared.errors import InvalidRequest

MAX_ITEMS = 256  # the oldest item is forgotten past this: a long conversation costs bounded memory


@dataclass
class Item:
    id: str
    role: Literal["user", "assistant"]
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    pieces: list[tuple[int, str]] = field(default_factory=list)  # (ms into the item's audio, text)
    audio_ms: int = 0  # how much of its audio was sent
    heard_ms: int | None = None  # truncated: only this much was heard

    @property
    def transcript(self) -> str:
        heard = self.audio_ms if self.heard_ms is None else self.heard_ms
        return "".join(text for at_ms, text in self.pieces if self.heard_ms is None or at_ms < heard)

    def wire(self) -> dict[str, Any]:
        """The item in the GA shape (`realtime_events.wire` writes the beta one)."""
        part_type = "output_audio" if self.role == "assistant" else "input_audio"
        part = {"type": part_type, "transcript": self.transcript if self.role == "assistant" else None}
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "role": self.role,
            "status": self.status,
            "content": [part],
        }

    def truncate(self, content_index: int, audio_end_ms: int) -> None:
        if self.role != "assistant":
            raise ev.NotSupported(f"item {self.id} is the user's: only an assistant item can be truncated")
        if content_index != 0:
            raise InvalidRequest(f"item {self.id} has one content part (index 0), not {content_index}")
        if audio_end_ms > self.audio_ms:
            raise InvalidRequest(
                f"audio_end_ms {audio_end_ms} is past the end of item {self.id}'s audio ({self.audio_ms} ms)"
            )
        self.heard_ms = audio_end_ms
        self.audio_ms = audio_end_ms


class ConversationItems:
    def __init__(self, max_items: int = MAX_ITEMS) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, Item] = OrderedDict()

    def add(self, item: Item) -> str | None:
        """Adds `item` last; returns the id of the item before it (None: the first)."""
        previous = next(reversed(self._items), None)
        self._items[item.id] = item
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return previous

    def get(self, item_id: str) -> Item:
        item = self._items.get(item_id)
        if item is None:
            raise ev.ItemNotFound(f"no item {ev.excerpt(item_id)} in this conversation")
        return item

    def delete(self, item_id: str) -> None:
        self.get(item_id)
        del self._items[item_id]
