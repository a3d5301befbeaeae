"""A random-weight Pocket TTS checkpoint in the layout `CHORUS_TTS_DIR` expects.

    DIR/config.yaml        a Pocket TTS config (a shipped one, with local file names)
    DIR/model.safetensors  the whole TTSModel state dict (flow LM + Mimi), as the published weights
    DIR/tokenizer.*        a real tokenizer trained on a generated English corpus
    DIR/embeddings/{name}.safetensors  a state per catalog voice (`alba`, `marius`...), computed by this
                           model from a generated clip and exported as Pocket TTS exports its own: the
                           published layout (`languages/{config}/embeddings/` next to the weights)
    DIR/embeddings/catalog.json  the catalog's language and the published config it was made from

Small by default: the shipped 2M-parameter English architecture (`english_2m_2026-10.yaml`, SentencePiece
tokenizer), for tests. `full_size=True`: the published English architecture (`english.yaml`, 106M
parameters, `tokenizers` JSON tokenizer), for benchmarks; speed does not depend on the weights' values.
`config_name`: any shipped config (`english_7m_2026-10`, `english_18m_2026-10`...), its own tokenizer
kind.
Paths inside config.yaml are relative to DIR (the TTS loader resolves them), so the directory can move.
Generation is deterministic and skipped when DIR already holds a complete checkpoint of that size.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

SMALL_CONFIG = "english_2m_2026-10"
FULL_CONFIG = "english"
WEIGHTS = "model.safetensors"
MARKER = ".complete"
SEED = 20_240_917
FORMAT = 3  # bump when what is written changes: cached checkpoints of another format are rewritten
CATALOG_CLIP_S = 2.0

_WORD_TEXT = (
    "the a an and or but if when while because so then now here there this that these those i you he "
    "she it we they me him her us them my your his its our their what who which where why how yes no "
    "not all any some many much more most few little one two three four five six seven eight nine ten "
    "hello hi hey thanks thank please sorry okay sure well right good great nice fine bad new old big "
    "small long short first last next early late today tomorrow yesterday morning evening night day "
    "week year time people person man woman child friend family home house room door window table chair "
    "city street car train music song book story idea question answer problem reason way thing world "
    "is are was were be been being have has had do does did can could will would should may might must "
    "say said tell told ask asked think thought know knew want need like love see saw look hear listen "
    "speak talk go went come came make made take took give gave get got find found keep help try call "
    "work play run walk read write open close start stop begin end turn move live feel seem leave "
    "really very just also still only even again always never often maybe perhaps almost enough about "
    "with without from into onto over under after before between through during against around toward "
    "weather coffee water lunch dinner voice sound quiet loud happy sad tired curious interesting simple"
)
_WORDS = _WORD_TEXT.split()
_PUNCTUATION = (".", ".", ".", "?", "!", ",", ";", ":")


def _corpus(lines: int, seed: int = SEED) -> list[str]:
    """Sentences of common words with punctuation and digits: enough for a tokenizer to learn subwords."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 1999)))
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] += ","
        words[0] = words[0].capitalize()
        corpus.append(" ".join(words) + rng.choice(_PUNCTUATION))
    return corpus


def _train_sentencepiece(directory: Path, corpus: list[str]) -> tuple[str, int]:
    import sentencepiece as spm

    corpus_file = directory / "corpus.txt"
    corpus_file.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=1000,
        hard_vocab_limit=False,
        model_type="bpe",
        num_threads=1,
        minloglevel=2,
    )
    corpus_file.unlink()
    (directory / "tokenizer.vocab").unlink(missing_ok=True)  # a human-readable copy nobody loads
    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    return "tokenizer.model", int(processor.vocab_size())


def _train_json_tokenizer(directory: Path, corpus: list[str]) -> tuple[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    # Pocket TTS decodes token spans back to text when it splits sentences: without the matching
    # decoder the text would come back as 'Ġword' and be re-tokenized into many more tokens.
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return "tokenizer.json", int(tokenizer.get_vocab_size())


def _published(config_name: str) -> dict[str, Any]:
    import yaml
    from pocket_tts.utils.config import CONFIGS_DIR

    with open(CONFIGS_DIR / f"{config_name}.yaml", encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


def _config(config_name: str, tokenizer_name: str, n_bins: int) -> dict[str, Any]:
    config = _published(config_name)
    config.pop("weights_path_without_voice_cloning", None)
    config["weights_path"] = WEIGHTS
    config["flow_lm"]["lookup_table"].update(tokenizer_path=tokenizer_name, n_bins=n_bins)
    return config


def _random_weights(directory: Path, config: dict[str, Any]) -> None:
    """Build the model from its config with random weights and save its state dict as the weights."""
    import safetensors.torch
    import torch
    import yaml
    from pocket_tts.models.tts_model import TTSModel

    bare = {**config, "flow_lm": {**config["flow_lm"]}}
    bare.pop("weights_path")
    table = dict(bare["flow_lm"]["lookup_table"])
    table["tokenizer_path"] = str(directory / table["tokenizer_path"])
    bare["flow_lm"]["lookup_table"] = table
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        bare_file = Path(tmp) / "bare.yaml"
        bare_file.write_text(yaml.safe_dump(bare, allow_unicode=True), encoding="utf-8")
        model = TTSModel.load_model(config=str(bare_file))
    # The loader leaves the speaker projection at zero without weights: every voice would condition the
    # model identically. Random values make different reference clips give different voice states.
    with torch.no_grad():
        model.flow_lm.speaker_proj_weight.normal_(std=0.02)
    safetensors.torch.save_file(model.state_dict(), str(directory / WEIGHTS))


def _synthetic_clip(name: str) -> Any:
    """A voice-like clip of its own per catalog name: a harmonic buzz at a pitch drawn from the name,
    with a syllable-rate envelope and a little noise (random weights clone nothing real anyway)."""
    import numpy as np

    rng = np.random.default_rng([SEED, *name.encode()])
    rate = 24_000
    t = np.arange(int(CATALOG_CLIP_S * rate)) / rate
    f0 = rng.uniform(90.0, 240.0) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    buzz = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t) ** 2
    clip = 0.2 * buzz * envelope + 0.01 * rng.standard_normal(len(t))
    return clip.astype(np.float32)


def _catalog(directory: Path, config_name: str) -> None:
    """A state per published catalog name, computed by the checkpoint's own model (loaded through the
    published loader) and exported as Pocket TTS exports its states."""
    import json

    import torch
    from pocket_tts.models.model_state import export_model_state
    from pocket_tts.models.tts_model import TTSModel
    from pocket_tts.utils.utils import _ORIGINS_OF_PREDEFINED_VOICES

    from services.tts.pocket_config import CATALOG_DIR, CATALOG_INFO, resolve

    choice = resolve(directory, config_name)
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(yaml.safe_dump(choice.config, allow_unicode=True), encoding="utf-8")
        model = TTSModel.load_model(config=str(config_file))
    folder = directory / CATALOG_DIR
    folder.mkdir(exist_ok=True)
    for name in sorted(_ORIGINS_OF_PREDEFINED_VOICES):
        clip = torch.from_numpy(_synthetic_clip(name))[None, :]
        export_model_state(model.get_state_for_audio_prompt(clip), folder / f"{name}.safetensors")
    info = {"language": config_name.split("_", 1)[0], "config": config_name}
    (folder / CATALOG_INFO).write_text(json.dumps(info) + "\n", encoding="utf-8")


def write_tts_checkpoint(directory: Path, *, full_size: bool = False, config_name: str | None = None) -> Path:
    """Write (or reuse) a random-weight Pocket TTS checkpoint in `directory`; returns the directory.
    `config_name`: the shipped config to copy (default: the small one, or `english` with `full_size`)."""
    import yaml

    config_name = config_name or (FULL_CONFIG if full_size else SMALL_CONFIG)
    variant = f"{config_name} v{FORMAT}"
    marker = directory / MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == variant:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    json_tokenizer = _published(config_name)["flow_lm"]["lookup_table"].get("tokenizer") == "tokenizers"
    corpus = _corpus(20_000 if json_tokenizer else 3000)
    train = _train_json_tokenizer if json_tokenizer else _train_sentencepiece
    tokenizer_name, n_bins = train(directory, corpus)
    config = _config(config_name, tokenizer_name, n_bins)
    _random_weights(directory, config)
    header = f"# Random-weight Pocket TTS checkpoint ({variant}); paths are relative to this directory.\n"
    (directory / "config.yaml").write_text(
        header + yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    _catalog(directory, config_name)
    marker.write_text(variant + "\n", encoding="utf-8")
    return directory
