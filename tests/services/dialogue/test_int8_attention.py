"""The in-place reads of the int8 KV cache (services/dialogue/int8_attention.py) against torch's own
attention on the dequantized cache: the compiled read as `torch.compile` runs it on the CPU, and the
Triton kernel in Triton's interpreter (the kernel a GPU runs, executed step by step on the CPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as F

from services.dialogue.int8_attention import (
    TRITON_BLOCK_POSITIONS,
    compiled_fused_int8_attention,
    fused_int8_attention,
    triton_int8_attention,
)
from services.dialogue.quantized import Int8KVCache

Read = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
READS: dict[str, Read] = {
    "eager": fused_int8_attention,
    "compiled": compiled_fused_int8_attention,
    "triton": triton_int8_attention,
}


def filled_cache(
    batch: int, groups: int, capacity: int, dim: int, steps: int, dtype: torch.dtype, seed: int
) -> tuple[Int8KVCache, torch.Tensor]:
    """A ring written `steps` times (past its capacity: positions wrap), row 1 skipped every third step
    and the last row never run (the exec mask): its slots are all empty. The cache and its positions."""
    generator = torch.Generator().manual_seed(seed)
    cache = Int8KVCache(batch, groups, dim, capacity, device=torch.device("cpu"), dtype=dtype)
    for step in range(steps):
        k, v = torch.randn((2, batch, groups, 1, dim), generator=generator).to(dtype)
        runs = torch.tensor([True, step % 3 > 0] + [False] * (batch - 2))
        positions = cache.append(k, v, runs)
    return cache, positions


@pytest.mark.parametrize("read", list(READS))
@pytest.mark.parametrize(
    ("heads", "groups", "capacity", "context"),
    [(4, 2, 100, 60), (4, 4, 2 * TRITON_BLOCK_POSITIONS + 5, None)],
    ids=["grouped-heads-windowed", "capacity-past-two-blocks"],
)
@torch.no_grad()
def test_each_read_gives_torchs_attention_on_the_dequantized_cache(
    read: str, heads: int, groups: int, capacity: int, context: int | None, request: pytest.FixtureRequest
) -> None:
    """Grouped heads (moshi's kv_repeat), a ring that wrapped, a context window shorter than the ring,
    a capacity that does not fill the kernel's last block; and a row that may see nothing, whose output
    must stay finite (NaN there is read by nothing, but would still sit in the batch)."""
    if read == "triton":
        request.getfixturevalue("triton_interpreter")
    batch, dim = 3, 16
    cache, positions = filled_cache(batch, groups, capacity, dim, capacity + 30, torch.float32, seed=1)
    q = torch.randn((batch, heads, 1, dim), generator=torch.Generator().manual_seed(2))
    query_positions = (cache.end_offset - 1).view(-1, 1, 1)
    delta = query_positions - positions[:, None]
    allowed = (positions[:, None] >= 0) & (delta >= 0)
    if context is not None:
        allowed &= delta < context
    assert allowed[:2].any(-1).all() and not allowed[2].any()
    if context is not None:
        assert (allowed[0].sum() == context) and (positions[0] >= 0).all()

    out = READS[read](q, cache.cache, cache.scales, allowed)

    keys, values = (cache.cache * cache.scales).repeat_interleave(heads // groups, dim=2)
    expected = F.scaled_dot_product_attention(q, keys, values, allowed[:, None])
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], expected[:2], atol=2e-5, rtol=1e-5)


@pytest.mark.usefixtures("triton_interpreter")
@torch.no_grad()
def test_the_triton_read_in_bf16_matches_the_compiled_one_to_bf16s_rounding() -> None:
    cache, positions = filled_cache(2, 2, 70, 32, 90, torch.bfloat16, seed=3)
    q = torch.randn((2, 4, 1, 32), generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    allowed = (positions >= 0)[:, None]
    triton_out = triton_int8_attention(q, cache.cache, cache.scales, allowed)
    fused = fused_int8_attention(q, cache.cache, cache.scales, allowed)
    assert triton_out.dtype == torch.bfloat16
    torch.testing.assert_close(triton_out, fused, atol=8e-3, rtol=8e-3)


def test_the_triton_read_refuses_what_it_was_not_written_for() -> None:
    cache, positions = filled_cache(2, 2, 8, 16, 4, torch.float32, seed=5)
    allowed = (positions >= 0)[:, None]
    with pytest.raises(ValueError, match="one step"):
        triton_int8_attention(
            torch.zeros((2, 2, 2, 16)), cache.cache, cache.scales, allowed.expand(-1, 2, -1)
        )
    odd = Int8KVCache(2, 2, 12, 8, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        triton_int8_attention(torch.zeros((2, 2, 1, 12)), odd.cache, odd.scales, allowed)
