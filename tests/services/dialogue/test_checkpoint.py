"""`chorus dev make-checkpoints`' Moshi part: the published layout, loaded by moshi's own loader."""

from __future__ import annotations

import json
from pathlib import Path

from moshi.models import loaders

from chorus.devtools.moshi_checkpoint import MIMI_NAME, MOSHI_NAME, TOKENIZER_NAME, write_moshi_checkpoint
from services.dialogue.model import MoshiModel, checkpoint_info
from services.dialogue.settings import DialogueSettings


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
