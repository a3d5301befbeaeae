"""Checks a server event against the official `openai` SDK's own pydantic types: the class of its `type`
in the GA `RealtimeServerEvent` union, or in the beta one. Chorus's own `chorus.*` events are exempt."""

from __future__ import annotations

import json
import typing
from typing import Any

from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent
from pydantic import BaseModel


def _classes_by_type(union: object) -> dict[str, type[BaseModel]]:
    members = typing.get_args(typing.get_args(union)[0])  # Annotated[Union[...], PropertyInfo]
    by_type: dict[str, type[BaseModel]] = {}
    for member in members:
        for event_type in typing.get_args(member.model_fields["type"].annotation):
            by_type[event_type] = member
    return by_type


GA_EVENTS = _classes_by_type(RealtimeServerEvent)
BETA_EVENTS = _classes_by_type(BetaServerEvent)


def conforming(raw: str | bytes, *, beta: bool = False) -> dict[str, Any]:
    """The event as a dict, once it validates as the SDK's class of its type (AssertionError if not)."""
    event: dict[str, Any] = json.loads(raw)
    event_type = event.get("type", "")
    if event_type.startswith("chorus."):
        return event
    classes = BETA_EVENTS if beta else GA_EVENTS
    dialect = "beta" if beta else "GA"
    assert event_type in classes, f"{event_type!r} is no server event of the {dialect} API"
    classes[event_type].model_validate(event)
    return event
