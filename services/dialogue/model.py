"""Loading one Moshi checkpoint (LM, Mimi, text tokenizer) through `moshi.models.loaders.CheckpointInfo`.

A local directory (CHORUS_MOSHI_DIR) is read with the file names its `config.json` gives, exactly as the
hub repo is (newer Kyutai repos ship a config.json); a directory without one is taken as the legacy
7B layout under the published file names. Otherwise the files come from the hub repo.

A `-q8` checkpoint (config `"quantize": true`, `model.q8.safetensors`) is read into torch-native int8
layers (services/dialogue/quantized.py) where moshi would build bitsandbytes ones; CHORUS_DIALOGUE_WEIGHTS
and CHORUS_DIALOGUE_KV_CACHE make a float checkpoint's LM int8 at load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel
    from sentencepiece import SentencePieceProcessor

    from services.dialogue.settings import DialogueSettings

log = logging.getLogger(__name__)

# The published file names (moshi.models.loaders uses the same defaults).
MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"


@dataclass(frozen=True)
class MoshiModel:
    """Everything a dialogue worker runs: the codec, the LM, the text tokenizer, and what they are."""

    mimi: MimiModel
    lm: LMModel
    tokenizer: SentencePieceProcessor
    name: str  # moshiko / moshika: the voice it speaks with
    source: str  # the repo or directory it came from
    device: torch.device

    def text_piece(self, token: int) -> str:
        """A text token as moshi's server sends it: '' for padding, the piece with '▁' as a space."""
        padding = (self.lm.text_padding_token_id, self.lm.end_of_text_padding_id)
        if token in padding or not 0 <= token < self.tokenizer.vocab_size():
            return ""
        piece: str = self.tokenizer.id_to_piece(token)
        return piece.replace("▁", " ")

    def encode_text(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text)
        return ids


def resolve_device(choice: str) -> torch.device:
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CHORUS_DIALOGUE_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    import torch

    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, choice)
    return dtype


def model_name(settings: DialogueSettings) -> str:
    if settings.dialogue_model:
        return settings.dialogue_model
    source = str(settings.moshi_dir) if settings.moshi_dir else settings.moshi_repo
    return "moshika" if "moshika" in source.lower() else "moshiko"


def checkpoint_info(settings: DialogueSettings) -> Any:
    """The CheckpointInfo for the configured directory or repo (the repo may download)."""
    from moshi.models import loaders

    if settings.moshi_dir is None:
        return loaders.CheckpointInfo.from_hf_repo(settings.moshi_repo)
    directory = settings.moshi_dir
    config_path = directory / "config.json"
    if not config_path.is_file():
        # A local copy of a legacy repo: the published 7B config under the published names.
        files = {"moshi_weights": MOSHI_NAME, "mimi_weights": MIMI_NAME, "tokenizer": TOKENIZER_NAME}
        return loaders.CheckpointInfo(**{k: _required(directory, v) for k, v in files.items()})
    config = json.loads(config_path.read_text(encoding="utf-8"))
    mimi_config = config.get("mimi_config_name")
    return loaders.CheckpointInfo.from_hf_repo(
        settings.moshi_repo,
        moshi_weights=_required(directory, config.get("moshi_name", MOSHI_NAME)),
        mimi_weights=_required(directory, config.get("mimi_name", MIMI_NAME)),
        tokenizer=_required(directory, config.get("tokenizer_name", TOKENIZER_NAME)),
        config_path=config_path,
        mimi_config_path=_required(directory, mimi_config) if mimi_config else None,
    )


def _required(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise ModelLoadError(f"checkpoint directory {directory} has no {name}")
    return path


def load_moshi(settings: DialogueSettings) -> MoshiModel:
    """Load the checkpoint on the configured device. Blocking: call it from a thread."""
    device = resolve_device(settings.dialogue_device)
    dtype = resolve_dtype(settings.dialogue_dtype, device)
    source = str(settings.moshi_dir) if settings.moshi_dir else settings.moshi_repo
    try:
        info = checkpoint_info(settings)
        mimi = info.get_mimi(device)
        lm = load_lm(info, device, dtype, settings)
        tokenizer = info.get_text_tokenizer()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load the Moshi checkpoint from {source}: {exc}") from exc
    log.info(
        "moshi checkpoint loaded",
        extra={
            "source": source,
            "device": str(device),
            "dtype": str(dtype),
            "weights": settings.dialogue_weights,
            "kv_cache": settings.dialogue_kv_cache,
            "context": lm.context,
            "text_card": lm.text_card,
        },
    )
    return MoshiModel(mimi, lm, tokenizer, model_name(settings), source, device)


def load_lm(info: Any, device: torch.device, dtype: torch.dtype, settings: DialogueSettings) -> LMModel:
    """The LM as moshi loads it, made lean as the settings ask (int8 weights, int8 KV cache)."""
    from services.dialogue.quantized import make_lean

    if info.lm_config and info.lm_config.get("quantize"):
        lm = _load_q8_lm(info, device, dtype)
    else:
        lm = info.get_moshi(device, dtype=dtype)
    make_lean(
        lm,
        int8_weights=settings.dialogue_weights == "int8",
        int8_kv=settings.dialogue_kv_cache == "int8",
        dtype=dtype,
    )
    set_context(lm, settings.dialogue_context)
    return lm


def set_context(lm: LMModel, frames: int | None) -> None:
    """The LM attends over `frames` past steps (None: the checkpoint's context), before streaming starts:
    the main transformer's attention window and KV cache length (a session's cache is allocated at it),
    and `lm.context`, which the rollover's default follows. The depformer's cache (its 8 steps) is left
    as it is."""
    if frames is None or frames == lm.context:
        return
    if lm.context is None or frames > lm.context:
        raise ModelLoadError(
            f"CHORUS_DIALOGUE_CONTEXT ({frames}) is past the checkpoint's context of {lm.context} frames: "
            "the model was not trained to attend further"
        )
    from moshi.modules.transformer import set_attention_context

    set_attention_context(lm.transformer, frames)
    lm.context = frames


def _load_q8_lm(info: Any, device: torch.device, dtype: torch.dtype) -> LMModel:
    """A `-q8` checkpoint as moshi's loader reads it (LMModel on the meta device, the state assigned),
    with torch-native Int8Linear layers where moshi builds bitsandbytes ones; the int8 weights kept as
    stored (a float weight is refused), their row scales (`*_scb`) in float32, the other float tensors
    cast to `dtype`."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import load_file

    from services.dialogue.quantized import Int8Linear, replace_linears

    lm_config = {k: v for k, v in info.lm_config.items() if k != "quantize"}
    lm = loaders.get_moshi_lm(None, lm_config, device="meta", dtype=dtype)
    replace_linears(lm, quantize=False)
    state = load_file(str(info.moshi_weights), device=str(device))
    for key, value in state.items():
        if key.endswith("_scb"):
            state[key] = value.float()
        elif value.dtype.is_floating_point:
            state[key] = value.to(dtype)
    lm.load_state_dict(state, assign=True)
    # load_state_dict checks names and shapes, not dtypes: float weights would be scaled as int8 ones.
    for name, module in lm.named_modules():
        if isinstance(module, Int8Linear) and module.weight.dtype != torch.int8:
            raise ModelLoadError(
                f"{info.moshi_weights} is a -q8 checkpoint (config `quantize`) whose {name}.weight is "
                f"{module.weight.dtype}, not int8"
            )
    return lm.eval()


# About the spread of a random encoder's projected latents (as chorus.devtools.moshi_checkpoint uses).
_RANDOM_CODEBOOK_SCALE = 0.02


def build_random_moshi(
    lm_config: dict[str, Any],
    mimi_config: dict[str, Any],
    tokenizer: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    seed: int = 0,
) -> MoshiModel:
    """An architecture with random weights, built in place on `device`: no checkpoint is written or read.

    For the full-size GPU benchmark: writing the 7B LM to disk and reading it back costs minutes and
    15 GB on every fresh machine, and a step's cost does not depend on the weights' values. The LM is
    built as `loaders.get_moshi_lm` builds it (LMModel on the device in `dtype`, moshi's own init, eval
    mode); Mimi as `loaders.get_mimi` does, with random codebooks (a fresh Mimi's are all zero, so every
    input would encode to code 0). Weights only: the text tokenizer is read from `tokenizer`.
    """
    import sentencepiece
    import torch
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    torch.manual_seed(seed)
    with torch.device(device):
        lm = LMModel(device=device, dtype=dtype, **lm_config).eval()
        mimi = loaders.get_mimi(None, mimi_config, device=device)
        for name, buffer in mimi.named_buffers():
            if name.endswith("_codebook.embedding_sum"):
                buffer.normal_(std=_RANDOM_CODEBOOK_SCALE)
            elif name.endswith("_codebook._initialized"):
                buffer.fill_(1)
    text = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    log.info("random moshi built", extra={"device": str(device), "dtype": str(dtype)})
    return MoshiModel(mimi, lm, text, "moshiko", "random:published-architecture", device)
