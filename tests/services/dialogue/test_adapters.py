"""Per-row LoRA: in one batched step, each row's text logits and audio codes are those of a batch-1 model
with that row's adapter fused by moshi's own code (`get_moshi_lm(..., lora_weights, fuse_lora=True)`,
which ends in `replace_lora_with_linear`); a row with no adapter is the plain model's.

Both kernels (CHORUS_DIALOGUE_LORA_KERNEL: `per_adapter`, `grouped`) are held to the same references; the
two adapters have different ranks (8 and 4) in slots of a higher one.

Tolerance: float32 on the CPU, the fused weight `W + s·B@A` against `W x + B_s (A x)` differ by rounding
only: text logits within 1e-4 (absolute and relative), audio codes (greedy) identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from moshi.models import LMGen, loaders
from moshi.models.lm import LMModel
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from chorus.devtools.lora_adapter import write_random_adapter
from services.dialogue.adapters import (
    NO_ADAPTER,
    AdapterBank,
    AdapterTensors,
    LoraKernel,
    layer_shapes,
    read_adapter,
    resolve_graphs,
    resolve_kernel,
)
from services.dialogue.settings import DialogueSettings
from shared.errors import ModelLoadError, Unprocessable

STEPS = 6
TOLERANCE = 1e-4
RANKS = (8, 4)  # of the two adapters
KERNELS: list[LoraKernel] = ["per_adapter", "grouped"]


def _lm(moshi_dir: Path, adapter: int | None = None, adapters: list[Path] | None = None) -> LMModel:
    """The plain LM, or with adapter number `adapter` of `adapters` fused by moshi."""
    config = json.loads((moshi_dir / "config.json").read_text(encoding="utf-8"))
    kwargs = {k: v for k, v in config.items() if not k.endswith("_name") and k != "model_type"}
    lora_weights = None
    if adapter is not None and adapters is not None:
        kwargs |= {"lora": True, "lora_rank": RANKS[adapter], "lora_scaling": 2.0}
        lora_weights = adapters[adapter]
    return loaders.get_moshi_lm(
        moshi_dir / "model.safetensors",
        lm_kwargs=kwargs,
        device="cpu",
        dtype=torch.float32,
        lora_weights=lora_weights,
        fuse_lora=True,
    )


def _run(
    lm: LMModel, batch: int, codes: list[torch.Tensor], before: Callable[[int], object] = lambda _: None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Greedy steps of `lm` on the same user codes for every row: text logits and audio codes per step
    (`before(step)` runs between steps)."""
    logits: list[torch.Tensor] = []

    def keep(step_logits: torch.Tensor) -> None:
        logits.append(step_logits.clone())

    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=keep)
    out: list[torch.Tensor] = []
    with torch.no_grad(), gen.streaming(batch):
        for n, step in enumerate(codes):
            before(n)
            tokens = gen.step(step.expand(batch, -1, -1))
            if tokens is not None:
                out.append(tokens[:, 1:].clone())
    return logits, out


@pytest.fixture(scope="module")
def adapters(moshi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return [
        write_random_adapter(folder / f"{n}.safetensors", moshi_dir, rank=rank, seed=n)
        for n, rank in zip((1, 2), RANKS, strict=True)
    ]


Run = tuple[list[torch.Tensor], list[torch.Tensor]]


def _codes(lm: LMModel, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, lm.card, (1, lm.num_codebooks - lm.dep_q - 1, 1), generator=generator)]
    return codes + [torch.randint(0, lm.card, codes[0].shape, generator=generator) for _ in range(STEPS - 1)]


@pytest.fixture(scope="module")
def fused_runs(moshi_dir: Path, adapters: list[Path]) -> list[Run]:
    """Batch-1 runs of moshi's fused models on the mixed batch's codes: adapter A, adapter B, none."""
    codes = _codes(_lm(moshi_dir), seed=0)
    references: list[Callable[[], LMModel]] = [
        lambda: _lm(moshi_dir, 0, adapters),
        lambda: _lm(moshi_dir, 1, adapters),
        lambda: _lm(moshi_dir),
    ]
    return [_run(reference(), 1, codes) for reference in references]


def _bank(lm: LMModel, adapters: list[Path], batch: int, max_rank: int, kernel: LoraKernel) -> AdapterBank:
    bank = AdapterBank(lm, batch_size=batch, slots=len(adapters), max_rank=max_rank, kernel=kernel)
    for slot, path in enumerate(adapters, start=1):
        bank.load(slot, read_adapter(path.read_bytes(), layer_shapes(lm), torch.device("cpu"), torch.float32))
    return bank


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_row_matches_its_adapter_fused_by_moshi(
    moshi_dir: Path, adapters: list[Path], fused_runs: list[Run], kernel: LoraKernel
) -> None:
    base = _lm(moshi_dir)
    codes = _codes(base, seed=0)
    bank = _bank(base, adapters, batch=4, max_rank=16, kernel=kernel)  # ranks 8 and 4 in rank-16 slots
    bank.assign(0, 1)
    bank.assign(1, 2)  # row 2: no adapter
    bank.assign(3, 1)  # adapter A's rows are not contiguous (0 and 3), adapter B's are (1)
    batched_logits, batched_codes = _run(base, 4, codes)

    expected = fused_runs
    for row, (logits, audio) in enumerate([*expected, expected[0]]):
        for step, (got, want) in enumerate(zip(batched_logits, logits, strict=True)):
            where = f"row {row} step {step}"
            torch.testing.assert_close(got[row : row + 1], want, atol=TOLERANCE, rtol=TOLERANCE, msg=where)
        assert [c[row : row + 1].tolist() for c in batched_codes] == [c.tolist() for c in audio], f"row {row}"
    assert batched_codes, "the acoustic delay ate every step"


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_switched_to_another_adapter_between_steps_runs_with_it_from_the_next_step(
    moshi_dir: Path, adapters: list[Path], kernel: LoraKernel
) -> None:
    """Mid-session (a Realtime `session.update` with `chorus_adapter`): row 0 runs with adapter A, then
    with B from step SWITCH on, keeping its streaming state; row 1 keeps A. The reference is moshi's fused
    A model whose weights are replaced by the fused B model's between the same two steps."""
    switch = STEPS // 2
    base = _lm(moshi_dir)
    codes = _codes(base, seed=2)
    bank = _bank(base, adapters, batch=2, max_rank=8, kernel=kernel)
    bank.assign(0, 1)
    bank.assign(1, 1)
    batched, _ = _run(base, 2, codes, lambda step: step == switch and bank.assign(0, 2))

    reference, fused_b = _lm(moshi_dir, 0, adapters), _lm(moshi_dir, 1, adapters)
    switched, _ = _run(
        reference, 1, codes, lambda step: step == switch and reference.load_state_dict(fused_b.state_dict())
    )
    kept_a, _ = _run(_lm(moshi_dir, 0, adapters), 1, codes)
    for step in range(STEPS):
        where = f"step {step}"
        torch.testing.assert_close(
            batched[step][0:1], switched[step], atol=TOLERANCE, rtol=TOLERANCE, msg=where
        )
        torch.testing.assert_close(
            batched[step][1:2], kept_a[step], atol=TOLERANCE, rtol=TOLERANCE, msg=where
        )
    assert (switched[switch] - kept_a[switch]).abs().max() > 100 * TOLERANCE, "B is not A at the switch"


def test_an_adapter_changes_its_row_and_removing_the_bank_restores_the_model(
    moshi_dir: Path, adapters: list[Path]
) -> None:
    lm = _lm(moshi_dir)
    generator = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, lm.card, (1, lm.num_codebooks - lm.dep_q - 1, 1), generator=generator)]
    plain, _ = _run(lm, 1, codes)
    bank = AdapterBank(lm, batch_size=1, slots=1, max_rank=8)
    bank.load(1, read_adapter(adapters[0].read_bytes(), layer_shapes(lm), torch.device("cpu"), torch.float32))
    assert not bank.in_use
    bank.assign(0, 1)
    assert bank.in_use
    adapted, _ = _run(lm, 1, codes)
    assert (adapted[0] - plain[0]).abs().max() > 100 * TOLERANCE
    bank.assign(0, NO_ADAPTER)  # the row leaves its adapter: the LoRA layers are the frozen ones again
    assert not bank.in_use
    unadapted, _ = _run(lm, 1, codes)
    torch.testing.assert_close(unadapted[0], plain[0], atol=0.0, rtol=0.0)
    bank.remove()
    again, _ = _run(lm, 1, codes)
    torch.testing.assert_close(again[0], plain[0], atol=0.0, rtol=0.0)


def test_an_adapter_for_another_architecture_is_refused_naming_the_tensor(
    moshi_dir: Path, adapters: list[Path]
) -> None:
    shapes: dict[str, Any] = dict(layer_shapes(_lm(moshi_dir)))
    shapes["depformer.layers.0.gating.0.linear_in"] = (7, 64)
    with pytest.raises(Unprocessable, match=r"depformer\.layers\.0\.gating\.0\.linear_in\.lora_B\.weight"):
        read_adapter(adapters[0].read_bytes(), shapes, torch.device("cpu"), torch.float32)


def _layers_bank(
    kernel: LoraKernel, *, static: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, AdapterBank]:
    """Two bias-free linear layers (no LM) with a 3-slot bank of rank 8: adapters of ranks 8, 4, 2. The
    second layer's input (18 values) is not 16 bytes wide: the grouped kernel pads it."""
    torch.manual_seed(3)
    layers = torch.nn.Sequential(torch.nn.Linear(32, 18, bias=False), torch.nn.Linear(18, 32, bias=False))
    layers = layers.to(dtype)
    bank = AdapterBank(layers, batch_size=5, slots=3, max_rank=8, kernel=kernel, static=static)
    for slot, rank in enumerate((8, 4, 2), start=1):
        shapes = {"0": (18, 32), "1": (32, 18)}
        tensors = {
            name: (torch.randn(rank, d_in, dtype=dtype) / 4, torch.randn(d_out, rank, dtype=dtype) / 4)
            for name, (d_out, d_in) in shapes.items()
        }
        bank.load(slot, AdapterTensors(rank, tensors))
    return layers, bank


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_a_priming_step_of_several_tokens_per_row_gets_each_rows_update(
    kernel: LoraKernel, dtype: torch.dtype, tolerance: float
) -> None:
    """A step with T > 1 tokens per row (the grouped kernel's group ends are in the flattened B * T rows),
    rows switching slots between steps: each row's output is the one of its adapter fused into the weights
    (computed in float32; bfloat16 is grouped_mm's CUDA dtype, within its rounding)."""
    layers, bank = _layers_bank(kernel, dtype=dtype)
    originals = [bank._originals[name].weight.detach().float() for name in ("0", "1")]
    x = torch.randn(5, 3, 32, dtype=dtype)
    for table in ([2, 0, 1, 3, 2], [0, 0, 0, 0, 0], [3, 3, 1, 0, 1]):
        for row, slot in enumerate(table):
            bank.assign(row, slot)
        with torch.no_grad():
            got = layers(x)
        for row, slot in enumerate(table):
            h = x[row].float()
            for name, weight in zip(("0", "1"), originals, strict=True):
                a, b = (
                    bank._layers[name].lora_A.weight[slot].float(),
                    bank._layers[name].lora_B.weight[slot].float(),
                )
                h = h @ (weight + b @ a[:, : weight.shape[1]]).T
            scale = tolerance * h.abs().max().item()
            torch.testing.assert_close(
                got[row].float(), h, atol=scale, rtol=tolerance, msg=f"{table} row {row}"
            )


def test_a_static_bank_runs_the_grouped_path_on_every_step_and_adds_nothing_without_adapters() -> None:
    """CHORUS_DIALOGUE_LORA_GRAPHS: the same kernels on every step (one CUDA graph for all); no row with an
    adapter adds exactly zero."""
    layers, bank = _layers_bank("grouped", static=True)
    x = torch.randn(5, 1, 32)
    with torch.no_grad():
        plain = bank._originals["1"](bank._originals["0"](x))
        assert bank.graph_safe and not bank.in_use
        torch.testing.assert_close(layers(x), plain, atol=0.0, rtol=0.0)
    with pytest.raises(ModelLoadError, match="grouped LoRA kernel"):
        AdapterBank(torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)), 2, 1, 8, static=True)
    with pytest.raises(ModelLoadError, match=r"rank bound \(6\) is not a multiple of 4"):  # 24 bytes
        AdapterBank(torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)), 2, 1, 6, kernel="grouped")
    with pytest.raises(ValidationError, match="dialogue_lora_graphs needs dialogue_lora_kernel grouped"):
        DialogueSettings(dialogue_lora_graphs=True, dialogue_lora_kernel="per_adapter")


def test_auto_is_the_per_adapter_kernel_on_the_cpu_unless_cuda_graphs_ask_for_the_grouped_one() -> None:
    layers = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    assert resolve_kernel("auto", layers, 8) == "per_adapter"  # bench/bench_lora.py: faster on the CPU
    assert resolve_kernel("auto", layers, 8, graphs=True) == "grouped"
    assert resolve_kernel("grouped", layers, 8) == "grouped"
    with pytest.raises(ModelLoadError, match=r"rank bound \(6\)"):
        resolve_kernel("auto", layers, 6, graphs=True)


def test_graphs_with_adapters_are_on_by_default_only_where_lmgen_replays_cuda_graphs() -> None:
    """CHORUS_DIALOGUE_LORA_GRAPHS unset: off on the CPU (no graphs to keep, the grouped path would only
    cost); an explicit choice is taken as it is (the settings refuse it with per_adapter)."""
    layers = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    assert resolve_graphs(None, layers, 8, "auto") is False
    assert resolve_graphs(None, layers, 8, "grouped") is False
    assert resolve_graphs(True, layers, 8, "auto") is True
    assert resolve_graphs(False, layers, 8, "grouped") is False
    assert DialogueSettings().dialogue_lora_graphs is None


class _Ops(TorchDispatchMode):
    """The aten ops a forward runs, each with its inputs' shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[tuple[int, ...], ...]]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def _step_ops(layers: torch.nn.Module, bank: AdapterBank, table: list[int]) -> list[tuple[str, Any]]:
    for row, slot in enumerate(table):
        bank.assign(row, slot)
    with torch.no_grad(), _Ops() as ops:
        layers(torch.randn(5, 1, 32))
    return ops.ops


def test_the_grouped_kernel_runs_the_same_ops_on_the_same_shapes_whatever_the_adapters_in_use() -> None:
    """What makes it CUDA-graph-safe: one adapter or three, the step is the same op sequence on the same
    shapes, with no host sync (`_local_scalar_dense` is what `.item()` / `bool(tensor)` run); the
    per_adapter kernel's op count grows with the adapters in use."""
    tables = ([1, 1, 1, 1, 1], [1, 2, 3, 1, 0], [3, 0, 0, 2, 0])
    layers, bank = _layers_bank("grouped")
    first, *others = [_step_ops(layers, bank, table) for table in tables]
    assert all(ops == first for ops in others)
    assert not any("_local_scalar_dense" in name for name, _ in first)
    layers, bank = _layers_bank("per_adapter")
    one, three = _step_ops(layers, bank, tables[0]), _step_ops(layers, bank, tables[1])
    assert len(three) > len(one)
