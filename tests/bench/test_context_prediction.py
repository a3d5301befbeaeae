"""bench/bench_context.py's check of its prediction against a measured shorter-context sweep: only a sweep
of the same LM, dtype and weights on the same card is compared, and each measured point is set beside
the prediction for its slots. On the H100 sweeps in bench/results (measured data, not made up here)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from bench.bench_context import SHORT_CONTEXT_SWEEP, SWEEP, comparable, compare


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_only_the_same_lm_on_the_same_card_is_compared() -> None:
    sweep, measured = load(SWEEP), load(SHORT_CONTEXT_SWEEP)
    assert comparable(measured, sweep)
    int8 = copy.deepcopy(measured)
    int8["configuration"]["weights"] = "int8"
    assert not comparable(int8, sweep)
    elsewhere = copy.deepcopy(measured)
    elsewhere["machine"]["gpu"] = "NVIDIA H200"
    assert not comparable(elsewhere, sweep)


def test_each_measured_point_is_set_beside_its_prediction() -> None:
    measured = load(SHORT_CONTEXT_SWEEP)
    context = measured["configuration"]["context_frames"]
    guess = {"lm_step_p50_ms": 30.0, "tick_p50_ms": 40.0, "tick_p99_ms": 50.0, "peak_memory_mib": 60000}
    predicted = {"by_context": {str(context): {"rows": [{"slots": 64, "realtime": True, **guess}]}}}
    point = next(p for p in measured["points"] if p["slots"] == 64)
    out_of_memory = {**point, "slots": 64, "outcome": "out_of_memory"}
    measured["points"].append(out_of_memory)  # not measured: left out, as are slots with no prediction

    rows = compare(measured, predicted)

    assert [r["slots"] for r in rows] == [64]
    (row,) = rows
    assert row["context"] == context and row["predicted"] == guess | {"realtime": True}
    assert row["measured"]["tick_p99_ms"] == point["tick_ms"]["p99"]
    assert row["measured_over_predicted"]["lm_step_p50_ms"] == round(
        point["stages_ms"]["lm"]["p50"] / 30.0, 3
    )
    assert compare(measured, {"by_context": {}}) == []  # a context the prediction does not list
