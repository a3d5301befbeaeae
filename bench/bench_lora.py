"""Per-row LoRA: what many different adapters in one batch cost the tick, what loading one costs, and how
much device memory one takes.

The same full batch (`SLOTS` live sessions, the same audio) is stepped by `services.dialogue.batcher.
Batcher` in nine variants, interleaved round by round in one run so drift hits them alike:
- `no_lora`: the plain LM (a worker with CHORUS_DIALOGUE_ADAPTER_MEMORY=0);
- per LoRA kernel (CHORUS_DIALOGUE_LORA_KERNEL: `per_adapter`, `grouped`):
  - `<kernel>/adapters_0`: the LoRA layers installed, no row with an adapter (the layers skip their branch);
  - `<kernel>/adapters_1` / `_4` / `_8`: rows spread over 1, 4 or 8 distinct adapters.
Reported: the median tick (CPU time of the stepping thread, one torch thread: the machine's other load
does not count) per variant and its ratio to `no_lora`; `faster_kernel`: the kernel with the lower median
tick summed over 1, 4 and 8 adapters (what CHORUS_DIALOGUE_LORA_KERNEL=auto picks on the CPU).
Adapter load time is read-check-copy of one file into a bank slot (`read_adapter` + `AdapterBank.load`),
median over the adapters; memory per adapter is its tensors at its rank and a bank slot at `max_rank`.

Defaults are the small generated checkpoint on the CPU, rank `CHORUS_BENCH_LORA_RANK` (64 = the small
LM's width); on a GPU the same code measures the published architecture (bench/gpu/).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chorus.devtools.lora_adapter import write_random_adapter
from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint
from services.dialogue.adapters import (
    NO_ADAPTER,
    AdapterBank,
    AdapterTensors,
    LoraKernel,
    layer_shapes,
    read_adapter,
)
from services.dialogue.batcher import Batcher
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.settings import DialogueSettings
from shared.audio import FRAME_SAMPLES

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"
SLOTS = 8
ROUNDS = int(os.environ.get("CHORUS_BENCH_LORA_ROUNDS", "5"))
TICKS = int(os.environ.get("CHORUS_BENCH_LORA_TICKS", "30"))  # measured, per variant and round
WARM_TICKS = 4
RANK = int(os.environ.get("CHORUS_BENCH_LORA_RANK", "64"))
THREADS = int(os.environ.get("CHORUS_BENCH_THREADS", "1"))
DISTINCT = (0, 1, 4, 8)
KERNELS: tuple[LoraKernel, ...] = ("per_adapter", "grouped")


def _ticks(model: MoshiModel, bank: AdapterBank | None, distinct: int, audio: np.ndarray) -> list[float]:
    """Seconds per tick of a full batch whose rows use `distinct` adapters (round robin)."""
    batcher = Batcher(model, SLOTS, adapters=bank)
    try:
        for row in range(SLOTS):
            batcher.join(f"s{row}", adapter_slot=row % distinct + 1 if distinct else NO_ADAPTER)
        times = []
        for tick in range(WARM_TICKS + TICKS):
            started = time.thread_time()  # CPU time of the stepping thread: other processes do not count
            batcher.step(audio[tick % len(audio)])
            if tick >= WARM_TICKS:
                times.append(time.thread_time() - started)
        return times
    finally:
        batcher.close()


def _adapters(model: MoshiModel, checkpoint: Path, folder: Path) -> tuple[list[AdapterTensors], list[float]]:
    """Eight random adapters read for the model, and the seconds each took to read, check and load."""
    shapes = layer_shapes(model.lm)
    dtype = next(model.lm.parameters()).dtype
    bank = AdapterBank(model.lm, SLOTS, SLOTS, RANK)
    loaded, seconds = [], []
    try:
        for n in range(SLOTS):
            data = write_random_adapter(
                folder / f"{n}.safetensors", checkpoint, rank=RANK, seed=n
            ).read_bytes()
            started = time.perf_counter()
            tensors = read_adapter(data, shapes, model.device, dtype)
            bank.load(n + 1, tensors)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            seconds.append(time.perf_counter() - started)
            loaded.append(tensors)
    finally:
        bank.remove()
    return loaded, seconds


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    checkpoint = write_moshi_checkpoint(CACHE / "moshi")
    model = load_moshi(DialogueSettings(moshi_dir=checkpoint, dialogue_device="auto"))
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal((16, SLOTS, FRAME_SAMPLES)) * 0.1).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        adapters, load_s = _adapters(model, checkpoint, Path(folder))
    variants = [f"{kernel}/adapters_{n}" for kernel in KERNELS for n in DISTINCT]
    times: dict[str, list[float]] = {"no_lora": [], **{name: [] for name in variants}}
    with torch.no_grad():
        for _ in range(ROUNDS):
            times["no_lora"] += _ticks(model, None, 0, audio)
            for kernel in KERNELS:
                bank = AdapterBank(model.lm, SLOTS, SLOTS, RANK, kernel=kernel)
                for slot, tensors in enumerate(adapters, start=1):
                    bank.load(slot, tensors)
                try:
                    for n in DISTINCT:
                        times[f"{kernel}/adapters_{n}"] += _ticks(model, bank, n, audio)
                finally:
                    bank.remove()
    base = statistics.median(times["no_lora"])
    ticks = {
        name: {
            "median_ms": round(statistics.median(t) * 1000, 3),
            "vs_no_lora": round(statistics.median(t) / base, 3),
        }
        for name, t in times.items()
    }
    with_adapters = {
        kernel: sum(statistics.median(times[f"{kernel}/adapters_{n}"]) for n in DISTINCT if n)
        for kernel in KERNELS
    }
    return {
        "device": str(model.device),
        "cpu": platform.processor() or platform.machine(),
        "threads": THREADS,
        "checkpoint": "small generated (tests' sizes)",
        "lm_dim": model.lm.dim,
        "slots": SLOTS,
        "rank": RANK,
        "ticks_per_variant": ROUNDS * TICKS,
        "tick": ticks,
        "faster_kernel": min(with_adapters, key=with_adapters.__getitem__),
        "adapter_load_ms_median": round(statistics.median(load_s) * 1000, 2),
        "adapter_bytes": adapters[0].nbytes,
        "bank_slot_bytes": AdapterBank.slot_bytes(model.lm, RANK),
    }
