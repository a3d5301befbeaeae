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
from shared.errors import InvalidRequest, excerpt

# A long conversation costs bounded memory: past either bound the oldest items are forgotten, and an item's
# transcript stops growing (its deltas are still sent) past MAX_ITEM_PIECES (minutes of speech).
MAX_ITEMS = 256
MAX_PIECES = 16_384  # text pieces kept over all items
MAX_ITEM_PIECES = 4096


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

    def record(self, text: str) -> None:
        """A piece of the item's transcript, at the point of its audio reached so far."""
        if len(self.pieces) < MAX_ITEM_PIECES:
            self.pieces.append((self.audio_ms, text))

    def truncate(self, content_index: int, audio_end_ms: int) -> None:
        self.check_truncate(content_index, audio_end_ms)
        self.heard_ms = audio_end_ms
        self.audio_ms = audio_end_ms

    def check_truncate(self, content_index: int, audio_end_ms: int) -> None:
        """Refuses a truncation this item cannot take (before anything about it changes)."""
        if self.role != "assistant":
            raise ev.NotSupported(f"item {self.id} is the user's: only an assistant item can be truncated")
        if content_index != 0:
            raise InvalidRequest(f"item {self.id} has one content part (index 0), not {content_index}")
        if audio_end_ms > self.audio_ms:
            raise InvalidRequest(
                f"audio_end_ms {audio_end_ms} is past the end of item {self.id}'s audio ({self.audio_ms} ms)"
            )


class ConversationItems:
    def __init__(self, max_items: int = MAX_ITEMS, max_pieces: int = MAX_PIECES) -> None:
        self.max_items = max_items
        self.max_pieces = max_pieces
        self._items: OrderedDict[str, Item] = OrderedDict()

    def add(self, item: Item) -> str | None:
        """Adds `item` last, forgetting the oldest past the bounds; returns the id of the item before it
        (None: the first)."""
        previous = next(reversed(self._items), None)
        self._items[item.id] = item
        pieces = sum(len(kept.pieces) for kept in self._items.values())
        while len(self._items) > 1 and (len(self._items) > self.max_items or pieces > self.max_pieces):
            pieces -= len(self._items.popitem(last=False)[1].pieces)
        return previous

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    def get(self, item_id: str) -> Item:
        item = self._items.get(item_id)
        if item is None:
            raise ev.ItemNotFound(f"no item {excerpt(item_id)} in this conversation")
        return item

    def delete(self, item_id: str) -> None:
        self.get(item_id)
        del self._items[item_id]
