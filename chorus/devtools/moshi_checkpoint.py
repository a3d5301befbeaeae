"""A random-weight Moshi checkpoint in the layout Kyutai publishes (`kyutai/moshiko-pytorch-bf16`).

The directory holds what the hub repo holds, under the same names: `config.json` (the LM config plus the
file names), `model.safetensors` (the LM), `tokenizer-e351c8d8-checkpoint125.safetensors` (Mimi),
`tokenizer_spm_32k_3.model` (a real SentencePiece model, trained here on a generated corpus), and
`mimi_config.json` (newer repos ship one; here it lets a small Mimi load). `moshi.models.loaders.
CheckpointInfo` loads it exactly as it loads the real one, so tests and benchmarks exercise the
production loading path with no download. Speed does not depend on the values of the weights.

Sizes:
- small (default): a few-MB LM and Mimi, for tests;
- `full_size=True`: the published architectures (7B LM in bfloat16, about 15 GB, and the 79M Mimi). The
  LM is written tensor by tensor, so writing needs about one tensor of memory, not 15 GB; running it
  wants a GPU;
- `full_size_mimi=True` alone: the published Mimi with the small LM, what the CPU benchmark measures;
- `tiny=True`: smaller still (a 16-wide LM of one layer, a Mimi of 2 filters), so a CPU dialogue worker
  steps 100 sessions in about one tick and a benchmark of the conversation path measures the plumbing,
  not the model (`bench/bench_latency.py`).

Generation is seeded (the same files every time) and a finished directory is marked, so a second call
with the same sizes returns at once (the test suite's cache relies on it).
"""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

SEED = 1234
FORMAT_VERSION = 3
MARKER = ".chorus-checkpoint.json"

MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
MIMI_CONFIG_NAME = "mimi_config.json"

SMALL_TEXT_CARD = 1000
CODEBOOK_SCALE = 0.02  # about the spread of a random encoder's projected latents
FULL_TEXT_CARD = 32000

# Shrunk dims, the published structure (delays, depformer, codebooks) unchanged.
SMALL_LM = {
    "dim": 64,
    "num_heads": 4,
    "num_layers": 2,
    "hidden_scale": 2,
    "depformer_dim": 64,
    "depformer_num_heads": 4,
    "depformer_num_layers": 2,
    "depformer_dim_feedforward": 128,
    "text_card": SMALL_TEXT_CARD,
    "context": 100,
}
TINY_LM = {
    **SMALL_LM,
    "dim": 16,
    "num_heads": 2,
    "num_layers": 1,
    "depformer_dim": 16,
    "depformer_num_heads": 2,
    "depformer_num_layers": 1,
    "depformer_dim_feedforward": 32,
}

# Real words so persona primers tokenize into sensible pieces; invented ones give the BPE enough to merge.
_WORDS = """
the be to of and a in that have it for not on with he as you do at this but his by from they we say her
she or an will my one all would there their what so up out if about who get which go me when make can like
time no just him know take people into year your good some could them see other than then now look only
come its over think also back after use two how our work first well way even new want because any these give
day most us is are was were been has had did said hello hi hey yes okay sure thanks thank please sorry
welcome friend name pirate ship sea captain treasure island story tell talk listen question answer help
weather today tomorrow morning night music book movie food coffee tea water city home school teacher doctor
happy sad funny kind calm curious polite short long voice sound speak conversation assistant chorus moshi
really great nice cool wonderful right left little big small many much more very again here where why
""".split()  # noqa: SIM905 (a word list reads best as text)
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "el", "in", "on", "un", "ar"]
_COVERAGE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .?!,;:'\"()-"


def write_moshi_checkpoint(
    directory: Path, *, full_size: bool = False, full_size_mimi: bool | None = None, tiny: bool = False
) -> Path:
    """Write (or reuse) a checkpoint under `directory`; returns the directory.

    `full_size_mimi` defaults to `full_size`; set it alone for the published Mimi with the small LM.
    `tiny` shrinks both below the small sizes (a benchmark's model, not a full-size one).
    """
    if tiny and (full_size or full_size_mimi):
        raise ValueError("a tiny checkpoint is not full size")
    mimi_full = full_size if full_size_mimi is None else full_size_mimi
    small = "tiny" if tiny else "small"
    spec = {"format": FORMAT_VERSION, "seed": SEED, "lm": "full" if full_size else small}
    spec["mimi"] = "full" if mimi_full else small
    if _is_complete(directory, spec):
        return directory
    staging = directory.with_name(f"{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    text_card = FULL_TEXT_CARD if full_size else SMALL_TEXT_CARD
    _write_tokenizer(staging, text_card)
    mimi_config = _write_mimi(staging, full=mimi_full, tiny=tiny)
    _write_lm(staging, full=full_size, card=_mimi_card(mimi_config), tiny=tiny)
    (staging / MARKER).write_text(json.dumps(spec), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def published_architecture(*, full: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (LM config, Mimi config) this module writes: the published 7B LM and Mimi when `full`,
    else the small test sizes. The GPU benchmark builds the full pair in place (no file written)."""
    mimi_config = _mimi_config(full)
    return _lm_config(full, _mimi_card(mimi_config)), mimi_config


def _is_complete(directory: Path, spec: dict[str, Any]) -> bool:
    marker = directory / MARKER
    return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == spec


def _corpus_lines(words_wanted: int, lines: int) -> list[str]:
    rng = random.Random(SEED)
    words = set(_WORDS)
    while len(words) < words_wanted:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 5))))
    vocabulary = sorted(words)
    common = list(_WORDS)
    sentences = [_COVERAGE]
    for _ in range(lines):
        pool = common if rng.random() < 0.5 else vocabulary
        sentence = " ".join(rng.choice(pool) for _ in range(rng.randint(4, 14)))
        sentences.append(sentence.capitalize() + rng.choice(".?!"))
    return sentences


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A real SentencePiece BPE model with Moshi's special ids (0 unk, 1 bos, 2 eos, 3 pad)."""
    import sentencepiece as spm

    big = vocab_size > SMALL_TEXT_CARD
    lines = _corpus_lines(60_000 if big else 5_000, 60_000 if big else 20_000)
    model = io.BytesIO()  # trained in memory: no file paths end up inside the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        character_coverage=1.0,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    (directory / TOKENIZER_NAME).write_bytes(model.getvalue())


def _mimi_config(full: bool, tiny: bool = False) -> dict[str, Any]:
    from moshi.models import loaders

    config: dict[str, Any] = copy.deepcopy(loaders._mimi_config)
    if tiny:  # the convolutions at 24 kHz dominate a small Mimi's compute: fewest filters
        config["seanet"].update(n_filters=2, dimension=16, n_residual_layers=1)
        config["transformer"].update(
            d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, input_dimension=16
        )
        config["transformer"]["output_dimensions"] = [16]
        config["quantizer"].update(dimension=16, n_q=8, bins=256, input_dimension=16, output_dimension=16)
    elif not full:
        config["seanet"].update(n_filters=8, dimension=64)
        config["transformer"].update(
            d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, input_dimension=64
        )
        config["transformer"]["output_dimensions"] = [64]
        config["quantizer"].update(dimension=32, n_q=8, input_dimension=64, output_dimension=64)
    return config


def _mimi_card(mimi_config: dict[str, Any]) -> int:
    return int(mimi_config["quantizer"]["bins"])


def _write_mimi(directory: Path, *, full: bool, tiny: bool = False) -> dict[str, Any]:
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    config = _mimi_config(full, tiny)
    (directory / MIMI_CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.manual_seed(SEED)
    state = loaders.get_mimi(None, config, device="cpu").state_dict()
    # A fresh Mimi's codebooks are all zero (k-means fills them in training): every input would encode
    # to code 0. Random codebooks make the codes depend on the audio, as trained ones do.
    for name, value in state.items():
        if name.endswith("_codebook.embedding_sum"):
            state[name] = torch.randn(value.shape) * CODEBOOK_SCALE
        elif name.endswith("_codebook._initialized"):
            state[name] = torch.ones_like(value)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / MIMI_NAME))
    return config


def _lm_config(full: bool, card: int, tiny: bool = False) -> dict[str, Any]:
    from moshi.models import loaders

    config: dict[str, Any] = dict(loaders._lm_kwargs)
    if not full:
        config.update(TINY_LM if tiny else SMALL_LM)
    config["card"] = card
    return config


def _write_lm(directory: Path, *, full: bool, card: int, tiny: bool = False) -> None:
    import torch

    config = _lm_config(full, card, tiny)
    dtype = torch.bfloat16 if full else torch.float32
    _write_random_lm(directory / MOSHI_NAME, config, dtype)
    published = {
        **config,
        "moshi_name": MOSHI_NAME,
        "mimi_name": MIMI_NAME,
        "tokenizer_name": TOKENIZER_NAME,
        "mimi_config_name": MIMI_CONFIG_NAME,
        "model_type": "moshi",
    }
    (directory / "config.json").write_text(json.dumps(published, indent=2), encoding="utf-8")


def _write_random_lm(path: Path, config: dict[str, Any], dtype: Any) -> None:
    """Random LM weights, written one tensor at a time (the 7B never sits in memory as a whole).

    The shapes come from the model built on the `meta` device; values follow Moshi's own init
    (normal with std 1/sqrt(fan_in), norm scales at one).
    """
    import torch
    from moshi.models.lm import LMModel

    shapes = {
        name: tuple(t.shape) for name, t in LMModel(device="meta", dtype=dtype, **config).state_dict().items()
    }
    generator = torch.Generator().manual_seed(SEED)

    def tensor(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith(".alpha"):
            return torch.ones(shape, dtype=dtype)
        values: torch.Tensor = torch.randn(shape, generator=generator) * shape[-1] ** -0.5
        return values.to(dtype)

    _write_safetensors(path, shapes, dtype, tensor)


_SAFETENSORS_DTYPES = {"torch.float32": ("F32", 4), "torch.bfloat16": ("BF16", 2)}


def _write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: Any,
    make: Any,
    metadata: dict[str, str] | None = None,
) -> None:
    """The safetensors format, streamed: 8-byte header length, JSON header, then the raw tensors."""
    import torch

    code, width = _SAFETENSORS_DTYPES[str(dtype)]
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    names = sorted(shapes)
    for name in names:
        size = width * int(torch.Size(shapes[name]).numel())
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            value = make(name).contiguous()
            f.write(value.view(torch.uint8).numpy().tobytes())  # numpy has no bfloat16: raw bytes
