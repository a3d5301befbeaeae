"""A shorter attention context (CHORUS_DIALOGUE_CONTEXT): what a session's KV cache holds, and what the
H100 sweep's measurements predict for sessions per GPU at each context. Exact bytes, predicted time.

- **Bytes, exact**: the published 7B LM built on the meta device (no memory is taken) in bf16, its
  context set as the worker sets it (`services.dialogue.model.set_context`), one session's KV caches
  allocated by moshi's own streaming state: for the published 3000 frames and shorter ones, with a bf16
  cache and an int8 one.
- **Predicted, from the H100 sweep** (`bench/results/dialogue_gpu.json`, bf16, context 3000): the peak
  memory is a line in the slots (the weights, then a session's cache and the rest of its state), and so
  is the LM step's p50. The prediction scales the per-session parts by the cache's bytes: the memory's
  slope by a session's cache (what it measurably is), the LM step's slope likewise on the reading that
  this slope is the time of reading each session's cache once a step (`implied_read_gb_s`: the bandwidth
  that reading would take; an H100's HBM3 gives about 3,350 GB/s at most). The rest of a tick (Mimi's
  encode and decode, the tick's other work) is taken at the widest measured point's, and the p99 as its
  p50 plus the widest point's spread; a point fits when its peak is under the card's memory as torch
  sees it less `RESERVE_MIB` (3 GiB, bench_quant's margin for the CUDA context and the allocator's
  slack). The step's per-session slope being the cache read is an inference (the bandwidth it implies
  is 89 % of the card's peak), not separated from the batch's other per-row costs. None of it is a
  measurement.
- **Measured against predicted** (`bench/results/dialogue_gpu_ctx.json`, `bench/gpu/lease.sh`'s `ctx`
  stage: bf16 at a shorter context on an H100), where that sweep is present and ran the same LM, dtype
  and weights on the same card: each measured point beside the prediction for its context and slots,
  and the ratio of each figure (measured / predicted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMModel

from bench.bench_quant import RESERVE_MIB, kv_bytes_per_session, weight_bytes
from chorus.devtools.moshi_checkpoint import published_architecture
from services.dialogue.model import set_context
from services.dialogue.quantized import make_lean

SWEEP = Path(__file__).resolve().parent / "results" / "dialogue_gpu.json"
SHORT_CONTEXT_SWEEP = SWEEP.with_name("dialogue_gpu_ctx.json")
PUBLISHED = published_architecture(full=True)[0]["context"]  # 3000 frames
CONTEXTS = (PUBLISHED, 2250, 2000, 1500, 1000)
SLOTS = (32, 40, 48, 56, 64, 72, 80, 88, 96)
BUDGET_MS = 80.0  # a real-time tick


def run() -> dict[str, Any]:
    caches = {context: cache_bytes(context) for context in CONTEXTS}
    result: dict[str, Any] = {
        "kv_per_session_mib": {
            str(c): {k: round(v / 2**20, 1) for k, v in b.items()} for c, b in caches.items()
        },
        "weights_mib": round(weights_mib(), 1),
    }
    sweep = json.loads(SWEEP.read_text(encoding="utf-8")) if SWEEP.is_file() else None
    if sweep is not None and _is_the_published_bf16_lm(sweep):
        result["predicted_from_h100"] = predict(sweep, caches)
        measured = (
            json.loads(SHORT_CONTEXT_SWEEP.read_text(encoding="utf-8"))
            if SHORT_CONTEXT_SWEEP.is_file()
            else None
        )
        if measured is not None and comparable(measured, sweep):
            result["measured_against_predicted"] = compare(measured, result["predicted_from_h100"])
    return result


def _is_the_published_bf16_lm(sweep: dict[str, Any]) -> bool:
    """The lines are fitted to a sweep of the published LM in bf16 with a bf16 cache at its own context."""
    return _published_bf16(sweep) and sweep["configuration"].get("context_frames", PUBLISHED) == PUBLISHED


def comparable(measured: dict[str, Any], sweep: dict[str, Any]) -> bool:
    """A shorter-context sweep says something of the prediction only for the same LM, dtype and weights
    on the same card as the sweep it was fitted to."""
    return _published_bf16(measured) and measured["machine"].get("gpu") == sweep["machine"].get("gpu")


def _published_bf16(sweep: dict[str, Any]) -> bool:
    configuration = sweep["configuration"]
    return (
        configuration.get("size") == "full"
        and configuration.get("dtype") == "torch.bfloat16"
        and (configuration.get("weights"), configuration.get("kv_cache")) == ("float", "float")
    )


def _published_lm(context: int, *, int8_kv: bool) -> LMModel:
    lm_config, _ = published_architecture(full=True)
    lm = LMModel(device="meta", dtype=torch.bfloat16, **lm_config)
    make_lean(lm, int8_weights=False, int8_kv=int8_kv, dtype=torch.bfloat16)
    set_context(lm, context)
    return lm


def cache_bytes(context: int) -> dict[str, int]:
    """One session's KV cache bytes at `context`, bf16 and int8 (the main transformer's: moshi streams the
    depformer apart, with no cache kept per session)."""
    return {
        kind: kv_bytes_per_session(_published_lm(context, int8_kv=kind == "int8"))
        for kind in ("bf16", "int8")
    }


def weights_mib() -> float:
    return weight_bytes(_published_lm(PUBLISHED, int8_kv=False)) / 2**20


def compare(measured: dict[str, Any], predicted: dict[str, Any]) -> list[dict[str, Any]]:
    """Each measured point of a bf16 sweep at a shorter context beside the prediction for it (a context
    or slot count the prediction does not list is left out)."""
    context = str(measured["configuration"].get("context_frames"))
    rows = {r["slots"]: r for r in predicted["by_context"].get(context, {}).get("rows", [])}
    out = []
    for point in measured["points"]:
        guess = rows.get(point["slots"])
        if point["outcome"] != "measured" or guess is None:
            continue
        got = {
            "lm_step_p50_ms": point["stages_ms"]["lm"]["p50"],
            "tick_p50_ms": point["tick_ms"]["p50"],
            "tick_p99_ms": point["tick_ms"]["p99"],
            "peak_memory_mib": point["peak_memory_mib"],
        }
        out.append(
            {
                "context": int(context),
                "slots": point["slots"],
                "measured": got | {"realtime": point["realtime"]},
                "predicted": {k: guess[k] for k in got} | {"realtime": guess["realtime"]},
                "measured_over_predicted": {k: round(v / guess[k], 3) for k, v in got.items()},
            }
        )
    return out


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares: (intercept, slope)."""
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(intercept), float(slope)


def predict(sweep: dict[str, Any], caches: dict[int, dict[str, int]]) -> dict[str, Any]:
    points = [p for p in sweep["points"] if p["outcome"] == "measured"]
    slots = [float(p["slots"]) for p in points]
    published = caches[PUBLISHED]["bf16"] / 2**20  # MiB
    memory_base, memory_slope = _line(slots, [p["peak_memory_mib"] for p in points])
    lm_base, lm_slope = _line(slots, [p["stages_ms"]["lm"]["p50"] for p in points])
    widest = max(points, key=lambda p: p["slots"])
    # What torch sees of the card, less bench_quant's reserve for the CUDA context and allocator slack
    # (Mimi and the activations are in the line's intercept already: a margin, not a double count).
    card_mib = sweep["machine"]["gpu_memory_mib"]
    usable_mib = card_mib - RESERVE_MIB
    rest_ms = widest["tick_ms"]["p50"] - widest["stages_ms"]["lm"]["p50"]
    spread_ms = widest["tick_ms"]["p99"] - widest["tick_ms"]["p50"]
    fitted = {
        "card": sweep["machine"].get("gpu"),
        "card_mib": card_mib,
        "usable_mib": usable_mib,
        "points": [int(s) for s in slots],
        "peak_memory_mib": {"intercept": round(memory_base), "per_session": round(memory_slope, 1)},
        "per_session_besides_the_cache_mib": round(memory_slope - published, 1),
        "lm_step_p50_ms": {"intercept": round(lm_base, 2), "per_session": round(lm_slope, 3)},
        "implied_read_gb_s": round(caches[PUBLISHED]["bf16"] / (lm_slope / 1000) / 1e9),
        "rest_of_tick_p50_ms": round(rest_ms, 2),
        "tick_p99_minus_p50_ms": round(spread_ms, 2),
    }
    by_context: dict[str, Any] = {}
    for context in CONTEXTS:
        share = caches[context]["bf16"] / caches[PUBLISHED]["bf16"]
        per_session_mib = memory_slope - published * (1 - share)
        rows = []
        for n in SLOTS:
            memory = memory_base + n * per_session_mib
            lm = lm_base + n * lm_slope * share
            tick = lm + rest_ms
            rows.append(
                {
                    "slots": n,
                    "peak_memory_mib": round(memory),
                    "fits": memory < usable_mib,
                    "lm_step_p50_ms": round(lm, 1),
                    "tick_p50_ms": round(tick, 1),
                    "tick_p99_ms": round(tick + spread_ms, 1),
                    "realtime": tick + spread_ms <= BUDGET_MS,
                }
            )
        fitting = [r["slots"] for r in rows if r["fits"] and r["realtime"]]
        by_context[str(context)] = {
            "per_session_mib": round(per_session_mib, 1),
            "sessions_by_memory": int((usable_mib - memory_base) // per_session_mib),
            "most_listed_slots_fitting_in_real_time": max(fitting, default=0),
            "rows": rows,
        }
    return {"fitted": fitted, "by_context": by_context}
