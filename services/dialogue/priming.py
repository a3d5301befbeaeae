"""What a session is primed with: its persona's primer and, after a failover, what it had said so far.

The text is tokenized with Moshi's own text tokenizer and forced into the model's text stream (see
batcher.py). It is a steer of the model's inner monologue, not a system prompt: docs/personas.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

# The transcript speaker of Moshi's text pieces (shared.sessions.SessionStore keeps the turns).
ASSISTANT = "assistant"


def spoken_so_far(turns: Iterable[Mapping[str, Any]]) -> str:
    """The model's own words from a session transcript (pieces carry their leading spaces)."""
    return "".join(str(t.get("text", "")) for t in turns if t.get("speaker") == ASSISTANT).strip()


def primer_tokens(
    encode: Callable[[str], list[int]], primer: str, spoken: str = "", limit: int = 64
) -> list[int]:
    """The tokens to force, at most `limit`: the primer first (cut at its end if it alone is too
    long), then the most recent part of what was said that still fits."""
    persona = encode(primer.strip())[:limit] if primer.strip() else []
    room = limit - len(persona)
    history = encode(spoken) if spoken and room > 0 else []
    return persona + history[-room:] if history else persona
