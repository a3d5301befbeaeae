"""`chorus dev make-checkpoints`' Moshi part: the published layout, loaded by moshi's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from moshi.models import loaders

from chorus.devtools.moshi_checkpoint import (
    MIMI_NAME,
    MOSHI_NAME,
    TOKENIZER_NAME,
    published_architecture,
    write_moshi_checkpoint,
)
from services.dialogue.batcher import Batcher
from services.dialogue.model import MoshiModel, build_random_moshi, checkpoint_info, load_moshi
from services.dialogue.settings import DialogueSettings
from shared.audio import FRAME_SAMPLES


def test_the_checkpoint_has_the_published_layout(moshi_dir: Path) -> None:
    files = {p.name for p in moshi_dir.iterdir() if not p.name.startswith(".")}
    assert files == {"config.json", MOSHI_NAME, MIMI_NAME, TOKENIZER_NAME, "mimi_config.json"}
    config = json.loads((moshi_dir / "config.json").read_text())
    assert config["moshi_name"] == MOSHI_NAME and config["mimi_name"] == MIMI_NAME
    assert config["delays"] == loaders._lm_kwargs["delays"], "the structure is Moshi's, only smaller"


def test_it_loads_through_checkpoint_info_with_a_real_tokenizer(moshi_model: MoshiModel) -> None:
    assert moshi_model.tokenizer.vocab_size() == moshi_model.lm.text_card
    assert moshi_model.tokenizer.pad_id() == moshi_model.lm.text_padding_token_id
    assert moshi_model.mimi.num_codebooks == moshi_model.lm.dep_q
    pieces = [moshi_model.text_piece(t) for t in moshi_model.encode_text("Hello friend")]
    assert "".join(pieces) == " Hello friend", "pieces render as moshi's server renders them"


def test_a_local_directory_overrides_the_hub(moshi_dir: Path) -> None:
    info = checkpoint_info(DialogueSettings(moshi_dir=moshi_dir))
    assert info.moshi_weights == moshi_dir / MOSHI_NAME and info.tokenizer == moshi_dir / TOKENIZER_NAME


def test_a_finished_checkpoint_is_reused_not_rewritten(moshi_dir: Path) -> None:
    before = (moshi_dir / MOSHI_NAME).stat().st_mtime_ns
    assert write_moshi_checkpoint(moshi_dir) == moshi_dir
    assert (moshi_dir / MOSHI_NAME).stat().st_mtime_ns == before


def test_generation_is_deterministic(moshi_dir: Path, tmp_path: Path) -> None:
    again = write_moshi_checkpoint(tmp_path / "moshi")
    for name in ("config.json", MOSHI_NAME, MIMI_NAME, TOKENIZER_NAME):
        assert (again / name).read_bytes() == (moshi_dir / name).read_bytes(), name


def test_the_published_bfloat16_lm_format_loads_through_moshi(tmp_path: Path) -> None:
    """The full-size LM is streamed to disk in bfloat16 (too big to hold): the same writer, small dims."""
    import torch

    from chorus.devtools.moshi_checkpoint import _lm_config, _write_random_lm

    config = _lm_config(full=False, card=2048)
    _write_random_lm(tmp_path / MOSHI_NAME, config, torch.bfloat16)
    lm = loaders.get_moshi_lm(tmp_path / MOSHI_NAME, lm_kwargs=config, device="cpu", dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16
    assert all(torch.isfinite(p.float()).all() for p in lm.parameters())


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in module.state_dict().items()}


def test_the_published_architecture_is_built_in_place_with_no_checkpoint(moshi_dir: Path) -> None:
    """What the GPU benchmark runs, built here on `meta` (shapes, no memory): the 7B LM and the 79M Mimi."""
    lm_config, mimi_config = published_architecture(full=True)
    model = build_random_moshi(
        lm_config, mimi_config, moshi_dir / TOKENIZER_NAME, torch.device("meta"), torch.bfloat16
    )
    assert 7.6e9 < sum(p.numel() for p in model.lm.parameters()) < 7.8e9
    assert 79e6 < sum(p.numel() for p in model.mimi.parameters()) < 80e6
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
    assert model.mimi.num_codebooks == model.lm.dep_q


def test_a_random_build_has_the_checkpoints_shapes_and_runs_the_batcher(
    moshi_dir: Path, moshi_model: MoshiModel
) -> None:
    lm_config, mimi_config = published_architecture(full=False)
    built = build_random_moshi(
        lm_config, mimi_config, moshi_dir / TOKENIZER_NAME, torch.device("cpu"), torch.float32
    )
    assert _shapes(built.lm) == _shapes(moshi_model.lm) and _shapes(built.mimi) == _shapes(moshi_model.mimi)
    rng = np.random.default_rng(0)
    voices = torch.from_numpy((rng.standard_normal((2, 1, FRAME_SAMPLES)) * 0.3).astype(np.float32))
    with torch.no_grad():
        codes = built.mimi.encode(voices)
    assert not torch.equal(codes[0], codes[1]), "random codebooks: the codes depend on the audio"
    batcher = Batcher(built, 2)
    try:
        batcher.join("s")
        for _ in range(batcher.delay + 2):
            outputs = batcher.step((rng.standard_normal((2, FRAME_SAMPLES)) * 0.3).astype(np.float32))
    finally:
        batcher.close()
    assert outputs[0].pcm is not None and outputs[0].pcm.shape == (FRAME_SAMPLES,)


def test_the_tiny_checkpoint_for_the_plumbing_benchmark_loads_and_steps_like_the_small_one(
    tmp_path: Path,
) -> None:
    tiny = write_moshi_checkpoint(tmp_path / "moshi-tiny", tiny=True)
    model = load_moshi(DialogueSettings(moshi_dir=tiny, dialogue_device="cpu"))
    assert model.lm.dim == 16 and model.mimi.num_codebooks == model.lm.dep_q, "Moshi's structure, tinier"
    batcher = Batcher(model, 2)
    rng = np.random.default_rng(0)
    try:
        batcher.join("s")
        for _ in range(batcher.delay + 2):
            outputs = batcher.step((rng.standard_normal((2, FRAME_SAMPLES)) * 0.3).astype(np.float32))
    finally:
        batcher.close()
    assert outputs[0].pcm is not None and outputs[0].pcm.shape == (FRAME_SAMPLES,)
