"""What a context rollover costs: the batcher as the worker steps it, one session moved to a fresh state
again and again, with a free slot (primed beside the old row, which keeps talking) and without one
(primed again in place), with the worker's prime-ahead (spare tick time goes to extra priming steps) and
without it (one primer token per tick).

Per scenario, over `ROUNDS` rollovers of one session among `SLOTS` (the others keep talking):
- `ticks_to_switch`: ticks from the rollover's start to the fresh state's first frame;
- `extra_steps`: priming-only steps run in spare tick time (each is a step of the batch, the other rows
  masked out);
- `gap_frames`: frames the session had no model audio (silence) at the switch;
- `tick_ms`: wall time of a tick's step (with its prime-ahead steps), steady ticks and ticks while a
  fresh state primes.

Ticks are stepped back to back (no clock wait): the prime-ahead deadline is what the worker gives a tick
with live sessions (`ticks.prime_deadline`), counted from the tick's start.
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
from services.dialogue.batcher import Batcher, RowOutput
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.settings import DialogueSettings
from services.dialogue.ticks import prime_deadline
from shared.audio import FRAME_SAMPLES

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"
SLOTS = 4
ROUNDS = 6
STEADY_TICKS = 12  # between rollovers
PRIMER_TOKENS = 48  # a persona primer plus a transcript tail: what a rollover forces
INTERVAL_S = 0.08
THREADS = int(os.environ.get("CHORUS_BENCH_THREADS", "1"))


class CountingBatcher(Batcher):
    """The worker's batcher, counting the priming-only steps it runs in spare tick time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.priming_steps = 0

    def _priming_step(self) -> None:
        self.priming_steps += 1
        super()._priming_step()


def _scenario(model: MoshiModel, primer: list[int], *, free_slot: bool, prime_ahead: bool) -> dict[str, Any]:
    batcher = CountingBatcher(model, SLOTS)
    try:
        batcher.warmup()
        for i in range(SLOTS - 1 if free_slot else SLOTS):
            batcher.join(f"s{i}")
        rng = np.random.default_rng(7)
        row = 0
        steady: list[float] = []
        priming: list[float] = []
        rounds: list[dict[str, int]] = []

        def tick() -> list[RowOutput]:
            nonlocal row
            audio = (rng.standard_normal((SLOTS, FRAME_SAMPLES)) * 0.3).astype(np.float32)
            started = time.monotonic()
            until = prime_deadline(started, INTERVAL_S, live=True) if prime_ahead else None
            outputs = batcher.step(audio, prime_until=until)
            (priming if batcher.slots[row].pending is not None else steady).append(time.monotonic() - started)
            return outputs

        for _ in range(STEADY_TICKS):
            tick()
        for _ in range(ROUNDS):
            steps_before = batcher.priming_steps
            batcher.roll_over(row, primer)
            ticks = 0
            while True:
                ticks += 1
                done = next((o for o in tick() if o.session_id == "s0" and o.rollover is not None), None)
                if done is not None:
                    break
            assert done.rollover is not None
            row = done.row
            gap = done.rollover.gap_frames
            rounds.append(
                {"ticks": ticks, "extra_steps": batcher.priming_steps - steps_before, "gap_frames": gap}
            )
            for _ in range(STEADY_TICKS):
                tick()
    finally:
        batcher.close()
    return {
        "free_slot": free_slot,
        "prime_ahead": prime_ahead,
        "ticks_to_switch": _spread([r["ticks"] for r in rounds]),
        "extra_steps": _spread([r["extra_steps"] for r in rounds]),
        "gap_frames": _spread([r["gap_frames"] for r in rounds]),
        "tick_ms": {"steady": _ms(steady), "priming": _ms(priming)},
    }


def _spread(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 2),
        "p99": round(float(np.percentile(ms, 99)), 2),
        "max": round(float(ms.max()), 2),
        "n": len(seconds),
    }


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    model = load_moshi(DialogueSettings(moshi_dir=write_moshi_checkpoint(CACHE / "moshi")))
    text = "You are a calm and curious teacher. " * 8
    primer = model.encode_text(text)[:PRIMER_TOKENS]
    scenarios = [
        _scenario(model, primer, free_slot=free, prime_ahead=ahead)
        for free in (True, False)
        for ahead in (True, False)
    ]
    for scenario in scenarios:
        print(f"   {scenario}", flush=True)
    return {
        "device": str(model.device),
        "model": "small generated checkpoint (chorus dev make-checkpoints)",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {THREADS} torch thread(s)",
        "slots": SLOTS,
        "rounds": ROUNDS,
        "primer_tokens": len(primer),
        "acoustic_delay": max(model.lm.delays),
        "scenarios": scenarios,
    }
