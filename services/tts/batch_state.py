"""Pocket TTS streaming states of several phrases stacked into one batch, and split back.

A batch runs pocket_tts's own modules once for all its rows, so its attention layers need one offset for
every row (`complete_kv` refuses others). Rows differ in length (voice prompts, texts, how long each has
spoken), so they are right-aligned: a row `s` slots shorter than the batch starts `s` slots in, and its
`pad` (pocket_tts's mask for leading slots that hold no content) says so. RoPE is taken at the batch's
offset for every row, so a row's cached keys are rotated by the same `s` when it moves: a key always sits
rotated by the position of its slot, and query-key angles are those of the row alone.

Layouts (pocket_tts `modules/attention.py`, `modules/conv.py`): an attention state holds `offset` [B],
`pad` [B] and `cache` [2, B, T, heads, dim] (keys then values); the convolutions' states hold tensors with
the batch first.
"""

from __future__ import annotations

import torch
from pocket_tts.modules.attention import StreamingMultiheadAttention
from pocket_tts.modules.rope import apply_rope
from pocket_tts.modules.stateful_module import StatefulModule, init_states

ModelState = dict[str, dict[str, torch.Tensor]]


def attention_layers(model: torch.nn.Module) -> dict[str, StreamingMultiheadAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, StreamingMultiheadAttention)}


def stateful_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, StatefulModule)]


def _rotate(keys: torch.Tensor, shift: int, max_period: float) -> torch.Tensor:
    """Keys [T, heads, dim] turned by `shift` more positions (RoPE rotations add up)."""
    if shift == 0:
        return keys
    flat = keys.reshape(1, 1, -1, keys.shape[-1])  # one time step: every key gets the same angle
    turned: torch.Tensor = apply_rope(flat, flat, offset=shift, max_period=max_period)[0]
    return turned.reshape(keys.shape)


def _content(state: dict[str, torch.Tensor], row: int, context: int | None) -> tuple[torch.Tensor, int]:
    """A row's keys and values that can still be attended to ([2, T, heads, dim]) and the slot they
    start at (past `context`, older keys are masked anyway: they are dropped)."""
    offset = int(state["offset"][row])
    pad = state.get("pad")
    start = int(pad[row]) if pad is not None else 0
    if context is not None:
        start = max(start, offset - context)
    return state["cache"][:, row, start:offset], start


class Layout:
    """How one model's streaming state is stacked: which modules attend (with their RoPE period and
    context), which hold batch-first tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.attention = {name: (m.rope.max_period, m.context) for name, m in attention_layers(model).items()}
        self.names = stateful_names(model)

    def rows(self, state: ModelState) -> int:
        first = state[self.names[0]]
        name = self.names[0]
        return int(first["cache"].shape[1] if name in self.attention else next(iter(first.values())).shape[0])

    def offset(self, state: ModelState) -> int:
        """The batch's common offset (0 for a model without attention)."""
        for name in self.attention:
            return int(state[name]["offset"].max())
        return 0

    def split(self, state: ModelState) -> list[ModelState]:
        """One state per row, each with its own offset, no padding, keys turned back to their own
        positions and no spare capacity."""
        return [self._row(state, row) for row in range(self.rows(state))]

    def _row(self, state: ModelState, row: int) -> ModelState:
        result: ModelState = {}
        for name in self.names:
            module = state[name]
            if name not in self.attention:
                result[name] = {key: value[row : row + 1].clone() for key, value in module.items()}
                continue
            period, context = self.attention[name]
            content, start = _content(module, row, context)
            keys = _rotate(content[0], -start, period)
            cache = torch.stack([keys, content[1]])[:, None].clone()
            length = torch.tensor([content.shape[1]], dtype=torch.long, device=cache.device)
            result[name] = {"offset": length, "pad": torch.zeros_like(length), "cache": cache}
        return result

    def stack(self, rows: list[ModelState], spare: int) -> ModelState:
        """One batch from single-row states (as `split` or pocket_tts make them), right-aligned, with
        room for `spare` more slots."""
        result: ModelState = {}
        for name in self.names:
            parts = [row[name] for row in rows]
            if name in self.attention:
                result[name] = self._stack_attention(parts, self.attention[name], spare)
            else:
                result[name] = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        return result

    @staticmethod
    def _stack_attention(
        parts: list[dict[str, torch.Tensor]], attention: tuple[float, int | None], spare: int
    ) -> dict[str, torch.Tensor]:
        period, context = attention
        contents = [_content(part, 0, context)[0] for part in parts]
        width = max(c.shape[1] for c in contents)
        sample = parts[0]["cache"]
        cache = torch.zeros(
            (2, len(parts), width + spare, *sample.shape[3:]), dtype=sample.dtype, device=sample.device
        )
        pad = torch.zeros(len(parts), dtype=torch.long, device=sample.device)
        for row, content in enumerate(contents):
            _, start = _content(parts[row], 0, context)
            shift = width - content.shape[1]
            pad[row] = shift
            # The keys were turned for slots from `start`; they now sit from `shift`.
            cache[0, row, shift:width] = _rotate(content[0], shift - start, period)
            cache[1, row, shift:width] = content[1]
        offset = torch.full((len(parts),), width, dtype=torch.long, device=sample.device)
        return {"offset": offset, "pad": pad, "cache": cache}

    def room(self, state: ModelState) -> int:
        """Slots left before the batch's caches are full."""
        for name in self.attention:
            module = state[name]
            return int(module["cache"].shape[2]) - int(module["offset"].max())
        return 1 << 30


def fresh(model: torch.nn.Module) -> ModelState:
    """An empty single-row state (a Mimi decoder before its first frame)."""
    state: ModelState = init_states(model, batch_size=1, sequence_length=0)
    return state
