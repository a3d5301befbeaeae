"""Real-time Moshi sessions per GPU: the dialogue worker's `Batcher` swept over slot counts.

`python -m bench.gpu_sessions` (or `bench/gpu/run.sh`, which first installs the wheelhouse on a machine
that has only torch). What it measures, in one run on one device:

- the production configuration: the worker's own settings (`DialogueSettings` from the environment:
  device, dtype, torch.compile as the worker decides it; moshi's CUDA graphs are on for cuda unless
  NO_CUDA_GRAPH is set, exactly as in the worker; the heap frozen after the batcher's warm-up, as the
  worker freezes it);
- at full size (the default on cuda) the published 7B LM and Mimi built in place on the device with
  random weights (`build_random_moshi`); `--size small` is the test checkpoint (the CPU proof);
- baseline: moshi's own batch-1 loop (`mimi.encode` -> `LMGen.step` -> `mimi.decode`, as moshi's server
  runs its one connection), same ticks;
- per slot count (`--slots`): every row busy, sessions leaving and joining at `--session-s` mean length
  (exponential lifetimes, a leaving session's row taken at once by a new one with a `--primer-tokens`
  persona primer): join ticks count in the percentiles. `--ticks` measured ticks after `--warmup-ticks`.
  Tick p50 / p99 / max, the split encode / LM / decode (CUDA events on GPU, perf_counter on CPU), peak
  memory; a point is real-time when its p99 tick is at most 80 ms;
- the sweep stops at the first point that runs out of memory (its outcome is recorded), or before a
  point that would end past `--budget-s`; the results file is rewritten after every point, so a sweep
  cut short (a device command's time limit) keeps what it measured.

`--max-memory-mib` caps the memory the process may take: on cuda through the caching allocator's
per-process fraction, on cpu through RLIMIT_DATA (the kernel refuses the allocation). Either way the
refusal is a real allocation failure. `--weights int8` and `--kv-cache int8` (default: the worker's
CHORUS_DIALOGUE_WEIGHTS / CHORUS_DIALOGUE_KV_CACHE) make the LM lean as the worker would
(services/dialogue/quantized.py: int8 linear layers, an int8 KV cache; torch alone), after the text
logits of the float LM have been taken on random codes, streamed step by step: the results report the
lean LM's difference from them on the same codes (`int8_logits`) and the weights' memory after.
`--context` (default: the worker's CHORUS_DIALOGUE_CONTEXT, else the checkpoint's 3000 frames) sets the
LM's attention context as the worker does (`set_context`): each session's KV cache is that long.

`--adapters 0,1,4,8 --adapter-rank 128` (issue 16's target: at most 15 % extra for 8 distinct rank-128
adapters) measures, before the slot sweep, one full batch of `--adapter-batch` steady sessions stepped by
the worker's `Batcher` with no LoRA, then with the worker's per-row LoRA layers (`AdapterBank`, one slot
per distinct adapter, random adapters of that rank for every linear layer) and the rows spread round robin
over 0, 1, 4, 8 distinct adapters (switched between ticks as a mid-session `update` does), once per LoRA
kernel of `--lora-kernels` (default all: `per_adapter`, `grouped`, and `grouped_graphs` = the grouped
kernel with CHORUS_DIALOGUE_LORA_GRAPHS, LMGen's CUDA graphs kept on with adapters), then with no LoRA
again: `adapters` in the results holds each variant's tick percentiles and its ratio to no LoRA, per
kernel under `kernels` (`variants`: no LoRA and the per_adapter kernel, as before the grouped one),
rewritten after each variant: a cut run keeps those measured.
`--slots ''` and `--baseline-ticks 0` leave the rest out (the device budget).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chorus.devtools.moshi_checkpoint import TOKENIZER_NAME, published_architecture, write_moshi_checkpoint
from services.dialogue.adapters import NO_ADAPTER, AdapterBank, AdapterTensors, LoraKernel, linear_layers
from services.dialogue.batcher import Batcher
from services.dialogue.int8_attention import TRITON_BLOCK_POSITIONS, TRITON_WARPS
from services.dialogue.model import (
    MoshiModel,
    build_random_moshi,
    load_moshi,
    resolve_device,
    resolve_dtype,
    set_context,
)
from services.dialogue.quantized import INT8_READS, Int8Read
from services.dialogue.settings import DialogueSettings
from shared.audio import FRAME_SAMPLES, FRAME_SEC

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "checkpoints"
DEFAULT_OUT = ROOT / "bench" / "results" / "dialogue_gpu.json"
DEFAULT_SLOTS = "8,16,24,32,40,48,64,80,96,128"
BUDGET_MS = FRAME_SEC * 1000
LOGIT_ROWS, LOGIT_STEPS = 2, 32  # the lean LM's logits against the float LM's
PROFILE_TOP = 15  # operators and kernels a profile keeps
STAGES = ("encode", "lm", "decode")
# The tick's wall time less the three stages: resets of joining rows, copies, host bookkeeping, waits.
OTHER = "other"


def _voice(rng: np.random.Generator, rows: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return (rng.standard_normal((rows, FRAME_SAMPLES)) * 0.3).astype(np.float32)


def _percentiles(values_ms: list[float]) -> dict[str, float] | None:
    if not values_ms:
        return None
    ordered = sorted(values_ms)
    return {
        "p50": round(ordered[len(ordered) // 2], 2),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2),
        "max": round(ordered[-1], 2),
        "mean": round(sum(ordered) / len(ordered), 2),
    }


# --- timing -----------------------------------------------------------------------------------


class StageClock:
    """Times encode / LM step / decode inside a tick by wrapping the model objects' methods.

    On cuda each call is bracketed by CUDA events (read after the tick's synchronisation), on cpu by
    perf_counter. A stage the tick did not call through these methods reads as absent.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []
        self._undo: list[tuple[object, str]] = []
        self.samples: dict[str, list[float]] = {stage: [] for stage in (*STAGES, OTHER)}

    def wrap(self, owner: object, method: str, stage: str) -> None:
        original: Callable[..., Any] = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = self._mark()
            result = original(*args, **kwargs)
            self._pending.append((stage, started, self._mark()))
            return result

        setattr(owner, method, timed)
        self._undo.append((owner, method))

    def _mark(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def discard(self) -> None:
        self._pending.clear()

    def end_tick(self, tick_ms: float) -> None:
        """After the tick has synchronised: add this tick's time per stage, and what the rest took."""
        spent: dict[str, float] = {}
        for stage, started, ended in self._pending:
            ms = started.elapsed_time(ended) if self._cuda else (ended - started) * 1000
            spent[stage] = spent.get(stage, 0.0) + ms
        self._pending.clear()
        for stage, ms in spent.items():
            self.samples[stage].append(ms)
        self.samples[OTHER].append(max(0.0, tick_ms - sum(spent.values())))

    def summary(self) -> dict[str, dict[str, float] | None]:
        return {stage: _percentiles(self.samples[stage]) for stage in (*STAGES, OTHER)}

    def close(self) -> None:
        for owner, method in reversed(self._undo):
            delattr(owner, method)  # the instance attribute goes: the class's method shows again
        self._undo.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    # The process's peak resident memory (KiB on Linux): monotonic over the run.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _held_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 1)
    pages = int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1])  # resident
    return round(pages * resource.getpagesize() / 2**20, 1)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (cuda), the cpu allocator's refusal, or Python's own (RLIMIT_DATA)."""
    oom = (torch.OutOfMemoryError, MemoryError)
    return isinstance(exc, oom) or "can't allocate memory" in str(exc)


def limit_memory(device: torch.device, max_mib: int) -> None:
    """Refuse allocations past `max_mib` more than the process holds now (cpu) or in all (cuda)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_mib * 2**20 / total), device)
        return
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    data_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmData:"))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, ((data_kib * 1024) + max_mib * 2**20, hard))


# --- the run ------------------------------------------------------------------------------------


# The LoRA kernels a sweep compares: CHORUS_DIALOGUE_LORA_KERNEL, and the grouped one with
# CHORUS_DIALOGUE_LORA_GRAPHS (a graph-safe bank: LMGen's CUDA graphs stay on with adapters).
LORA_KERNELS: dict[str, tuple[LoraKernel, bool]] = {
    "per_adapter": ("per_adapter", False),
    "grouped": ("grouped", False),
    "grouped_graphs": ("grouped", True),
}


@dataclass
class Config:
    size: str
    slots: list[int]
    ticks: int
    warmup_ticks: int
    baseline_ticks: int
    session_s: float
    primer_tokens: int
    max_memory_mib: int | None
    weights: str  # float | int8
    kv_cache: str  # float | int8
    out: Path
    budget_s: float | None = None
    adapters: list[int] = field(default_factory=list)  # distinct adapter counts to measure (none: skip)
    adapter_rank: int = 128
    adapter_batch: int = 8
    adapter_ticks: int = 0  # measured ticks per variant
    profile_ticks: int = 0  # ticks a point run under torch.profiler after the measured ones (none: skip)
    kv_read: Int8Read = "auto"  # how an int8 cache is read (LeanAttention.int8_read)
    lora_kernels: list[str] = field(default_factory=lambda: list(LORA_KERNELS))
    seed: int = 0
    compile: bool = False
    settings: DialogueSettings = field(default_factory=DialogueSettings)


def compile_setting(settings: DialogueSettings, device: torch.device) -> bool:
    """What the worker passes to its Batcher (services/dialogue/serving.py): unset = on for cuda."""
    return device.type == "cuda" if settings.dialogue_compile is None else settings.dialogue_compile


def cuda_graphs_on(device: torch.device) -> bool:
    from moshi.utils.compile import _is_cuda_graph_enabled

    return device.type == "cuda" and _is_cuda_graph_enabled()


@torch.no_grad()
def baseline_loop(model: MoshiModel, config: Config) -> dict[str, Any]:
    """moshi's server loop for its one connection, at batch 1, compiled as the worker would be."""
    from moshi.models import LMGen
    from moshi.utils.compile import no_compile

    device = model.device
    rng = np.random.default_rng(config.seed)
    gen = LMGen(model.lm, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    clock = StageClock(device)
    clock.wrap(model.mimi, "encode", "encode")
    clock.wrap(gen, "step", "lm")
    clock.wrap(model.mimi, "decode", "decode")
    ticks: list[float] = []
    _reset_peak(device)
    compiled = contextlib.nullcontext() if config.compile else no_compile()
    try:
        with model.mimi.streaming(1), gen.streaming(1), compiled:
            for i in range(config.warmup_ticks + config.baseline_ticks):
                pcm = torch.from_numpy(_voice(rng, 1))[:, None].to(device)
                started = time.perf_counter()
                tokens = gen.step(model.mimi.encode(pcm))
                if tokens is not None:
                    model.mimi.decode(tokens[:, 1:]).cpu()
                _sync(device)
                if i >= config.warmup_ticks:
                    ticks.append((time.perf_counter() - started) * 1000)
                    clock.end_tick(ticks[-1])
                else:
                    clock.discard()
    finally:
        clock.close()
    tick = _percentiles(ticks)
    assert tick is not None
    return {
        "ticks": len(ticks),
        "tick_ms": tick,
        "stages_ms": clock.summary(),
        "peak_memory_mib": _peak_memory_mib(device),
        "realtime": tick["p99"] <= BUDGET_MS,
        "session_frames_per_s": round(1000 / tick["mean"], 1),
    }


class Churn:
    """Every row busy; sessions end after exponential lifetimes and a new one takes the row at once."""

    def __init__(self, batcher: Batcher, config: Config, rng: np.random.Generator) -> None:
        self.batcher = batcher
        self.rng = rng
        self.mean_ticks = config.session_s / FRAME_SEC
        text_card = batcher.model.lm.text_card
        self.primer = [int(t) for t in rng.integers(4, text_card, config.primer_tokens)]
        self.ends: dict[int, int] = {}
        self.started = 0
        for _ in range(batcher.batch_size):
            self._join(now=0)

    def _join(self, now: int) -> None:
        row = self.batcher.join(f"bench-{self.started}", self.primer)
        self.started += 1
        self.ends[row] = now + max(1, round(self.rng.exponential(self.mean_ticks)))

    def turn(self, now: int) -> int:
        """Sessions due to end leave and as many join; returns how many joined this tick."""
        due = [row for row, end in self.ends.items() if end <= now]
        for row in due:
            self.batcher.leave(row)
            del self.ends[row]
        for _ in due:
            self._join(now)
        return len(due)


@torch.no_grad()
def sessions_point(model: MoshiModel, slots: int, config: Config) -> dict[str, Any]:
    device = model.device
    rng = np.random.default_rng(config.seed + slots)
    settings = config.settings
    _reset_peak(device)
    batcher = Batcher(
        model,
        slots,
        audio_temperature=settings.dialogue_audio_temperature,
        audio_top_k=settings.dialogue_audio_top_k,
        compile=config.compile,
    )
    clock = StageClock(device)
    ticks: list[float] = []
    join_ticks: list[float] = []
    try:
        batcher.warmup()
        # As the worker does after its warm-up (services/dialogue/serving.py): what is alive now (the
        # model, its graphs) leaves the collector's sight, so a tick's collections walk only the tick's.
        gc.collect()
        gc.freeze()
        churn = Churn(batcher, config, rng)
        clock.wrap(model.mimi, "encode", "encode")
        clock.wrap(batcher.gen, "step", "lm")
        clock.wrap(model.mimi, "decode", "decode")
        for i in range(config.warmup_ticks + config.ticks):
            measured = i >= config.warmup_ticks
            joined = churn.turn(i)
            audio = _voice(rng, slots)
            started = time.perf_counter()
            batcher.step(audio)
            _sync(device)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if not measured:
                clock.discard()
                continue
            clock.end_tick(elapsed_ms)
            ticks.append(elapsed_ms)
            if joined:
                join_ticks.append(elapsed_ms)
        profile = profile_ticks(batcher, clock, rng, config.profile_ticks) if config.profile_ticks else None
    finally:
        gc.unfreeze()  # this point's batcher can be collected once it is gone
        clock.close()
        batcher.close()
    tick = _percentiles(ticks)
    assert tick is not None
    return {
        "slots": slots,
        "outcome": "measured",
        "ticks": len(ticks),
        "sessions_started": churn.started,
        "join_ticks": len(join_ticks),
        "tick_ms": tick,
        "join_tick_ms": _percentiles(join_ticks),
        "stages_ms": clock.summary(),
        "peak_memory_mib": _peak_memory_mib(device),
        "realtime": tick["p99"] <= BUDGET_MS,
        "session_frames_per_s": round(slots * 1000 / tick["mean"], 1),
        **({"profile": profile} if profile else {}),
    }


def profile_ticks(
    batcher: Batcher, clock: StageClock, rng: np.random.Generator, ticks: int
) -> dict[str, Any]:
    """`ticks` more steady ticks under torch.profiler, after the measured ones (so they do not count):
    the operators and kernels that took the most device time (CUDA) or CPU time, per tick. Where the
    LM step's time goes, which the encode / LM / decode split cannot say."""
    from torch.profiler import ProfilerActivity, profile

    cuda = batcher.model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(ticks):
            batcher.step(_voice(rng, batcher.batch_size))
            _sync(batcher.model.device)
            clock.discard()
    events = profiler.key_averages()

    def own_us(event: Any) -> float:
        return float(event.self_device_time_total if cuda else event.self_cpu_time_total)

    total_us = sum(own_us(e) for e in events)
    top = sorted(events, key=own_us, reverse=True)[:PROFILE_TOP]
    return {
        "ticks": ticks,
        "time": "device" if cuda else "cpu",
        "ms_per_tick": round(total_us / ticks / 1000, 2),
        "top": [
            {
                "name": e.key[:120],
                "calls_per_tick": round(e.count / ticks, 1),
                "ms_per_tick": round(own_us(e) / ticks / 1000, 3),
                "share": round(own_us(e) / total_us, 3) if total_us else 0.0,
            }
            for e in top
        ],
    }


# --- per-row LoRA: distinct adapters in one batch against no LoRA ------------------------------------


def random_adapter(lm: torch.nn.Module, rank: int, seed: int) -> AdapterTensors:
    """An adapter of `rank` for every linear layer, made on the LM's device (no file: the full-size LM
    has no checkpoint either). Its values only keep the activations finite: the tick does not read them."""
    weight = next(lm.parameters())
    generator = torch.Generator(device=weight.device).manual_seed(seed)

    def small(*shape: int) -> torch.Tensor:
        values = torch.randn(shape, generator=generator, device=weight.device, dtype=torch.float32)
        return (values * 0.01).to(weight.dtype)

    layers = {
        name: (small(rank, layer.in_features), small(layer.out_features, rank))
        for name, layer in linear_layers(lm)
    }
    return AdapterTensors(rank, layers)


def _steady_ticks(batcher: Batcher, config: Config, audio: list[np.ndarray[Any, Any]]) -> list[float]:
    """Milliseconds per tick of the batcher's full batch, after `--warmup-ticks` unmeasured ones."""
    device = batcher.model.device
    ticks = []
    for i in range(config.warmup_ticks + config.adapter_ticks):
        started = time.perf_counter()
        batcher.step(audio[i % len(audio)])
        _sync(device)
        if i >= config.warmup_ticks:
            ticks.append((time.perf_counter() - started) * 1000)
    return ticks


def _full_batcher(model: MoshiModel, config: Config, bank: AdapterBank | None) -> tuple[Batcher, list[int]]:
    settings = config.settings
    batcher = Batcher(
        model,
        config.adapter_batch,
        audio_temperature=settings.dialogue_audio_temperature,
        audio_top_k=settings.dialogue_audio_top_k,
        compile=config.compile,
        adapters=bank,
    )
    batcher.warmup()
    return batcher, [batcher.join(f"lora-{n}") for n in range(config.adapter_batch)]


def _plain_ticks(model: MoshiModel, config: Config, audio: list[np.ndarray[Any, Any]]) -> list[float]:
    batcher, _ = _full_batcher(model, config, None)
    try:
        return _steady_ticks(batcher, config, audio)
    finally:
        batcher.close()


@dataclass
class AdapterFigures:
    """The adapters point as it is measured: `result()` at any moment is what it has so far (the JSON is
    rewritten after each variant, so a command cut at its time limit keeps them)."""

    batch: int
    rank: int
    ticks_per_variant: int
    linear_layers: int
    bank_slot_mib: float
    plain: list[float] = field(default_factory=list)  # no LoRA, before and after the variants
    kernels: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kernel -> variant -> ticks
    load_ms: list[float] = field(default_factory=list)
    peak_memory_mib: float | None = None

    def result(self, outcome: str, error: str | None = None) -> dict[str, Any]:
        base = _percentiles(self.plain)
        measured: dict[str, Any] = {}
        kernels: dict[str, dict[str, Any]] = {}
        if base is not None:
            measured["no_lora"] = {"tick_ms": base, "vs_no_lora": 1.0}
            for kernel, variants in self.kernels.items():
                kernels[kernel] = {}
                for name, ticks in variants.items():
                    tick = _percentiles(ticks)
                    assert tick is not None
                    kernels[kernel][name] = {
                        "tick_ms": tick,
                        "vs_no_lora": round(tick["p50"] / base["p50"], 3),
                    }
            measured |= kernels.get("per_adapter", {})
        loads = sorted(self.load_ms)
        return {
            "outcome": outcome,
            **({"error": error} if error else {}),
            "batch": self.batch,
            "rank": self.rank,
            "ticks_per_variant": self.ticks_per_variant,
            "linear_layers": self.linear_layers,
            "bank_slot_mib": self.bank_slot_mib,
            "adapter_load_ms_median": round(loads[len(loads) // 2], 2) if loads else None,
            "peak_memory_mib": self.peak_memory_mib,
            "variants": measured,
            "kernels": kernels,
        }


@torch.no_grad()
def measure_adapter_variants(
    model: MoshiModel, config: Config, figures: AdapterFigures, progress: Callable[[], None]
) -> None:
    """The tick with the batch's rows over 0, 1, 4, 8... distinct adapters against no LoRA (measured
    before and after them, so drift shows), in one run; `progress()` after each variant."""
    device = model.device
    rng = np.random.default_rng(config.seed)
    audio = [_voice(rng, config.adapter_batch) for _ in range(16)]
    _reset_peak(device)
    figures.plain += _plain_ticks(model, config, audio)
    progress()
    for label in config.lora_kernels:
        figures.kernels[label] = {}
        _kernel_variants(model, config, label, audio, figures, progress)
    figures.plain += _plain_ticks(model, config, audio)


def _kernel_variants(
    model: MoshiModel,
    config: Config,
    label: str,
    audio: list[np.ndarray[Any, Any]],
    figures: AdapterFigures,
    progress: Callable[[], None],
) -> None:
    """The distinct-adapter variants with one LoRA kernel: its own bank (loaded, timed) and batcher (warmed
    up with the bank installed, so a graph-safe bank is in the captured graphs)."""
    device = model.device
    kernel, static = LORA_KERNELS[label]
    distinct_max = max(*config.adapters, 1)
    bank = AdapterBank(
        model.lm, config.adapter_batch, distinct_max, config.adapter_rank, kernel=kernel, static=static
    )
    try:
        for slot in range(1, distinct_max + 1):
            started = time.perf_counter()
            bank.load(slot, random_adapter(model.lm, config.adapter_rank, config.seed + slot))
            _sync(device)
            figures.load_ms.append((time.perf_counter() - started) * 1000)
        batcher, rows = _full_batcher(model, config, bank)
        try:
            for distinct in config.adapters:
                for n, row in enumerate(rows):  # round robin: with 4, an adapter's rows are not contiguous
                    batcher.set_adapter(row, n % distinct + 1 if distinct else NO_ADAPTER)
                figures.kernels[label][f"adapters_{distinct}"] = _steady_ticks(batcher, config, audio)
                figures.peak_memory_mib = _peak_memory_mib(device)
                progress()
        finally:
            batcher.close()
    finally:
        bank.remove()


def measure_adapters(model: MoshiModel, config: Config, results: dict[str, Any]) -> None:
    """`results["adapters"]`, rewritten after each variant; a failure is recorded with what it measured."""
    figures = AdapterFigures(
        batch=config.adapter_batch,
        rank=config.adapter_rank,
        ticks_per_variant=config.adapter_ticks,
        linear_layers=len(list(linear_layers(model.lm))),
        bank_slot_mib=round(AdapterBank.slot_bytes(model.lm, config.adapter_rank) / 2**20, 1),
    )

    def progress() -> None:
        results["adapters"] = figures.result("partial")
        _write(results, config.out)

    try:
        measure_adapter_variants(model, config, figures, progress)
    except Exception as exc:  # recorded with what it measured; the sweep still runs
        traceback.print_exc()
        outcome = "out_of_memory" if is_out_of_memory(exc) else "error"
        results["adapters"] = figures.result(outcome, _first_line(exc))
        return
    finally:
        gc.collect()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    results["adapters"] = point = figures.result("measured")
    for kernel, variants in point["kernels"].items():
        ratios = ", ".join(f"{name} {v['vs_no_lora']}" for name, v in variants.items())
        print(
            f"adapters at batch {figures.batch}, rank {figures.rank}, {kernel}: p50 vs no LoRA: {ratios}",
            flush=True,
        )


def build_model(config: Config) -> MoshiModel:
    settings = config.settings
    small = write_moshi_checkpoint(CACHE / "moshi")  # the CPU path, and the text tokenizer of both
    if config.size == "small":
        # Float: the sweep makes it lean itself, after taking the float LM's logits (make_lean_measured).
        update = {"moshi_dir": small, "dialogue_weights": "float", "dialogue_kv_cache": "float"}
        return load_moshi(settings.model_copy(update=update))
    device = resolve_device(settings.dialogue_device)
    lm_config, mimi_config = published_architecture(full=True)
    dtype = resolve_dtype(settings.dialogue_dtype, device)
    model = build_random_moshi(
        lm_config, mimi_config, small / TOKENIZER_NAME, device, dtype, seed=config.seed
    )
    set_context(model.lm, settings.dialogue_context)  # as load_moshi does
    return model


@torch.no_grad()
def make_lean_measured(model: MoshiModel, config: Config) -> dict[str, Any]:
    """The LM made lean in place (int8 weights and/or KV cache, as `config` asks), with its text logits'
    difference from the float LM's on the same random codes, streamed step by step (the KV cache read)."""
    from bench.bench_quant import logits_difference, random_codes, streaming_text_logits
    from services.dialogue.quantized import int8_read_of, make_lean, set_int8_read

    lm = model.lm
    codes = random_codes(lm, LOGIT_ROWS, LOGIT_STEPS, config.seed)
    reference = streaming_text_logits(lm, codes)
    dtype = next(p for p in lm.parameters() if p.is_floating_point()).dtype
    make_lean(lm, int8_weights=config.weights == "int8", int8_kv=config.kv_cache == "int8", dtype=dtype)
    set_int8_read(lm, config.kv_read)
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    # The lean LM as the worker runs it: compiled where the worker compiles, eager otherwise; an int8
    # cache read as `read` says (quantized.resolve_int8_read: the Triton kernel on CUDA).
    lean = streaming_text_logits(lm, codes, compiled=config.compile)
    read = int8_read_of(lm, compiling=config.compile)
    inputs = f"{LOGIT_ROWS} rows x {LOGIT_STEPS} streamed steps of random codes, text logits"
    result = {"inputs": inputs, "weights": config.weights, "kv_cache": config.kv_cache, "kv_read": read}
    result |= logits_difference(reference, lean)
    if read in ("compiled", "triton"):
        # The cache read in place against the same lean LM reading it through the dequantized copy.
        set_int8_read(lm, "copy")
        copy = streaming_text_logits(lm, codes)
        set_int8_read(lm, config.kv_read)
        result["in_place_vs_copy"] = logits_difference(copy, lean)
    return result


def _machine(device: torch.device) -> dict[str, Any]:
    machine: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine |= {"gpu": properties.name, "gpu_memory_mib": round(properties.total_memory / 2**20)}
    return machine


def _write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    partial.replace(out)


def run(config: Config) -> dict[str, Any]:
    """Build the model, measure the baseline, sweep the slot counts; the JSON is rewritten at each step."""
    started = time.time()
    model = build_model(config)
    config.compile = compile_setting(config.settings, model.device)
    results = _header(model, config)
    if "int8" in (config.weights, config.kv_cache):
        try:
            results["int8_logits"] = make_lean_measured(model, config)
        except Exception as exc:  # recorded: without the lean LM there is nothing of it to sweep
            traceback.print_exc()
            results["int8_logits"] = {"outcome": "error", "error": _first_line(exc)}
            results["stopped_by"] = "the lean LM failed"
            _write(results, config.out)
            return results
        results["weights_memory_mib"] = _held_memory_mib(model.device)
    if config.max_memory_mib is not None:
        limit_memory(model.device, config.max_memory_mib)
    _write(results, config.out)
    if config.baseline_ticks:
        results["baseline_batch1"] = measure_baseline(model, config)
        _write(results, config.out)
    if config.adapters:
        measure_adapters(model, config, results)
        _write(results, config.out)
    sweep(model, config, results, started)
    results["finished"] = True
    _write(results, config.out)
    return results


def _header(model: MoshiModel, config: Config) -> dict[str, Any]:
    device = model.device
    return {
        "benchmark": "gpu_sessions",
        "machine": _machine(device),
        "configuration": {
            "size": config.size,
            "lm_parameters": sum(p.numel() for p in model.lm.parameters()),
            "mimi_parameters": sum(p.numel() for p in model.mimi.parameters()),
            "dtype": str(next(model.lm.parameters()).dtype),
            "torch_compile": config.compile,
            "cuda_graphs": cuda_graphs_on(device),
            "int8": config.weights == "int8",
            "weights": config.weights,
            "kv_cache": config.kv_cache,
            "kv_read": config.kv_read,
            # The Triton read's tuning (what `--kv-read triton`, or `auto` on CUDA, ran with).
            "triton_tuning": {"block_positions": TRITON_BLOCK_POSITIONS, "warps": TRITON_WARPS},
            "context_frames": model.lm.context,
            "ticks_per_point": config.ticks,
            "warmup_ticks": config.warmup_ticks,
            "mean_session_s": config.session_s,
            "primer_tokens": config.primer_tokens,
            "max_memory_mib": config.max_memory_mib,
            "time_budget_s": config.budget_s,
            "tick_budget_ms": BUDGET_MS,
        },
        "weights_memory_mib": _held_memory_mib(device),
        "int8_logits": None,
        "baseline_batch1": None,
        "adapters": None,
        "points": [],
        "realtime_sessions": 0,
        "stopped_by": None,
        "finished": False,
    }


def measure_baseline(model: MoshiModel, config: Config) -> dict[str, Any]:
    try:
        baseline = baseline_loop(model, config)
    except Exception as exc:  # recorded; the sweep still runs
        traceback.print_exc()
        return {"outcome": "error", "error": _first_line(exc)}
    print(f"baseline batch 1: {baseline['tick_ms']}", flush=True)
    return baseline


def sweep(model: MoshiModel, config: Config, results: dict[str, Any], started: float) -> None:
    """Slot counts in order, until the first that fails (out of memory) or would pass the time budget."""
    last_point_s = 0.0
    for slots in config.slots:
        # A point costs at least what the smaller one before it did: stop before passing the budget.
        if config.budget_s is not None and time.time() - started + 1.5 * last_point_s > config.budget_s:
            results["stopped_by"] = f"time budget of {config.budget_s:.0f} s before {slots} slots"
            return
        point_started = time.time()
        point = measure_point(model, slots, config)
        last_point_s = time.time() - point_started
        print(_describe(point), flush=True)
        if "profile" in point:
            print(_describe_profile(point["profile"]), flush=True)
        results["points"].append(point)
        realtime = [p["slots"] for p in results["points"] if p["outcome"] == "measured" and p["realtime"]]
        results["realtime_sessions"] = max(realtime, default=0)
        results["wall_s"] = round(time.time() - started, 1)
        if point["outcome"] != "measured":
            results["stopped_by"] = f"{point['outcome'].replace('_', ' ')} at {slots} slots"
        _write(results, config.out)
        if point["outcome"] != "measured":
            return


def measure_point(model: MoshiModel, slots: int, config: Config) -> dict[str, Any]:
    try:
        return sessions_point(model, slots, config)
    except Exception as exc:
        # Any failure ends the sweep with what it measured kept: a lease may not allow a second try.
        traceback.print_exc()
        outcome = "out_of_memory" if is_out_of_memory(exc) else "error"
        return {"slots": slots, "outcome": outcome, "error": _first_line(exc)}
    finally:
        gc.collect()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _describe_profile(profile: dict[str, Any]) -> str:
    rows = [
        f"  {e['ms_per_tick']:8.3f} ms {e['share']:6.1%} x{e['calls_per_tick']:<7} {e['name']}"
        for e in profile["top"]
    ]
    return f"  profile, {profile['time']} time, {profile['ms_per_tick']} ms a tick:\n" + "\n".join(rows)


def _describe(point: dict[str, Any]) -> str:
    if point["outcome"] != "measured":
        return f"{point['slots']:4d} slots: {point['outcome']} ({point['error']})"
    tick, stages = point["tick_ms"], point["stages_ms"]
    split = " / ".join(f"{s} {stages[s]['p50'] if stages[s] else '-'}" for s in STAGES)
    return (
        f"{point['slots']:4d} slots: tick p50 {tick['p50']} p99 {tick['p99']} max {tick['max']} ms "
        f"({split} p50 ms), peak {point['peak_memory_mib']} MiB, "
        f"{'real-time' if point['realtime'] else 'NOT real-time'}"
    )


def _counts(text: str) -> list[int]:
    """A comma-separated list of whole numbers >= 0 (`--slots`, `--adapters`): anything else is a usage
    error, not a traceback."""
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated whole numbers: {text!r}") from None
    if any(n < 0 for n in counts):
        raise argparse.ArgumentTypeError(f"counts are >= 0: {text!r}")
    return counts


def _kernels(text: str) -> list[str]:
    """A comma-separated list of LoRA_KERNELS names (`--lora-kernels`)."""
    kernels = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in kernels if name not in LORA_KERNELS]
    if unknown or not kernels:
        raise argparse.ArgumentTypeError(f"LoRA kernels are some of {','.join(LORA_KERNELS)}: {text!r}")
    return kernels


def parse(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_sessions", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "small"], default=None, help="default: full on cuda")
    parser.add_argument(
        "--slots", type=_counts, default=DEFAULT_SLOTS, help=f"comma-separated (default {DEFAULT_SLOTS})"
    )
    parser.add_argument("--ticks", type=int, default=1000, help="measured ticks a point (>= 500 to publish)")
    parser.add_argument("--warmup-ticks", type=int, default=20)
    parser.add_argument("--baseline-ticks", type=int, default=None, help="default: --ticks")
    parser.add_argument("--session-s", type=float, default=120.0, help="mean session length, seconds")
    parser.add_argument("--primer-tokens", type=int, default=32, help="persona primer of a joining session")
    parser.add_argument("--max-memory-mib", type=int, default=None, help="refuse allocations past this")
    parser.add_argument("--weights", choices=["float", "int8"], default=None, help="default: the worker's")
    parser.add_argument("--kv-cache", choices=["float", "int8"], default=None, help="default: the worker's")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no point that would end past this (seconds)"
    )
    parser.add_argument(
        "--adapters",
        type=_counts,
        default="",
        help="distinct LoRA adapter counts in one batch, against no LoRA (e.g. 0,1,4,8)",
    )
    parser.add_argument("--adapter-rank", type=int, default=128, help="rank of the random adapters")
    parser.add_argument(
        "--adapter-batch",
        type=int,
        default=None,
        help="sessions in that batch (default: the largest count, >= 8)",
    )
    parser.add_argument(
        "--adapter-ticks", type=int, default=None, help="measured ticks a variant (default: --ticks)"
    )
    parser.add_argument(
        "--kv-read",
        choices=INT8_READS,
        default="auto",
        help="how an int8 KV cache is read: auto (the Triton kernel where it takes the step, i.e. on CUDA; "
        "else compiled where the worker compiles, else a dequantized copy), copy, compiled, triton "
        "(default: auto, the worker's)",
    )
    parser.add_argument(
        "--profile-ticks",
        type=int,
        default=0,
        help="ticks a point run under torch.profiler after the measured ones: its top operators and kernels "
        "(default 0: none)",
    )
    parser.add_argument(
        "--lora-kernels",
        type=_kernels,
        default=",".join(LORA_KERNELS),
        help=f"LoRA kernels the --adapters variants run with (default all: {','.join(LORA_KERNELS)})",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="frames the LM attends over, each session's KV cache length (default: the worker's "
        "CHORUS_DIALOGUE_CONTEXT, else the checkpoint's)",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    adapters: list[int] = args.adapters
    if args.adapter_batch and adapters and args.adapter_batch < max(adapters):
        parser.error("no --adapters count above --adapter-batch (each needs a row of its own)")
    settings = DialogueSettings()
    if args.context is not None:
        if args.context < 1:
            parser.error("--context is a number of frames, at least 1")
        settings = settings.model_copy(update={"dialogue_context": args.context})
    size = args.size or ("full" if resolve_device(settings.dialogue_device).type == "cuda" else "small")
    device_out = os.environ.get("OUT")  # the device tool's folder: what is written there comes back
    out = args.out or (Path(device_out) / "dialogue_gpu.json" if device_out else DEFAULT_OUT)
    return Config(
        size=size,
        slots=args.slots,
        ticks=args.ticks,
        warmup_ticks=args.warmup_ticks,
        baseline_ticks=args.ticks if args.baseline_ticks is None else args.baseline_ticks,
        session_s=args.session_s,
        primer_tokens=args.primer_tokens,
        max_memory_mib=args.max_memory_mib,
        weights=args.weights or settings.dialogue_weights,
        kv_cache=args.kv_cache or settings.dialogue_kv_cache,
        out=out,
        budget_s=args.budget_s,
        adapters=adapters,
        adapter_rank=args.adapter_rank,
        adapter_batch=args.adapter_batch or max(8, *adapters, 0),
        adapter_ticks=args.ticks if args.adapter_ticks is None else args.adapter_ticks,
        profile_ticks=args.profile_ticks,
        kv_read=args.kv_read,
        lora_kernels=args.lora_kernels,
        settings=settings,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    if not torch.cuda.is_available():
        # One torch thread on cpu (as bench_dialogue: a small shared machine stalls on more).
        torch.set_num_threads(int(os.environ.get("CHORUS_BENCH_THREADS", "1")))
    results = run(config)
    print(f"real-time sessions: {results['realtime_sessions']}; wrote {config.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
