"""Dialogue worker throughput: per-tick latency and real-time sessions per worker as slots grow.

For each model size, in the same run on the same machine:
- baseline: moshi's own one-session loop (`mimi.encode` -> `lm_gen.step` -> `mimi.decode` at batch 1,
  as moshi/server.py runs it), frames per second;
- batched: the worker's `Batcher` with every slot live, for 1, 2, 4, 8, ... slots until the median
  tick exceeds 80 ms (one Mimi frame: past it, a worker cannot keep even one batch real-time), and
  at least up to 4 slots, so the batching gain shows even where one session is already too slow.
A slot count is real-time when its p99 tick is at most 80 ms. Throughput is session-frames per second
(slots / mean tick); the ratio compares the best batched throughput with the baseline's.

Sizes: the small test checkpoint, and the published Mimi (79M) with the small LM. The full 7B LM is
measured on a GPU only, by `bench/gpu_sessions.py` (`bench/gpu/run.sh`); on a CPU it is far from real
time. Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint
from services.dialogue.batcher import Batcher
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.settings import DialogueSettings
from shared.audio import FRAME_SAMPLES, FRAME_SEC

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"
SIZES = {
    "small": {"directory": "moshi", "full_size_mimi": False},
    "published-mimi+small-lm": {"directory": "moshi-published-mimi", "full_size_mimi": True},
}
WARMUP_TICKS = 5
TICKS = 100
MAX_SLOTS = 64
MIN_SLOTS = 4  # measured even past real time, so the batching gain shows where one session is too slow
# One thread by default: on a small shared machine more threads than free cores turn OpenMP waits into
# multi-second stalls that measure the neighbours, not the worker. CHORUS_BENCH_THREADS overrides it.
THREADS = int(os.environ.get("CHORUS_BENCH_THREADS", "1"))


def _voice(rng: np.random.Generator, rows: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return (rng.standard_normal((rows, FRAME_SAMPLES)) * 0.3).astype(np.float32)


def _summary(ticks_s: list[float], sessions: int) -> dict[str, float]:
    ms = sorted(t * 1000 for t in ticks_s)
    mean_s = statistics.fmean(ticks_s)
    return {
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 2),
        "mean_ms": round(mean_s * 1000, 2),
        "session_frames_per_s": round(sessions / mean_s, 1),
    }


@torch.no_grad()
def one_session_loop(model: MoshiModel) -> dict[str, float]:
    """moshi's server loop for its single connection, at batch 1."""
    from moshi.models import LMGen
    from moshi.utils.compile import no_compile

    rng = np.random.default_rng(0)
    gen = LMGen(model.lm, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    ticks: list[float] = []
    with model.mimi.streaming(1), gen.streaming(1), no_compile():
        for i in range(WARMUP_TICKS + TICKS):
            pcm = torch.from_numpy(_voice(rng, 1))[:, None].to(model.device)
            started = time.perf_counter()
            tokens = gen.step(model.mimi.encode(pcm))
            if tokens is not None:
                model.mimi.decode(tokens[:, 1:]).cpu()
            if i >= WARMUP_TICKS:
                ticks.append(time.perf_counter() - started)
    return _summary(ticks, 1)


def batched(model: MoshiModel, slots: int) -> dict[str, float]:
    rng = np.random.default_rng(slots)
    batcher = Batcher(model, slots)
    try:
        batcher.warmup()
        for row in range(slots):
            batcher.join(f"s{row}")
        ticks: list[float] = []
        for i in range(WARMUP_TICKS + TICKS):
            audio = _voice(rng, slots)
            started = time.perf_counter()
            batcher.step(audio)
            if i >= WARMUP_TICKS:
                ticks.append(time.perf_counter() - started)
    finally:
        batcher.close()
    return {"slots": slots, **_summary(ticks, slots)}


def measure(model: MoshiModel) -> dict[str, Any]:
    budget_ms = FRAME_SEC * 1000
    baseline = one_session_loop(model)
    points: list[dict[str, float]] = []
    slots = 1
    while slots <= MAX_SLOTS:
        point = batched(model, slots)
        points.append(point)
        print(f"   {slots:3d} slots: p50 {point['p50_ms']} ms, p99 {point['p99_ms']} ms", flush=True)
        if point["p50_ms"] > budget_ms and slots >= MIN_SLOTS:
            break
        slots *= 2
    realtime = [p for p in points if p["p99_ms"] <= budget_ms]
    best = max(realtime or points, key=lambda p: p["session_frames_per_s"])
    return {
        "baseline_one_session_loop": baseline,
        "batched": points,
        "realtime_sessions_per_worker": int(max((p["slots"] for p in realtime), default=0)),
        "best_batched": best,
        "throughput_ratio_vs_baseline": round(
            best["session_frames_per_s"] / baseline["session_frames_per_s"], 2
        ),
    }


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    results: dict[str, Any] = {
        "machine": {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # a shared machine is noisy
        },
        "tick_budget_ms": FRAME_SEC * 1000,
        "ticks_per_point": TICKS,
        "sizes": {},
    }
    for name, spec in SIZES.items():
        directory = write_moshi_checkpoint(
            CACHE / str(spec["directory"]), full_size_mimi=bool(spec["full_size_mimi"])
        )
        model = load_moshi(DialogueSettings(moshi_dir=directory))
        print(f"  {name}", flush=True)
        results["sizes"][name] = measure(model)
    return results
