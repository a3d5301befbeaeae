"""One attention step over a full KV cache, read every way Chorus can read it, timed alone.

`python -m bench.gpu_int8_attention [--rows 64 ...]` → `$OUT/int8_attention.json` when OUT is set (the
device tool's folder), else bench/results/int8_attention.json.

The sessions-per-GPU sweep (bench/gpu_sessions.py) times whole ticks, and found the LM step over the int8
cache slower than over a bf16 cache (docs/performance.md, "Sessions per GPU"). This isolates the one
operation in question, one layer's attention for one step of every row, at Moshi's
shape (32 heads of 128, a 3000-step ring, every position filled, as in a long session):
- `bf16_sdpa`: torch's attention over a bf16 cache with moshi's boolean mask (what a bf16 worker runs);
- `copy`: the int8 cache dequantized into a bf16 copy, then the same attention (the uncompiled read);
- `compiled`: `compiled_fused_int8_attention`, the worker's read where it compiles and Triton cannot run;
- `triton_b{block}_w{warps}`: `triton_int8_attention` at each `--blocks` x `--warps` tuning (the CUDA
  worker's read, at `TRITON_BLOCK_POSITIONS` and `TRITON_WARPS`).
Each is checked against float32 attention on the dequantized cache (relative L2: a wrong read is ~1,
bf16's rounding ~1e-2), then timed (CUDA events on a GPU, the wall clock on a CPU; median of `--repeats`
after warm-up), with the bandwidth it reached: the bytes it must read at least (the cache in its own
dtype, keys and values, with their scales) over its time. On a CPU the Triton kernel runs in Triton's
interpreter (TRITON_INTERPRET=1), which proves it runs and agrees, not its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from services.dialogue.int8_attention import compiled_fused_int8_attention, triton_int8_attention
from services.dialogue.quantized import INT8_MAX, quantize_rows

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "int8_attention.json"
Read = Callable[[], torch.Tensor]


def build(rows: int, heads: int, capacity: int, dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A full ring of random keys and values, in bf16 and quantized as Int8KVCache stores them."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (2, rows, heads, capacity, dim)
    kv = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    quantized, absmax = quantize_rows(kv)
    return {
        "q": torch.randn((rows, heads, 1, dim), generator=generator, device=device, dtype=torch.bfloat16),
        "kv": kv,
        "int8": quantized,
        "scales": (absmax / INT8_MAX).to(torch.bfloat16)[..., None],
        # moshi's mask: [B, 1, T, C], every position seen (a session past its first 4 minutes).
        "allowed": torch.ones((rows, 1, capacity), device=device, dtype=torch.bool),
    }


def reads(tensors: dict[str, torch.Tensor], blocks: list[int], warps: list[int]) -> dict[str, Read]:
    q, kv, cache, scales, allowed = (tensors[k] for k in ("q", "kv", "int8", "scales", "allowed"))
    mask = allowed[:, None]

    def copy() -> torch.Tensor:
        keys, values = cache * scales
        return F.scaled_dot_product_attention(q, keys, values, mask)

    variants: dict[str, Read] = {
        "bf16_sdpa": lambda: F.scaled_dot_product_attention(q, kv[0], kv[1], mask),
        "copy": copy,
        "compiled": lambda: compiled_fused_int8_attention(q, cache, scales, allowed),
    }
    for block in blocks:
        for warp in warps:
            variants[f"triton_b{block}_w{warp}"] = lambda b=block, w=warp: triton_int8_attention(
                q, cache, scales, allowed, block=b, warps=w
            )
    return variants


def minimum_bytes(name: str, tensors: dict[str, torch.Tensor]) -> int:
    """What a read must load at least: the cache in the dtype it reads it in (scales included)."""
    if name == "bf16_sdpa":
        return tensors["kv"].numel() * tensors["kv"].element_size()
    return sum(tensors[k].numel() * tensors[k].element_size() for k in ("int8", "scales"))


def time_ms(read: Read, device: torch.device, repeats: int) -> list[float]:
    for _ in range(3):  # warm-up: compiles, autotunes, caches
        read()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            read()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            read()
            times.append((time.perf_counter() - started) * 1000)
    return times


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensors = build(args.rows, args.heads, args.capacity, args.dim, device)
    keys, values = (tensors["int8"] * tensors["scales"]).float()
    reference = F.scaled_dot_product_attention(
        tensors["q"].float(), keys, values, tensors["allowed"][:, None]
    )
    results: dict[str, Any] = {
        "benchmark": "gpu_int8_attention",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {"rows": args.rows, "heads": args.heads, "capacity": args.capacity, "dim": args.dim},
        "repeats": args.repeats,
        "reads": {},
    }
    for name, read in reads(tensors, args.blocks, args.warps).items():
        try:
            out = read().float()
            error = float((out - reference).norm() / reference.norm())
            times = time_ms(read, device, args.repeats)
        except Exception as exc:  # recorded: one read failing leaves the others to measure
            results["reads"][name] = {"outcome": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{name:>18}: error {results['reads'][name]['error']}", flush=True)
            continue
        median = statistics.median(times)
        gbps = minimum_bytes(name, tensors) / (median / 1000) / 1e9
        results["reads"][name] = {
            "outcome": "measured",
            "l2_relative_to_fp32": round(error, 5),
            "ms_p50": round(median, 3),
            "ms_min": round(min(times), 3),
            "min_bytes_gb": round(minimum_bytes(name, tensors) / 1e9, 3),
            "gb_per_s": round(gbps, 1),
        }
        print(f"{name:>18}: {median:9.3f} ms p50, {gbps:8.1f} GB/s, L2 {error:.2e} against fp32", flush=True)
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_int8_attention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=64, help="sessions (rows of the batch)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--capacity", type=int, default=3000, help="ring positions (Moshi's context)")
    parser.add_argument("--dim", type=int, default=128, help="head size")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--blocks",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[32, 64, 128],
        help="the Triton kernel's positions a loop turn, comma-separated (default 32,64,128)",
    )
    parser.add_argument(
        "--warps",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[4, 8],
        help="the Triton kernel's warps, comma-separated (default 4,8)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results JSON (default $OUT/int8_attention.json, else {DEFAULT_OUT})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device_out = os.environ.get("OUT")  # the device tool's folder: what is written there comes back
    out = args.out or (Path(device_out) / "int8_attention.json" if device_out else DEFAULT_OUT)
    results = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
