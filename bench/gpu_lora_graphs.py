"""Does a CUDA graph captured with a static adapter bank (CHORUS_DIALOGUE_LORA_GRAPHS) replay the live
row -> slot table and the live slots? The speed of that path is `bench.gpu_sessions --adapters`; this is
its correctness on a GPU, which the CPU tests cannot show (they run the same ops without a graph).

Two bias-free bfloat16 linear layers under a 3-slot bank of rank 16 (the grouped kernel, static), one
graph captured with no row using an adapter (as the worker's warm-up captures LMGen's), then replayed
after changes made only between replays: rows switched between slots, a slot loaded after the capture,
a slot cleared. Each replay's rows are checked against the adapter fused into the weights (float32, to
bfloat16's rounding) and against the same layers run eagerly. On the CPU it runs eagerly (a rehearsal).

    BENCH_MODULE=bench.gpu_lora_graphs bench/gpu/run.sh [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from services.dialogue.adapters import NO_ADAPTER, AdapterBank, AdapterTensors

BATCH, SLOTS, RANK = 8, 3, 16
SHAPES = {"0": (512, 256), "1": (256, 512)}  # layer name -> (out, in)
# Row -> slot tables replayed in turn; "load 3" / "clear 2" change a slot before the next replay.
STEPS: list[tuple[str, list[int]]] = [
    ("no adapters", [NO_ADAPTER] * BATCH),
    ("mixed rows", [2, 0, 1, 1, 0, 2, 2, 0]),
    ("load 3", [3, 3, 1, 0, 2, 1, 3, 0]),
    ("every row one adapter", [1] * BATCH),
    ("clear 2", [2, 2, 2, 0, 1, 3, 0, 2]),
]


def _adapter(rank: int, seed: int, device: torch.device) -> AdapterTensors:
    g = torch.Generator().manual_seed(seed)
    layers = {
        name: (
            (torch.randn(rank, d_in, generator=g) / 8).to(device, torch.bfloat16),
            (torch.randn(d_out, rank, generator=g) / 8).to(device, torch.bfloat16),
        )
        for name, (d_out, d_in) in SHAPES.items()
    }
    return AdapterTensors(rank, layers)


def _fused(
    bank: AdapterBank, originals: list[torch.Tensor], x: torch.Tensor, table: list[int]
) -> torch.Tensor:
    """Each row through the weights with its slot's update fused in, in float32."""
    rows = []
    for row, slot in enumerate(table):
        h = x[row].float()
        for name, weight in zip(SHAPES, originals, strict=True):
            layer = bank._layers[name]
            a, b = layer.lora_A.weight[slot].float(), layer.lora_B.weight[slot].float()
            h = h @ (weight + b @ a[:, : weight.shape[1]]).T
        rows.append(h)
    return torch.stack(rows)


def run(device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        *(torch.nn.Linear(d_in, d_out, bias=False) for d_out, d_in in SHAPES.values())
    ).to(device, torch.bfloat16)
    originals = [layer.weight.detach().float() for layer in layers]
    bank = AdapterBank(layers, BATCH, SLOTS, RANK, kernel="grouped", static=True)
    bank.load(1, _adapter(16, 1, device))
    bank.load(2, _adapter(8, 2, device))
    x = torch.zeros(BATCH, 1, SHAPES["0"][1], device=device, dtype=torch.bfloat16)
    graph: torch.cuda.CUDAGraph | None = None
    with torch.no_grad():
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    layers(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layers(x)
        checks = []
        for n, (label, table) in enumerate(STEPS):
            if label == "load 3":
                bank.load(3, _adapter(4, 3, device))
            if label == "clear 2":
                bank.clear(2)
            for row, slot in enumerate(table):
                bank.assign(row, slot)
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + n)).to(x))
            if graph is not None:
                graph.replay()
                torch.cuda.synchronize()
                got = out.clone()
            else:
                got = layers(x)
            eager = layers(x)
            want = _fused(bank, originals, x, table)
            scale = want.abs().max().item()
            error = (got.float() - want).abs().max().item() / scale
            replay_vs_eager = (got.float() - eager.float()).abs().max().item() / scale
            checks.append(
                {
                    "step": label,
                    "table": table,
                    "max_error_vs_fused": round(error, 5),
                    "max_replay_vs_eager": round(replay_vs_eager, 6),
                    "ok": error <= 3e-2,
                }
            )
            print(f"{label}: {table} error vs fused {error:.2e}, replay vs eager {replay_vs_eager:.2e}")
    return {
        "benchmark": "gpu_lora_graphs",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "captured_graph": graph is not None,
        "tolerance": 3e-2,
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora_graphs.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'ok' if result['ok'] else 'MISMATCH'}; wrote {args.out}")
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
