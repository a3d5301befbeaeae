"""int8 weights and an int8 KV cache (services/dialogue/quantized.py): closeness, memory, step time.

On this machine's CPU (one torch thread), four variants of the LM: float, int8 weights, int8 KV cache,
both. For each:
- logits against the float model on the same inputs: the small checkpoint's LM streamed over the same
  random codes for `STEPS` steps (one step at a time, so the KV cache is what attention reads), text
  logits compared step by step: max abs difference, max abs relative to the float logits' largest, L2
  relative, and text-token agreement (the float model's argmax = the variant's argmax, over rows x steps);
  and, as a yardstick, bf16 against fp32 for the float model;
- memory: the LM's weight bytes, and the KV cache bytes of one session at the published 3000-step
  context, both from the published architecture (7B LM built on the meta device: no memory is taken)
  in bf16, as a GPU holds it; with those, the sessions that fit on an H100 (`H100_MIB` less `RESERVE_MIB`
  for Mimi, activations and the CUDA context);
- step time (CPU time of the stepping thread): the worker's `Batcher` on the small checkpoint, `SLOTS`
  sessions, `TICKS` ticks, in fp32 (the worker's CPU default) and bf16; one published-size linear
  layer (the feed-forward's input projection) at `ATTENTION_ROWS` rows, float vs int8; and one
  published-size attention layer's KV step (write one step, read the whole 3000-step cache, attend),
  ring cache vs int8 cache.

A CPU's step time says little about a GPU's; `bench/gpu/run.sh --weights int8 --kv-cache int8` measures
the same variants in the sessions-per-GPU sweep when a GPU is lent.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import RingKVCache
from moshi.utils.compile import no_compile

from chorus.devtools.moshi_checkpoint import published_architecture, write_moshi_checkpoint
from services.dialogue.batcher import Batcher
from services.dialogue.model import load_moshi
from services.dialogue.quantized import Int8KVCache, Int8Linear, LeanAttention, make_lean
from services.dialogue.settings import DialogueSettings
from shared.audio import FRAME_SAMPLES

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"
THREADS = int(os.environ.get("CHORUS_BENCH_THREADS", "1"))
VARIANTS: dict[str, tuple[bool, bool]] = {  # name -> (int8 weights, int8 KV cache)
    "float": (False, False),
    "int8_weights": (True, False),
    "int8_kv_cache": (False, True),
    "int8_both": (True, True),
}
STEPS = 64
ROWS = 4
SLOTS = 4
TICKS = 60
WARMUP_TICKS = 4
ATTENTION_ROWS = 4
ATTENTION_REPEATS = 5
H100_MIB = 81559  # torch's total_memory of an H100 80GB (SXM and PCIe)
RESERVE_MIB = 3 * 1024  # Mimi, activations, the CUDA context and allocator slack (the sweep measures it)


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    moshi_dir = write_moshi_checkpoint(CACHE / "moshi")
    return {
        "device": "cpu",
        "torch_threads": THREADS,
        "logits": {dtype: logits_by_variant(moshi_dir, dtype, seed=0) for dtype in ("float32", "bfloat16")},
        "bfloat16_against_float32": bfloat16_difference(moshi_dir, seed=0),
        "published_memory": published_memory(),
        "step_ms": {dtype: step_times(moshi_dir, dtype) for dtype in ("float32", "bfloat16")},
        "published_linear_ms": linear_times(),
        "published_attention_ms": attention_times(),
    }


# --- closeness ----------------------------------------------------------------------------------


def random_codes(lm: LMModel, rows: int, steps: int, seed: int) -> torch.Tensor:
    """[rows, codebooks, steps] token ids the LM accepts (text ids in the text card)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (rows, lm.num_codebooks, steps), generator=generator)
    codes[:, 0] %= lm.text_card
    return codes.to(next(lm.parameters()).device)


@torch.no_grad()
def streaming_text_logits(lm: LMModel, codes: torch.Tensor, *, compiled: bool = False) -> torch.Tensor:
    """The text logits of each step, the LM streamed one step at a time: [steps, rows, text card].
    Eager by default (moshi's lazy torch.compile off); `compiled` runs what a compiling worker runs (on
    a CPU the int8 cache's compiled read among it; on CUDA the Triton read either way)."""
    rows, _, steps = codes.shape
    logits = []
    with lm.streaming(rows), contextlib.nullcontext() if compiled else no_compile():
        for t in range(steps):
            _, text = lm.forward_text(codes[:, :, t : t + 1])
            logits.append(text[:, 0, 0].float())
    return torch.stack(logits)


def logits_difference(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    difference = (candidate - reference).abs()
    return {
        "max_abs": round(float(difference.max()), 5),
        "max_abs_relative": round(float(difference.max() / reference.abs().max()), 5),
        "l2_relative": round(float((candidate - reference).norm() / reference.norm()), 5),
        "text_token_agreement": round(
            float((candidate.argmax(-1) == reference.argmax(-1)).float().mean()), 4
        ),
    }


def logits_by_variant(moshi_dir: Path, dtype: str, *, seed: int) -> dict[str, Any]:
    """Each variant against the float model of the same dtype, on the same codes."""
    reference = load_moshi(_settings(moshi_dir, dtype, "float"))
    codes = random_codes(reference.lm, ROWS, STEPS, seed)
    expected = streaming_text_logits(reference.lm, codes)
    results: dict[str, Any] = {"inputs": f"{ROWS} rows x {STEPS} streamed steps of random codes"}
    for name, (int8_weights, int8_kv) in VARIANTS.items():
        if name == "float":
            continue
        model = load_moshi(_settings(moshi_dir, dtype, "int8" if int8_weights else "float", int8_kv))
        results[name] = logits_difference(expected, streaming_text_logits(model.lm, codes))
    return results


def bfloat16_difference(moshi_dir: Path, *, seed: int) -> dict[str, float]:
    """The yardstick: how far bf16 itself (what a GPU runs) is from fp32 on the same codes."""
    reference = load_moshi(_settings(moshi_dir, "float32", "float"))
    codes = random_codes(reference.lm, ROWS, STEPS, seed)
    bf16 = load_moshi(_settings(moshi_dir, "bfloat16", "float"))
    expected = streaming_text_logits(reference.lm, codes)
    return logits_difference(expected, streaming_text_logits(bf16.lm, codes))


def _settings(moshi_dir: Path, dtype: str, weights: str, int8_kv: bool = False) -> DialogueSettings:
    return DialogueSettings(
        moshi_dir=moshi_dir,
        dialogue_device="cpu",
        dialogue_dtype=dtype,  # type: ignore[arg-type]
        dialogue_weights=weights,  # type: ignore[arg-type]
        dialogue_kv_cache="int8" if int8_kv else "float",
    )


# --- memory -------------------------------------------------------------------------------------


def weight_bytes(lm: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*lm.parameters(), *lm.buffers()))


def kv_bytes_per_session(lm: torch.nn.Module) -> int:
    """The bytes of one session's KV caches (every attention layer, main transformer and depformer)."""
    total = 0
    with lm.streaming(1):  # type: ignore[operator]
        for module in lm.modules():
            if isinstance(module, LeanAttention):
                cache = module._streaming_state.kv_cache if module._streaming_state else None
                if cache is not None:
                    tensors = [cache.cache, getattr(cache, "scales", None), cache.end_offset]
                    total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def published_memory() -> dict[str, Any]:
    """Weights and per-session KV bytes of the published 7B LM in bf16 (meta device), and what fits.

    The int8 cache also costs, while a layer attends, its dequantized copy (one layer's keys and values
    in bf16, every row): counted a session (`transient_per_session_mib`), as the batch grows with it."""
    lm_config, _ = published_architecture(full=True)
    results: dict[str, Any] = {"context_steps": lm_config["context"], "h100_mib": H100_MIB}
    results["reserve_mib"] = RESERVE_MIB
    float_kv_mib = 0.0
    for name, (int8_weights, int8_kv) in VARIANTS.items():
        lm = LMModel(device="meta", dtype=torch.bfloat16, **lm_config)
        make_lean(lm, int8_weights=int8_weights, int8_kv=int8_kv, dtype=torch.bfloat16)
        weights_mib, kv_mib = weight_bytes(lm) / 2**20, kv_bytes_per_session(lm) / 2**20
        float_kv_mib = float_kv_mib or kv_mib  # the first variant is float
        transient_mib = float_kv_mib / lm_config["num_layers"] if int8_kv else 0.0
        results[name] = {
            "weights_gib": round(weights_mib / 1024, 2),
            "kv_per_session_gib": round(kv_mib / 1024, 3),
            "transient_per_session_mib": round(transient_mib, 1),
            "sessions_per_h100": int((H100_MIB - RESERVE_MIB - weights_mib) // (kv_mib + transient_mib)),
        }
    return results


# --- speed --------------------------------------------------------------------------------------


def step_times(moshi_dir: Path, dtype: str) -> dict[str, Any]:
    """The worker's Batcher, every slot busy, per variant: the stepping thread's CPU time a tick (p50,
    mean) and the ratio to float. The variants step in turn, tick by tick, so the load of a shared
    machine falls on all of them alike."""
    batchers: dict[str, Batcher] = {}
    for name, (int8_weights, int8_kv) in VARIANTS.items():
        model = load_moshi(_settings(moshi_dir, dtype, "int8" if int8_weights else "float", int8_kv))
        batchers[name] = Batcher(model, SLOTS)
        for row in range(SLOTS):
            batchers[name].join(f"bench-{row}")
    ticks: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rng = np.random.default_rng(0)
    try:
        for i in range(WARMUP_TICKS + TICKS):
            audio = (rng.standard_normal((SLOTS, FRAME_SAMPLES)) * 0.3).astype(np.float32)
            for name, batcher in batchers.items():
                started = time.thread_time()
                batcher.step(audio)
                if i >= WARMUP_TICKS:
                    ticks[name].append((time.thread_time() - started) * 1000)
    finally:
        for batcher in batchers.values():
            batcher.close()
    float_mean = statistics.fmean(ticks["float"])
    return {
        name: {
            "p50": round(statistics.median(values), 2),
            "mean": round(statistics.fmean(values), 2),
            "mean_ratio_to_float": round(statistics.fmean(values) / float_mean, 3),
        }
        for name, values in ticks.items()
    }


@torch.no_grad()
def linear_times() -> dict[str, Any]:
    """One published feed-forward input projection (4096 -> 2 x 11264) on `ATTENTION_ROWS` rows (one
    step of that many sessions): bf16 and fp32 weights against Int8Linear, median of `ATTENTION_REPEATS`."""
    lm_config, _ = published_architecture(full=True)
    dim = lm_config["dim"]
    hidden = 2 * (2 * round(dim * lm_config["hidden_scale"]) // 3)
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(dim, hidden, bias=False)
    torch.nn.init.normal_(linear.weight, std=dim**-0.5, generator=generator)
    x = torch.randn((ATTENTION_ROWS, 1, dim), generator=generator)
    layers = {
        "float32": (linear, x),
        "int8_float32": (Int8Linear.from_linear(linear), x),
        "bfloat16": (copy.deepcopy(linear).to(torch.bfloat16), x.to(torch.bfloat16)),
        "int8_bfloat16": (Int8Linear.from_linear(linear), x.to(torch.bfloat16)),
    }
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(ATTENTION_REPEATS):
        for name, (layer, inputs) in layers.items():
            started = time.thread_time()
            layer(inputs)
            times[name].append((time.thread_time() - started) * 1000)
    results: dict[str, Any] = {"rows": ATTENTION_ROWS, "shape": [dim, hidden]}
    results |= {name: round(statistics.median(values), 2) for name, values in times.items()}
    return results


@torch.no_grad()
def attention_times() -> dict[str, Any]:
    """One published attention layer's cache step (32 heads x 128, 3000 steps): write a step, read the
    whole cache, attend; bf16 ring cache vs int8 cache, median of `ATTENTION_REPEATS`."""
    lm_config, _ = published_architecture(full=True)
    heads, capacity = lm_config["num_heads"], lm_config["context"]
    dim = lm_config["dim"] // heads
    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn((ATTENTION_ROWS, heads, 1, dim), generator=generator, dtype=dtype) for _ in range(3)
    )
    every_row = torch.ones(ATTENTION_ROWS, dtype=torch.bool)
    caches: dict[str, RingKVCache] = {
        "bf16_ring": RingKVCache(
            ATTENTION_ROWS, heads, dim, capacity, device=torch.device("cpu"), dtype=dtype
        ),
        "int8": Int8KVCache(ATTENTION_ROWS, heads, dim, capacity, device=torch.device("cpu"), dtype=dtype),
    }
    times: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(ATTENTION_REPEATS):
        for name, cache in caches.items():
            started = time.thread_time()
            keys, values, _ = cache.complete(k, v, every_row)
            torch.nn.functional.scaled_dot_product_attention(q, keys, values)
            times[name].append((time.thread_time() - started) * 1000)
    results: dict[str, Any] = {"rows": ATTENTION_ROWS, "context_steps": capacity}
    results |= {name: round(statistics.median(values), 2) for name, values in times.items()}
    results["int8_ratio"] = round(results["int8"] / results["bf16_ring"], 3)
    return results
