"""Attention over the int8 KV cache (`quantized.Int8KVCache`) without a dequantized copy of it.

The cache holds, per (row, head group, position), int8 keys and values and one scale each. A position's
scale factors out of both products of attention: q . (s k) = s (q . k), and sum p (s v) = sum (p s) v;
so attention can read the int8 values where they lie, one byte each, where a dequantized copy writes
two bytes a value and reads them back (2.5x the bytes of a bf16 cache in all).

Two reads, both of shape q [B, H, T, D] over cache [2, B, G, C, D] and scales [2, B, G, C, 1] (G = H /
kv_repeat head groups), `allowed` [B, T, C] saying which positions each query sees:
- `fused_int8_attention`: the products written as multiplies and sums that `torch.compile` fuses into
  passes over the int8 values. On an H100 it is 2.8x faster than the copy but far from what the bytes
  allow (docs/performance.md, "int8 weights and KV cache");
- `triton_int8_attention`: one step (T = 1), a hand-written decode kernel (one program per row and head,
  the positions in blocks, online softmax, int8 turned into float in registers). On an H100, one step
  over 64 full caches takes 0.80 ms at its tuning here, 3.2x faster than the compiled read and faster
  than torch's bf16 attention over a bf16 cache (1.09 ms): the CUDA worker's read. Run here by
  Triton's interpreter on the CPU (tests/services/dialogue/test_int8_attention.py).

A row that may see nothing (one the exec mask skipped before its first step) gets a finite average of
its slots that nothing reads, where a softmax over nothing would put NaN in the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

try:  # CUDA builds of torch bring Triton; CPU workers have no use for it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

_MASKED = -1.0e30  # a masked score: finite, so a row with nothing allowed averages instead of NaN
# The kernel's tuning: the fastest of six timed on an H100 (bench/results/int8_attention.json: 128
# positions a turn and 4 warps, 0.80 ms a step at 64 sessions; 64 and 4, 1.08 ms; 8 warps slower at each).
TRITON_BLOCK_POSITIONS = 128
TRITON_WARPS = 4


def triton_reads(device: torch.device, steps: int, head_dim: int) -> bool:
    """Whether `triton_int8_attention` can take a step: on CUDA, with Triton, one step at a time, a
    power-of-two head size."""
    return triton is not None and device.type == "cuda" and steps == 1 and head_dim & (head_dim - 1) == 0


def fused_int8_attention(
    q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """The read for `torch.compile` (meant to run compiled: eagerly it builds [B, H, T, C, D] floats)."""
    batch, heads, steps, dim = q.shape
    groups = cache.shape[2]
    queries = q.float().view(batch, groups, heads // groups, steps, 1, dim)
    keys, values = cache[0][:, :, None, None], cache[1][:, :, None, None]  # [B, G, 1, 1, C, D]
    key_scales = scales[0][:, :, None, None, :, 0].float()  # [B, G, 1, 1, C]
    value_scales = scales[1][:, :, None, None, :, 0].float()
    scores = (queries * keys).sum(-1) * (key_scales / math.sqrt(dim))  # [B, G, R, T, C]
    scores = scores.masked_fill(~allowed[:, None, None], _MASKED)
    weights = scores.softmax(dim=-1) * value_scales
    out = (weights[..., None] * values).sum(-2)  # [B, G, R, T, D]
    return out.reshape(batch, heads, steps, dim).to(q.dtype)


def compiled_fused_int8_attention(
    q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """`fused_int8_attention` compiled (one graph per batch size, as the worker's batch is fixed)."""
    out: torch.Tensor = _compiled_read()(q, cache, scales, allowed)
    return out


@functools.cache
def _compiled_read() -> Any:
    # On first use: torch.compile imports dynamo and inductor, which a process that never reads an int8
    # cache in place (a CPU worker, the benchmark's parser) has no use for.
    return torch.compile(fused_int8_attention, dynamic=False)


def triton_int8_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    scales: torch.Tensor,
    allowed: torch.Tensor,
    *,
    block: int = TRITON_BLOCK_POSITIONS,
    warps: int = TRITON_WARPS,
) -> torch.Tensor:
    """One step's attention by the Triton kernel: q [B, H, 1, D]; D a power of two (Moshi's is 128).
    `block` (positions a loop turn) and `warps` are the kernel's tuning, for bench/gpu_int8_attention.py."""
    batch, heads, steps, dim = q.shape
    if steps != 1 or dim & (dim - 1):
        raise ValueError(f"the Triton read takes one step and a power-of-two head size, not {tuple(q.shape)}")
    if triton is None:
        raise RuntimeError("the Triton read of the int8 cache needs triton (CUDA builds of torch bring it)")
    groups, capacity = cache.shape[2], cache.shape[3]
    assert cache.stride(-1) == 1 and scales.shape[-1] == 1, "positions' values contiguous, one scale each"
    queries = q[:, :, 0].contiguous()  # [B, H, D]
    allowed_rows = allowed[:, 0].to(torch.int8)  # [B, C]
    out = torch.empty_like(queries)
    _decode_kernel()[(batch * heads,)](
        queries,
        cache,
        scales,
        allowed_rows,
        out,
        heads,
        heads // groups,
        capacity,
        *queries.stride()[:2],
        *cache.stride()[:4],
        *scales.stride()[:4],
        *allowed_rows.stride(),
        *out.stride()[:2],
        1.0 / math.sqrt(dim),
        DIM=dim,
        BLOCK=block,
        num_warps=warps,
    )
    return out[:, :, None]


@functools.cache
def _decode_kernel() -> Any:
    """Jitted on first use, so that a process importing this module without using it never asks Triton
    for anything (and TRITON_INTERPRET, read when jitting, can be set before the first use)."""
    return triton.jit(_decode_source)


def _decode_source(  # type: ignore[no-untyped-def]  # Triton reads the parameters' annotations
    q_ptr,
    cache_ptr,
    scales_ptr,
    allowed_ptr,
    out_ptr,
    heads,
    repeat,
    capacity,
    q_row,
    q_head,
    c_kv,
    c_row,
    c_group,
    c_pos,
    s_kv,
    s_row,
    s_group,
    s_pos,
    a_row,
    a_pos,
    o_row,
    o_head,
    sm_scale,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The kernel: one program per (row, head), the ring's positions in blocks of BLOCK. Offsets in
    int64: 96 rows of Moshi's cache pass 2**31 bytes. Globals are off limits in a kernel (Triton
    accepts only constexpr ones), so the masked score (-1e30, `_MASKED`) is written out."""
    program = tl.program_id(0)
    row = (program // heads).to(tl.int64)
    head = (program % heads).to(tl.int64)
    group = head // repeat
    dims = tl.arange(0, DIM)
    query = tl.load(q_ptr + row * q_row + head * q_head + dims).to(tl.float32)
    keys = cache_ptr + row * c_row + group * c_group
    key_scales = scales_ptr + row * s_row + group * s_group
    best = -float("inf")
    total = 0.0
    acc = tl.zeros([DIM], dtype=tl.float32)
    for start in range(0, capacity, BLOCK):
        positions = start + tl.arange(0, BLOCK)
        present = positions < capacity
        seen = tl.load(allowed_ptr + row * a_row + positions * a_pos, mask=present, other=0) != 0
        offsets = positions[:, None] * c_pos + dims[None, :]
        k = tl.load(keys + offsets, mask=present[:, None], other=0).to(tl.float32)
        k_scale = tl.load(key_scales + positions * s_pos, mask=present, other=0.0).to(tl.float32)
        score = tl.sum(k * query[None, :], axis=1) * k_scale * sm_scale
        score = tl.where(seen, score, -1.0e30)
        score = tl.where(present, score, -float("inf"))  # past the ring's end: no weight at all
        new_best = tl.maximum(best, tl.max(score, axis=0))
        rescale = tl.exp(best - new_best)
        weight = tl.exp(score - new_best)
        v = tl.load(keys + c_kv + offsets, mask=present[:, None], other=0).to(tl.float32)
        v_scale = tl.load(key_scales + s_kv + positions * s_pos, mask=present, other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum((weight * v_scale)[:, None] * v, axis=0)
        total = total * rescale + tl.sum(weight, axis=0)
        best = new_best
    out = acc / total
    tl.store(out_ptr + row * o_row + head * o_head + dims, out.to(out_ptr.dtype.element_ty))
