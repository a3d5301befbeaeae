"""Per-row LoRA: in one batched step, each row's text logits and audio codes are those of a batch-1 model
with that row's adapter fused by moshi's own code (`get_moshi_lm(..., lora_weights, fuse_lora=True)`,
which ends in `replace_lora_with_linear`); a row with no adapter is the plain model's.

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

from chorus.devtools.lora_adapter import write_random_adapter
from services.dialogue.adapters import NO_ADAPTER, AdapterBank, layer_shapes, read_adapter
from shared.errors import Unprocessable

STEPS = 6
TOLERANCE = 1e-4


def _lm(moshi_dir: Path, adapter: Path | None = None) -> LMModel:
    config = json.loads((moshi_dir / "config.json").read_text(encoding="utf-8"))
    kwargs = {k: v for k, v in config.items() if not k.endswith("_name") and k != "model_type"}
    if adapter is not None:
        kwargs |= {"lora": True, "lora_rank": 8, "lora_scaling": 2.0}
    return loaders.get_moshi_lm(
        moshi_dir / "model.safetensors",
        lm_kwargs=kwargs,
        device="cpu",
        dtype=torch.float32,
        lora_weights=adapter,
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
    return [write_random_adapter(folder / f"{n}.safetensors", moshi_dir, seed=n) for n in (1, 2)]


def test_each_row_matches_its_adapter_fused_by_moshi(moshi_dir: Path, adapters: list[Path]) -> None:
    base = _lm(moshi_dir)
    generator = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, base.card, (1, base.num_codebooks - base.dep_q - 1, 1), generator=generator)]
    codes += [torch.randint(0, base.card, codes[0].shape, generator=generator) for _ in range(STEPS - 1)]

    bank = AdapterBank(base, batch_size=4, slots=2, max_rank=16)  # rank 8 adapters in rank-16 slots
    shapes = layer_shapes(base)
    for slot, path in enumerate(adapters, start=1):
        bank.load(slot, read_adapter(path.read_bytes(), shapes, torch.device("cpu"), torch.float32))
    bank.assign(0, 1)
    bank.assign(1, 2)  # row 2: no adapter
    bank.assign(3, 1)  # adapter A's rows are not contiguous (0 and 3), adapter B's are (1)
    batched_logits, batched_codes = _run(base, 4, codes)

    references: list[Callable[[], LMModel]] = [
        lambda: _lm(moshi_dir, adapters[0]),
        lambda: _lm(moshi_dir, adapters[1]),
        lambda: _lm(moshi_dir),
    ]
    expected = [_run(reference(), 1, codes) for reference in references]
    for row, (logits, audio) in enumerate([*expected, expected[0]]):
        for step, (got, want) in enumerate(zip(batched_logits, logits, strict=True)):
            where = f"row {row} step {step}"
            torch.testing.assert_close(got[row : row + 1], want, atol=TOLERANCE, rtol=TOLERANCE, msg=where)
        assert [c[row : row + 1].tolist() for c in batched_codes] == [c.tolist() for c in audio], f"row {row}"
    assert batched_codes, "the acoustic delay ate every step"


def test_a_row_switched_to_another_adapter_between_steps_runs_with_it_from_the_next_step(
    moshi_dir: Path, adapters: list[Path]
) -> None:
    """Mid-session (a Realtime `session.update` with `chorus_adapter`): row 0 runs with adapter A, then
    with B from step SWITCH on, keeping its streaming state; row 1 keeps A. The reference is moshi's fused
    A model whose weights are replaced by the fused B model's between the same two steps."""
    switch = STEPS // 2
    base = _lm(moshi_dir)
    generator = torch.Generator().manual_seed(2)
    codes = [torch.randint(0, base.card, (1, base.num_codebooks - base.dep_q - 1, 1), generator=generator)]
    codes += [torch.randint(0, base.card, codes[0].shape, generator=generator) for _ in range(STEPS - 1)]
    bank = AdapterBank(base, batch_size=2, slots=2, max_rank=8)
    for slot, path in enumerate(adapters, start=1):
        bank.load(
            slot, read_adapter(path.read_bytes(), layer_shapes(base), torch.device("cpu"), torch.float32)
        )
    bank.assign(0, 1)
    bank.assign(1, 1)
    batched, _ = _run(base, 2, codes, lambda step: step == switch and bank.assign(0, 2))

    reference, fused_b = _lm(moshi_dir, adapters[0]), _lm(moshi_dir, adapters[1])
    switched, _ = _run(
        reference, 1, codes, lambda step: step == switch and reference.load_state_dict(fused_b.state_dict())
    )
    kept_a, _ = _run(_lm(moshi_dir, adapters[0]), 1, codes)
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
