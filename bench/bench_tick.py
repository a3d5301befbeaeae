"""The dialogue tick, straightforward and lean: what the batcher costs around the model compute.

Both variants step the same sessions (joins and leaves during the run, a primer forced on each join)
on the same model, seeds and audio:
- straightforward: the step as it was first written (`StraightforwardBatcher`): a new input tensor and
  blocking host-to-device copies each tick, row masks rebuilt and copied every step, a device value
  read mid-tick (`bool(first.any())`), two device-to-host copies, eager resets;
- lean: `services.dialogue.batcher.Batcher` as the worker runs it.

Per variant: CPU time per tick of the stepping thread (p50 / p99 / mean, join ticks apart), and per
tick, from `torch.profiler`, the reads of a tensor's value (`aten::_local_scalar_dense`: on CUDA each
one of a device tensor waits for the device), the copies (`aten::copy_`, including the model's own)
and every aten op (a proxy for kernel launches), on steady ticks and on join ticks; on CUDA also the
implicit device waits `torch.cuda.set_sync_debug_mode` reports (`device_waits`; 0 on a CPU).

On a CPU the copies are memcpys and nothing waits on a device, so wall times barely move: the CPU
proves the counts and that the lean tick gives the same outputs (tests/services/dialogue/
test_lean_tick.py). What the lean tick buys on a GPU (the waits removed, the graphed resets) can only
be measured there; the `device` field says where this ran.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from chorus.devtools.moshi_checkpoint import write_moshi_checkpoint
from services.dialogue.batcher import Batcher, Phase, RowOutput, Slot
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.settings import DialogueSettings
from shared.audio import FRAME_SAMPLES, FloatAudio

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"
SLOTS = 8
TICKS = 160
PROFILED_TICKS = 24  # three of them join ticks
JOIN_EVERY = 8  # a session leaves and another joins its row every this many ticks
THREADS = int(os.environ.get("CHORUS_BENCH_THREADS", "1"))
SYNC_OPS = ("aten::_local_scalar_dense",)
COPY_OPS = ("aten::copy_",)


class StraightforwardBatcher(Batcher):
    """The step as it was first written: the baseline of this benchmark, and the specification the lean
    step is held to (tests/services/dialogue/test_lean_tick.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_force_mask = torch.zeros(self.batch_size, dtype=torch.bool)
        self._plain_force_tokens = torch.zeros(self.batch_size, dtype=torch.long)

    def _live_step(self, audio: FloatAudio) -> list[RowOutput]:
        return self._step(audio, priming_only=False)

    def _priming_step(self) -> None:
        self._step(np.zeros((self.batch_size, FRAME_SAMPLES), dtype=np.float32), priming_only=True)

    def _step(self, audio: FloatAudio, priming_only: bool) -> list[RowOutput]:
        slots = [s for s in self.active() if s.forced or not priming_only]
        phases = {s.row: Phase.IDLE for s in self.slots} | {s.row: s.phase for s in slots}
        with self._compile_mode():
            self._reset_joined_rows()
            live = np.array([phases[row] is Phase.LIVE for row in range(self.batch_size)])
            pcm = torch.from_numpy(np.where(live[:, None], audio, 0.0).astype(np.float32))[:, None, :]
            tokens, out = self._plain_models(pcm.to(self.model.device), phases)
        outputs = [self._plain_output(slot, phases[slot.row], tokens, out) for slot in slots]
        for slot in slots:
            slot.age += 1
        return outputs

    def _plain_models(self, pcm: torch.Tensor, phases: dict[int, Phase]) -> tuple[torch.Tensor, torch.Tensor]:
        mimi, device = self.model.mimi, self.model.device
        active = torch.tensor([phases[r] is not Phase.IDLE for r in range(self.batch_size)], device=device)
        first = torch.tensor([phases[s.row] is not Phase.IDLE and s.age == 0 for s in self.slots])
        first = first.to(device)
        mimi.set_exec_mask(active)
        self.gen.set_exec_mask(active)
        codes = mimi.encode(pcm)
        if bool(first.any()):
            mimi.reset_streaming(first)
        self._prepare_forcing()
        tokens = self.gen.step(codes)
        assert tokens is not None
        generated = active & (tokens[:, 1:, 0] >= 0).all(dim=1)
        mimi.set_exec_mask(generated)
        out = mimi.decode(tokens[:, 1:].clamp(min=0))
        return tokens[:, 0, 0].cpu(), out[:, 0].float().cpu()

    def _plain_output(self, slot: Slot, phase: Phase, tokens: torch.Tensor, pcm: torch.Tensor) -> RowOutput:
        assert slot.session_id is not None
        published = slot.age >= slot.primer_length + self.delay
        token = int(tokens[slot.row])
        return RowOutput(
            session_id=slot.session_id,
            row=slot.row,
            phase=phase,
            went_live=phase is Phase.LIVE and slot.age == slot.primer_length,
            text_token=token if published and token >= 0 else None,
            pcm=pcm[slot.row].numpy() if published and token >= 0 else None,
        )

    def _reset_joined_rows(self) -> None:
        joined = [s for s in self.slots if s.needs_reset]
        if not joined:
            return
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        for slot in joined:
            mask[slot.row] = True
            slot.needs_reset = False
        self.model.mimi.reset_streaming(mask.to(self.model.device))
        self.gen.reset_streaming(mask.to(self.model.device))

    def _prepare_forcing(self) -> None:
        tokens = [s.forced.popleft() if s.session_id is not None and s.forced else -1 for s in self.slots]
        self._forcing = any(t >= 0 for t in tokens)
        if self._forcing:
            forced = torch.tensor(tokens)
            self._plain_force_mask = (forced >= 0).to(self.model.device)
            self._plain_force_tokens = forced.clamp(min=0).to(self.model.device)

    def _force_text(self, text_token: torch.Tensor) -> None:
        if self._forcing:
            text_token.copy_(torch.where(self._plain_force_mask, self._plain_force_tokens, text_token))


def _churn(batcher: Batcher, tick: int, primer: list[int]) -> bool:
    """Every JOIN_EVERY ticks the session of one row leaves and a new one joins it. True on a join tick."""
    if tick == 0:
        for row in range(batcher.batch_size):
            batcher.join(f"s{row}", primer)
        return True
    if tick % JOIN_EVERY:
        return False
    row = (tick // JOIN_EVERY) % batcher.batch_size
    batcher.leave(row)
    batcher.join(f"s{row}-{tick}", primer)
    return True


def _play(batchers: dict[str, Batcher], ticks: int, primer: list[int]) -> dict[str, list[float]]:
    """Both variants step tick by tick in turn (same audio, same seeds), so a neighbour's load on the
    machine weighs on both alike. Returns each variant's time per tick: CPU time of this thread on a CPU
    (the model runs in it with one torch thread), wall time on CUDA (a step ends with a stream sync);
    and the join flags under the key "joins"."""
    rng = np.random.default_rng(0)
    clock = time.perf_counter if _on_cuda(batchers) else time.thread_time
    cpu: dict[str, list[float]] = {name: [] for name in batchers}
    joins: list[float] = []
    for tick in range(ticks):
        audio = (rng.standard_normal((SLOTS, FRAME_SAMPLES)) * 0.3).astype(np.float32)
        for name, batcher in batchers.items():
            joined = _churn(batcher, tick, primer)
            torch.manual_seed(tick)
            started = clock()
            batcher.step(audio)
            cpu[name].append(clock() - started)
        joins.append(float(joined))
    return cpu | {"joins": joins}


def _counts(batcher: Batcher, primer: list[int]) -> dict[str, Any]:
    """Per-tick op counts over PROFILED_TICKS ticks (steady and join ticks apart)."""
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal((batcher.batch_size, FRAME_SAMPLES)) * 0.3).astype(np.float32)
    per_kind: dict[str, list[dict[str, int]]] = {"steady": [], "join": []}
    builds_before = getattr(batcher, "mask_builds", 0)
    for tick in range(PROFILED_TICKS):
        joined = _churn(batcher, tick + 1, primer)
        with _device_waits(batcher) as waits, profile(activities=[ProfilerActivity.CPU]) as prof:
            batcher.step(audio)
        ops = {e.key: e.count for e in prof.key_averages()}
        per_kind["join" if joined else "steady"].append(
            {
                "device_waits": len(waits),
                "tensor_value_reads": sum(ops.get(name, 0) for name in SYNC_OPS),
                "copies": sum(ops.get(name, 0) for name in COPY_OPS),
                "aten_ops": sum(count for name, count in ops.items() if name.startswith("aten::")),
            }
        )
    summary: dict[str, Any] = {
        kind: {key: round(statistics.fmean(t[key] for t in ticks), 1) for key in ticks[0]}
        for kind, ticks in per_kind.items()
        if ticks
    }
    summary["mask_copies_in_profiled_ticks"] = (
        batcher.mask_builds - builds_before if type(batcher) is Batcher else None
    )
    return summary


def _on_cuda(batchers: dict[str, Batcher]) -> bool:
    return any(b.model.device.type == "cuda" for b in batchers.values())


@contextlib.contextmanager
def _device_waits(batcher: Batcher) -> Iterator[list[warnings.WarningMessage]]:
    """On CUDA, the implicit waits on the device (`torch.cuda.set_sync_debug_mode`: value reads, blocking
    copies; the batcher's one explicit stream sync is not one of them). On a CPU: none, by definition."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuda = batcher.model.device.type == "cuda"
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            caught[:] = [w for w in caught if "synchroniz" in str(w.message)]


def _timing(times: list[float], joins: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    join_ms = [t * 1000 for t, j in zip(times, joins, strict=True) if j]
    return {
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "join_tick_mean_ms": round(statistics.fmean(join_ms), 2),
    }


VARIANTS: dict[str, type[Batcher]] = {"straightforward": StraightforwardBatcher, "lean": Batcher}


def _make(variant: type[Batcher], model: MoshiModel) -> Batcher:
    """On CUDA the lean batcher resets joining rows with its CUDA graph (the worker does so with compile
    on; compile itself stays off here: both variants run the same kernels)."""
    graph_resets = variant is Batcher and model.device.type == "cuda"
    return variant(model, SLOTS, compile=False, graph_resets=graph_resets or None)


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    directory = write_moshi_checkpoint(CACHE / "moshi")
    settings = DialogueSettings(moshi_dir=directory)
    primer = load_moshi(settings).encode_text("You are a helpful assistant.")[:6]
    # One model each (the same weights): both stream at once, stepping in turn.
    batchers = {name: _make(cls, load_moshi(settings)) for name, cls in VARIANTS.items()}
    try:
        for batcher in batchers.values():
            batcher.warmup()
        cpu = _play(batchers, TICKS, primer)
        joins = cpu.pop("joins")
        results = {
            name: {"tick_time": _timing(cpu[name], joins), "per_tick": _counts(batcher, primer)}
            for name, batcher in batchers.items()
        }
        lean, plain = cpu["lean"], cpu["straightforward"]
        saved = sorted((p - q) * 1000 for p, q in zip(plain, lean, strict=True))
    finally:
        for batcher in batchers.values():
            batcher.close()
    for name, result in results.items():
        print(f"   {name}: {result}", flush=True)
    return {
        "device": str(next(iter(batchers.values())).model.device),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {THREADS} torch thread(s)",
        "slots": SLOTS,
        "ticks": TICKS,
        "join_every": JOIN_EVERY,
        "clock": "wall time per tick (the step ends with a stream sync)"
        if _on_cuda(batchers)
        else "CPU time of the stepping thread per tick (the model runs in it: one torch thread)",
        "lean_saves_per_tick_ms": {
            "p50": round(saved[len(saved) // 2], 3),
            "mean": round(statistics.fmean(saved), 3),
        },
        "variants": results,
    }
