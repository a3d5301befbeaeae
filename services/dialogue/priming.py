"""What a session is primed with: its persona's primer and, after a failover or a context rollover, what
it had said so far; and when its model state rolls over.

The text is tokenized with Moshi's own text tokenizer and forced into the model's text stream (see
batcher.py). It is a steer of the model's inner monologue, not a system prompt: docs/personas.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# The transcript speaker of Moshi's text pieces (shared.sessions.SessionStore keeps the turns).
ASSISTANT = "assistant"


def spoken_so_far(utterances: Iterable[Mapping[str, Any]]) -> str:
    """The model's own words from a session transcript (one entry per utterance)."""
    texts = (str(u.get("text", "")).strip() for u in utterances if u.get("speaker") == ASSISTANT)
    return " ".join(t for t in texts if t)


def primer_tokens(
    encode: Callable[[str], list[int]],
    primer: str,
    spoken: str = "",
    limit: int = 64,
    *,
    history_limit: int | None = None,
) -> list[int]:
    """The tokens to force, at most `limit`: the primer first (cut at its end if it alone is too
    long), then the most recent part of what was said that still fits (at most `history_limit`)."""
    persona = encode(primer.strip())[:limit] if primer.strip() else []
    room = limit - len(persona)
    if history_limit is not None:
        room = min(room, history_limit)
    history = encode(spoken) if spoken and room > 0 else []
    return persona + history[-room:] if history else persona


# How long a due rollover waits for a free slot (another session's rollover frees one within its primer)
# before it degrades to priming in place; the default threshold leaves this much room, plus the primer's.
ROLLOVER_SLACK_FRAMES = 25  # 2 s


def rollover_margin(primer_bound: int) -> int:
    """The frames the default rollover leaves before the context is full: the primer bound (plus the
    acoustic delay) and `ROLLOVER_SLACK_FRAMES`."""
    return primer_bound + ROLLOVER_SLACK_FRAMES


def rollover_head_start(dues: Sequence[int], at: int, spacing: int, most: int) -> int:
    """The frames a state joining now comes due for its rollover early, so that it comes due `spacing`
    frames or more from every other state (`dues`: the frames until each comes due): the fewest that do,
    at most `most`; 0 when none do.

    Why: sessions that join together (a failover seating a dead worker's sessions, a burst of starts)
    would come due together, again every `at` frames (a rollover renews a state where it stands), and
    the rows kept for rollovers can prime only so many at once: the rest would roll over in place, a
    pause, each time. Spaced by a fresh state's priming time (at most) over the rows kept, each finds one
    free (about so: prime-ahead shortens priming, and ages, unevenly). Only the first rollover comes
    early: the fresh states keep the spacing. A state about to roll over (or waiting to) is due again
    about `at` frames later: near this one's due, so counted there too."""
    next_round = [max(other, 0) + at for other in dues if other < spacing]
    due = at
    for other in sorted([*dues, *next_round], reverse=True):  # descending: `due` only falls
        if other - spacing < due < other + spacing:
            due = other - spacing
    return at - due if at - due <= most else 0


def rollover_threshold(setting: int | None, context: int | None, primer_bound: int) -> int | None:
    """The steps after which a session's state rolls over (None: never). `setting` is
    CHORUS_DIALOGUE_ROLLOVER_AT (None: the default, 0: off); `primer_bound` the most steps priming a fresh
    state takes at one token per tick (the primer bound plus the acoustic delay). The default leaves that
    margin plus `ROLLOVER_SLACK_FRAMES` before the context is full, and is off when the context is under
    twice the margin (a fresh state would spend more of it on its primer than on the conversation)."""
    if setting is not None:
        return setting or None
    if context is None:
        return None
    margin = rollover_margin(primer_bound)
    return context - margin if context >= 2 * margin else None


def check_context(setting: int | None, primer_bound: int) -> None:
    """Refuse a CHORUS_DIALOGUE_CONTEXT (None: the checkpoint's, not checked) under twice the rollover
    margin: the default rollover would be off, and a fresh state would spend more of its context on its
    primer than on the conversation."""
    least = 2 * rollover_margin(primer_bound)
    if setting is not None and setting < least:
        raise ValueError(
            f"CHORUS_DIALOGUE_CONTEXT ({setting}) must be at least {least} frames: twice the rollover margin "
            f"(the primer bound of {primer_bound} frames plus {ROLLOVER_SLACK_FRAMES})"
        )


def check_rollover_at(at: int | None, context: int | None, primer_bound: int) -> None:
    """Refuse a CHORUS_DIALOGUE_ROLLOVER_AT the model cannot honour (None/0: nothing to check): at or within
    `primer_bound`, a fresh state would be due to roll over again as soon as its primer is in; past
    the context minus that bound and `ROLLOVER_SLACK_FRAMES`, the old state's cache wraps before the
    fresh one takes over (what the rollover is for)."""
    if not at:
        return
    if at <= primer_bound:
        raise ValueError(
            f"CHORUS_DIALOGUE_ROLLOVER_AT ({at}) must exceed the primer bound of {primer_bound} frames "
            "(CHORUS_DIALOGUE_MAX_PRIMER_TOKENS, plus the acoustic delay once the model is loaded): a fresh "
            "state would roll over again at once"
        )
    if context is not None and at + rollover_margin(primer_bound) > context:
        most = context - rollover_margin(primer_bound)
        raise ValueError(
            f"CHORUS_DIALOGUE_ROLLOVER_AT ({at}) leaves no room to prime a fresh state within the model's "
            f"context of {context} frames: at most {most} (0: off)"
        )
