"""int8 weights and an int8 KV cache for Moshi's LM, in torch alone (no bitsandbytes).

Weights: every linear layer of the LM becomes an `Int8Linear`, in the format of moshi's `-q8`
checkpoints (`weight`: int8 [out, in]; `weight_scb`: float32 [out], the row's absolute maximum, so the
weight is `weight * weight_scb / 127`). A `-q8` checkpoint loads straight into it; a float checkpoint
is quantized at load. moshi's own `QLinear` needs bitsandbytes (not a dependency of ours); this layer
computes the same product with a torch kernel picked for where it runs and the layer's shape:
- CPU, bf16/fp16 activations: `torch._weight_int8pack_mm` (int8 weight, float activations; its CPU
  kernel wants the input width a multiple of 16: it crashes the process otherwise);
- CUDA: `torch._int_mm` on row-quantized activations (int8 tensor cores), the product bitsandbytes
  computes for moshi's `QLinear` (vector-wise int8 activations and weights, no outlier split; both
  widths multiples of 8);
- otherwise (CPU fp32, odd widths): the weight dequantized into the matmul.

KV cache: `Int8KVCache` stands in for moshi's `RingKVCache` in the main transformer (the depformer's
cache holds 8 steps: nothing to save there). Keys and values are stored int8 with one scale per
(row, head, position), the absolute maximum over the head's dimension. `LeanAttention.int8_read` says
how attention reads it: "copy", dequantized into a float copy for torch's own attention (2.5x the bytes
of a bf16 cache); "compiled" or "triton", in place (int8_attention.py); "auto" (the default), the Triton
kernel where it takes the step (a CUDA worker), else the compiled read where moshi compiles, else the
copy. On an H100 the Triton read runs 64 sessions of int8 weights and cache in real time
(72 ms tick p50, against 115 ms through the compiled read; docs/performance.md, "int8 weights and KV
cache").

Both are applied to an LM before it enters streaming (`make_lean`): moshi's attention builds its
streaming state from its first projection's type, so its class is swapped for `LeanAttention`, which
knows `Int8Linear` and which cache to build.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch
from einops import rearrange
from moshi.modules.transformer import (
    KVCacheResult,
    RingKVCache,
    StreamingMultiheadAttention,
    _MHAState,
)
from moshi.utils import compile as moshi_compile
from torch import nn
from torch.nn import functional as F

from services.dialogue.int8_attention import (
    compiled_fused_int8_attention,
    triton_int8_attention,
    triton_reads,
)

Kernel = Literal["int8pack", "w8a8", "dequant"]
Int8Read = Literal["auto", "copy", "compiled", "triton"]
INT8_READS: tuple[Int8Read, ...] = get_args(Int8Read)
INT8_MAX = 127
# torch._int_mm on CUDA wants more than 16 rows: a batch of 16 or fewer is padded with zero rows to 32.
_INT_MM_MAX_ROWS_REFUSED, _INT_MM_PADDED_ROWS = 16, 32
_TINY = 1e-8  # an all-zero row's scale: any positive value quantizes it to zeros


def kernel_for(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> Kernel:
    if device.type == "cuda" and in_features % 8 == 0 and out_features % 8 == 0:
        return "w8a8"
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and in_features % 16 == 0:
        return "int8pack"
    return "dequant"


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights and one float32 scale per output row (moshi's q8 format)."""

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight = torch.empty((out_features, in_features), dtype=torch.int8, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scb = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (no linear layer of Moshi's LM has one)")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, device=weight.device)
        quantized, absmax = quantize_rows(weight)
        layer.weight.data = quantized
        layer.weight_scb.data = absmax
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        kernel = kernel_for(x.device, x.dtype, self.in_features, self.out_features)
        if kernel == "int8pack":
            y = torch._weight_int8pack_mm(rows, self.weight, (self.weight_scb / INT8_MAX).to(x.dtype))
        elif kernel == "w8a8":
            y = w8a8_matmul(rows, self.weight, self.weight_scb)
        else:
            y = F.linear(rows, self.weight.to(x.dtype)) * (self.weight_scb / INT8_MAX).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along the last dimension: (int8 values, float32 absolute maximum per row)."""
    absmax = x.detach().abs().amax(dim=-1).float().clamp(min=_TINY)
    quantized = (x.float() * (INT8_MAX / absmax)[..., None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return quantized.to(torch.int8), absmax


def w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scb: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with x quantized per row: int8 x int8 -> int32, rescaled by both rows' scales."""
    quantized, x_absmax = quantize_rows(x)
    rows = quantized.shape[0]
    if rows <= _INT_MM_MAX_ROWS_REFUSED:
        quantized = F.pad(quantized, (0, 0, 0, _INT_MM_PADDED_ROWS - rows))
    product = torch._int_mm(quantized, weight.t())[:rows]
    scale = x_absmax[:, None] * (weight_scb / (INT8_MAX * INT8_MAX))[None, :]
    return (product.float() * scale).to(x.dtype)


class Int8KVCache(RingKVCache):  # type: ignore[misc]  # moshi is untyped
    """moshi's `RingKVCache` (per-row offsets, exec mask respected) stored in int8 with one scale per
    (row, head, position); `complete` returns the whole cache dequantized to `dtype`, as the ring does."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        dim_per_head: int,
        capacity: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        # The ring's own __init__ would allocate the float cache this one replaces.
        self.capacity = capacity
        self.dtype = dtype
        self.cache = torch.zeros(
            (2, batch_size, num_heads, capacity, dim_per_head), device=device, dtype=torch.int8
        )
        self.scales = torch.zeros((2, batch_size, num_heads, capacity, 1), device=device, dtype=dtype)
        self.end_offset = torch.zeros(batch_size, device=device, dtype=torch.long)

    def complete(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> KVCacheResult:
        """moshi's interface: write, then the whole cache dequantized (the uncompiled path)."""
        positions = self.append(k, v, exec_mask)
        keys, values = self.cache * self.scales  # int8 x float: one kernel, promoted to the scales' dtype
        return KVCacheResult(keys, values, positions)

    def append(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """Write `steps` new keys and values at each row's end; the absolute position of every slot."""
        assert k.shape == v.shape, (k.shape, v.shape)
        batch, heads, steps, dim = k.shape
        indexes = torch.arange(steps, device=k.device, dtype=torch.long) + self.end_offset.view(-1, 1)
        indexes = (indexes % self.capacity).view(batch, 1, steps, 1)
        for i, x in enumerate((k, v)):
            quantized, absmax = quantize_rows(x)
            self.cache[i].scatter_(2, indexes.expand(-1, heads, steps, dim), quantized)
            scale = (absmax / INT8_MAX).to(self.dtype)[..., None]
            self.scales[i].scatter_(2, indexes.expand(-1, heads, steps, 1), scale)
        return self._positions(steps, exec_mask)

    def _positions(self, steps: int, exec_mask: torch.Tensor) -> torch.Tensor:
        """The absolute position of every cache slot (-1: empty), then the offsets advanced: exactly
        `RingKVCache.complete`'s second half."""
        indexes = torch.arange(self.capacity, device=self.end_offset.device, dtype=torch.long)
        last_offset = self.end_offset.view(-1, 1) + steps - 1
        delta = indexes - last_offset % self.capacity
        positions = torch.where(delta <= 0, last_offset + delta, last_offset + delta - self.capacity)
        self.end_offset[:] = torch.where(exec_mask, self.end_offset + steps, self.end_offset)
        invalid = indexes >= self.end_offset.view(-1, 1)
        return torch.where(invalid, torch.full_like(positions, -1), positions)


class LeanAttention(StreamingMultiheadAttention):  # type: ignore[misc]  # moshi is untyped
    """moshi's attention, whose streaming state also knows `Int8Linear` projections and an int8 cache.

    Set on instances by `make_lean` (class swap, with `kv_dtype` and `kv_int8` set on the instance)."""

    kv_dtype: torch.dtype
    kv_int8: bool
    # How an int8 cache is read (module docstring): "auto" (`resolve_int8_read`) is the Triton kernel on
    # CUDA, else moshi's compile switch decides (off on a CPU) between the compiled read and the copy.
    # The others are for the benchmark and the tests.
    int8_read: Int8Read = "auto"

    def _init_streaming_state(self, batch_size: int) -> _MHAState:
        in_proj = self.in_projs[0]
        int8_cache = self.kv_int8 and not self.weights_per_step
        if not isinstance(in_proj, Int8Linear) and not int8_cache:
            return super()._init_streaming_state(batch_size)
        if self.cross_attention:
            raise NotImplementedError("cross attention (no Moshi LM has one) is not made lean")
        device = in_proj.weight.device
        capacity = self.context if self.context is not None else self.weights_per_step
        heads, dim_per_head = self.num_heads // self.kv_repeat, self.embed_dim // self.num_heads
        cache: RingKVCache
        if int8_cache:
            cache = Int8KVCache(batch_size, heads, dim_per_head, capacity, device=device, dtype=self.kv_dtype)
        else:
            cache = RingKVCache(
                batch_size,
                heads,
                dim_per_head,
                capacity,
                respect_exec_mask=not self.weights_per_step,
                device=device,
                dtype=self.kv_dtype,
            )
        offset = torch.zeros(batch_size, device=device, dtype=torch.long)
        return _MHAState(batch_size, device, cache, offset=offset, offset_cpu=0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        # The read is resolved only for an int8 cache: a lean LM's float-cache layers pay nothing per step.
        if state is not None and isinstance(state.kv_cache, Int8KVCache) and self.causal:
            takes = triton_reads(query.device, query.shape[1], self.embed_dim // self.num_heads)
            read = resolve_int8_read(self.int8_read, compiling=_moshi_compiles(), triton_reads=takes)
            if read != "copy":
                return self._forward_on_int8_cache(query, state, read)
        out: torch.Tensor = super().forward(query, key, value)
        return out

    def _forward_on_int8_cache(self, x: torch.Tensor, state: _MHAState, read: Int8Read) -> torch.Tensor:
        """moshi's streaming self-attention step (`StreamingMultiheadAttention.forward` where an int8
        cache is built: no cross attention, one set of weights for every step, causal), reading the
        cache in place (int8_attention.py) instead of through a dequantized copy."""
        steps = x.shape[1]
        projected = self.in_projs[0](x)
        q, k, v = self._split_heads(projected)
        if self.rope:
            q, k = self.rope(q, k, state.offset, time_before_heads=False)
        positions = state.kv_cache.append(k, v, state.exec_mask)[:, None]  # [B, 1, C]
        query_positions = state.offset.view(-1, 1, 1) + torch.arange(steps, device=x.device).view(-1, 1)
        delta = query_positions - positions  # [B, T, C]
        allowed = (positions >= 0) & (delta >= 0)
        if self.context is not None:
            allowed = allowed & (delta < self.context)
        attend = triton_int8_attention if read == "triton" else compiled_fused_int8_attention
        attended = attend(q, state.kv_cache.cache, state.kv_cache.scales, allowed)
        out: torch.Tensor = self.out_projs[0](rearrange(attended, "b h t d -> b t (h d)"))
        state.offset[:] = torch.where(state.exec_mask, state.offset + steps, state.offset)
        state.offset_cpu += steps
        return out

    def _split_heads(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kv_repeat == 1:
            q, k, v = rearrange(projected, "b t (p h d) -> p b h t d", p=3, h=self.num_heads)
            return q, k, v
        q = rearrange(projected[:, :, : self.embed_dim], "b t (h d) -> b h t d", h=self.num_heads)
        k, v = rearrange(
            projected[:, :, self.embed_dim :],
            "b t (p g d) -> p b g t d",
            p=2,
            g=self.num_heads // self.kv_repeat,
        )
        return q, k, v


def resolve_int8_read(setting: Int8Read, *, compiling: bool, triton_reads: bool) -> Int8Read:
    """The read an int8 cache's step takes: the setting, or for "auto" the fastest that runs here: the
    Triton kernel when it takes the step (a CUDA worker; measured on an H100: docs/performance.md, "int8
    weights and KV cache"), else the compiled read where moshi compiles, else the copy."""
    if setting != "auto":
        return setting
    if triton_reads:
        return "triton"
    return "compiled" if compiling else "copy"


def int8_read_of(lm: nn.Module, *, compiling: bool) -> Int8Read | None:
    """The read a lean LM's int8 cache takes for a one-step forward (the benchmark records it); None
    without an int8 cache."""
    for module in lm.modules():
        if isinstance(module, LeanAttention) and module.kv_int8 and not module.weights_per_step:
            device = next(module.parameters()).device
            takes = triton_reads(device, 1, module.embed_dim // module.num_heads)
            return resolve_int8_read(module.int8_read, compiling=compiling, triton_reads=takes)
    return None


def _moshi_compiles() -> bool:
    return not moshi_compile._compile_disabled and not os.environ.get("NO_TORCH_COMPILE")


def make_lean(lm: nn.Module, *, int8_weights: bool, int8_kv: bool, dtype: torch.dtype) -> None:
    """In place, before streaming: int8 linear layers (those still float) and/or the int8 KV cache.
    `dtype` is the LM's float dtype (activations, and the KV cache's when it is not int8)."""
    if int8_weights:
        replace_linears(lm)
    for module in lm.modules():
        if isinstance(module, StreamingMultiheadAttention):
            module.__class__ = LeanAttention
            assert isinstance(module, LeanAttention)
            module.kv_dtype = dtype
            module.kv_int8 = int8_kv


def set_int8_read(lm: nn.Module, read: Int8Read) -> None:
    """How every attention of a lean LM reads its int8 cache (`LeanAttention.int8_read`)."""
    for module in lm.modules():
        if isinstance(module, LeanAttention):
            module.int8_read = read


def replace_linears(module: nn.Module, *, quantize: bool = True) -> None:
    """Every nn.Linear under `module` becomes an Int8Linear (moshi's `replace_linear_with_qlinear`
    walk): quantized from its weights, or, with `quantize=False`, empty (to load a q8 state into)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            if quantize:
                layer = Int8Linear.from_linear(child)
            else:
                layer = Int8Linear(child.in_features, child.out_features, device=child.weight.device)
            setattr(module, name, layer)
        else:
            replace_linears(child, quantize=quantize)
