"""bench/gpu_lora_graphs.py, the GPU check of CHORUS_DIALOGUE_LORA_GRAPHS's replays, rehearsed on the CPU
(eagerly: no graph to capture there): its checks hold, and a wrong reference would fail them."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_lora_graphs


def test_the_check_passes_eagerly_on_the_cpu_and_has_the_power_to_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = gpu_lora_graphs.run(torch.device("cpu"))
    assert result["ok"] and not result["captured_graph"]
    assert [c["step"] for c in result["checks"]] == [label for label, _ in gpu_lora_graphs.STEPS]
    assert all(c["max_replay_vs_eager"] == 0 for c in result["checks"])

    fused = gpu_lora_graphs._fused
    monkeypatch.setattr(  # every row as if it had no adapter: the tables with adapters must fail
        gpu_lora_graphs,
        "_fused",
        lambda bank, originals, x, table: fused(bank, originals, x, [0] * len(table)),
    )
    wrong = gpu_lora_graphs.run(torch.device("cpu"))
    assert [c["ok"] for c in wrong["checks"]] == [True, False, False, False, False]
