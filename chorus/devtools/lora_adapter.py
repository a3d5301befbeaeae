"""`chorus dev make-adapter OUT --checkpoint DIR`: a random LoRA adapter in moshi-finetune's layout.

For each linear layer of the checkpoint's LM (every one: moshi's `replace_all_linear_with_lora` wraps
them all) the file holds `{layer}.lora_A.weight` [rank, in] and `{layer}.lora_B.weight` [out, rank], and
its metadata names `lora_rank` and `lora_scaling`, what moshi's loaders read. Unlike a fresh LoRA (B all
zero) both factors are random, so the adapter visibly changes the model: tests and benchmarks need that.
Written tensor by tensor (a rank-128 adapter of the 7B is several hundred MB); seeded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys of a published config.json that are not LMModel arguments (moshi's CheckpointInfo pops them).
_NOT_LM_KWARGS = (
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
)
# B's spread against A's: the update is about a tenth of the layer's own output (scaling 2).
_B_SCALE = 0.05


def checkpoint_layers(checkpoint: Path) -> tuple[dict[str, tuple[int, int]], Any]:
    """(out, in) of every linear layer of the checkpoint's LM, and its dtype (built on `meta`: no memory)."""
    import torch
    from moshi.models import loaders

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    lm_kwargs = {k: v for k, v in config.items() if k not in _NOT_LM_KWARGS}
    dtype = _weights_dtype(checkpoint / config.get("moshi_name", "model.safetensors"))
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="meta", dtype=dtype)
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in lm.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return shapes, dtype


def _weights_dtype(weights: Path) -> Any:
    """The dtype the LM's weights are stored in (read from the safetensors header alone)."""
    import struct

    import torch

    with weights.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    codes = {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    return torch.bfloat16 if codes == {"BF16"} else torch.float32


def write_random_adapter(
    out: Path, checkpoint: Path, *, rank: int = 8, scaling: float = 2.0, seed: int = 0
) -> Path:
    """Write a random adapter for the checkpoint's LM to `out` (a .safetensors file); returns `out`."""
    import torch

    from chorus.devtools.moshi_checkpoint import _write_safetensors

    layers, dtype = checkpoint_layers(checkpoint)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (out_features, in_features) in layers.items():
        shapes[f"{layer}.lora_A.weight"] = (rank, in_features)
        shapes[f"{layer}.lora_B.weight"] = (out_features, rank)
    generator = torch.Generator().manual_seed(seed)

    def tensor(name: str) -> torch.Tensor:
        shape = shapes[name]
        spread = shape[-1] ** -0.5 * (_B_SCALE if name.endswith("lora_B.weight") else 1.0)
        values: torch.Tensor = torch.randn(shape, generator=generator) * spread
        return values.to(dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"lora_rank": str(rank), "lora_scaling": str(scaling)}
    _write_safetensors(out, shapes, dtype, tensor, metadata)
    return out
