"""The realtime conversation's items cost bounded memory, however long the conversation."""

from __future__ import annotations

import pytest

from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.realtime_items import MAX_ITEM_PIECES, ConversationItems, Item


def test_the_oldest_items_are_forgotten_past_either_bound() -> None:
    items = ConversationItems(max_items=3, max_pieces=10)
    for n in range(4):
        assert items.add(Item(f"item_{n}", "user")) == (f"item_{n - 1}" if n else None)
    with pytest.raises(ev.ItemNotFound):
        items.get("item_0")
    talker = Item("item_talk", "assistant", pieces=[(0, "word")] * 9)
    items.add(talker)
    assert items.get("item_talk") is talker and items.get("item_2").role == "user"
    with pytest.raises(ev.ItemNotFound):
        items.get("item_1")  # over 3 items
    items.add(Item("item_more", "assistant", pieces=[(0, "x")] * 5))
    for forgotten in ("item_2", "item_3", "item_talk"):  # 9 + 5 pieces are over 10
        with pytest.raises(ev.ItemNotFound):
            items.get(forgotten)
    assert items.get("item_more").transcript == "x" * 5


def test_an_items_transcript_stops_growing_past_its_bound() -> None:
    item = Item("item_long", "assistant")
    for _ in range(MAX_ITEM_PIECES + 10):
        item.record("la ")
    assert len(item.pieces) == MAX_ITEM_PIECES
