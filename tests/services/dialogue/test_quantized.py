"""int8 weights and the int8 KV cache on the small checkpoint: the worker (through Redis), its loader and
its Batcher run them, and the LM stays close to the float one on the same inputs.

The tolerance: symmetric int8 with one scale per row rounds each weight (or cached key/value) by at most
half a step of absmax / 127, about 0.5 % of a row's largest value; through the small LM's layers
that comes to 0.5-2 % relative L2 on the text logits (bench/results/quant.json). 5 % leaves room for
seeds and dtypes; a wrong scale, a transposed weight or a cache slot written at the wrong position
gives differences of the order of the logits themselves (100 %).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bench.bench_quant import logits_difference, random_codes, streaming_text_logits
from services.dialogue import int8_attention, quantized
from services.dialogue.batcher import Batcher
from services.dialogue.int8_attention import triton_reads
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.quantized import (
    Int8KVCache,
    Int8Linear,
    Int8Read,
    LeanAttention,
    int8_read_of,
    kernel_for,
    resolve_int8_read,
    set_int8_read,
    w8a8_matmul,
)
from shared.audio import FRAME_BYTES, FRAME_SAMPLES, float_to_pcm16
from shared.bus import Bus
from shared.errors import ModelLoadError
from shared.messages import EventName, SessionStart, SessionStop, UserAudio
from tests.services.dialogue.conftest import DialogueReader, RunningWorker, settings_for
from tests.services.dialogue.test_batcher import GREEDY, tokens, user_audio
from tests.services.dialogue.test_rollover import STEPS as ROLLOVER_STEPS
from tests.services.dialogue.test_rollover import talk
from tests.support.sessions import open_session

STEPS = 32
MAX_L2_RELATIVE = 0.05
MIN_TOKEN_AGREEMENT = 0.85


def lean_model(moshi_dir: Path, weights: str, kv_cache: str, *, int8_read: Int8Read = "auto") -> MoshiModel:
    """`int8_read`: how the int8 cache is read ("auto" is the copy on a CPU, where moshi compiles
    nothing; "compiled" runs what a compiling CUDA worker runs, "triton" the Triton kernel, in Triton's
    interpreter with the `triton_interpreter` fixture)."""
    model = load_moshi(settings_for(moshi_dir, dialogue_weights=weights, dialogue_kv_cache=kv_cache))
    set_int8_read(model.lm, int8_read)
    return model


@pytest.mark.parametrize(("weights", "kv_cache"), [("int8", "float"), ("float", "int8"), ("int8", "int8")])
def test_an_int8_lm_streams_close_to_the_float_one(
    moshi_model: MoshiModel, moshi_dir: Path, weights: str, kv_cache: str
) -> None:
    model = lean_model(moshi_dir, weights, kv_cache)
    linears = [m for m in model.lm.modules() if isinstance(m, torch.nn.Linear | Int8Linear)]
    assert all(isinstance(m, Int8Linear) for m in linears) == (weights == "int8")

    codes = random_codes(model.lm, 2, STEPS, seed=3)
    difference = logits_difference(
        streaming_text_logits(moshi_model.lm, codes), streaming_text_logits(model.lm, codes)
    )
    assert 0 < difference["l2_relative"] < MAX_L2_RELATIVE, difference
    assert difference["text_token_agreement"] >= MIN_TOKEN_AGREEMENT, difference


# The compiled read is held to torch's attention in test_int8_attention.py. Run through the LM here on the
# CPU (inductor), it left a later test's exact greedy tokens flaky in the full suite (cause not found):
# the LM-level path is the Triton read's, which takes the same route through LeanAttention.
@pytest.mark.parametrize("int8_read", ["triton"])
def test_the_in_place_reads_of_the_int8_cache_give_the_copys_logits(
    moshi_dir: Path, monkeypatch: pytest.MonkeyPatch, int8_read: Int8Read, request: pytest.FixtureRequest
) -> None:
    """Same inputs, the int8 cache read in place and through the copy: the same logits up to float
    rounding (the in-place reads sum in float32), and the read asked for is the one that ran."""
    if int8_read == "triton":
        request.getfixturevalue("triton_interpreter")
    calls = []
    name = {"compiled": "compiled_fused_int8_attention", "triton": "triton_int8_attention"}[int8_read]
    read = getattr(quantized, name)

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape)
        return read(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(quantized, name, counted)
    copy_model = lean_model(moshi_dir, "float", "int8")
    codes = random_codes(copy_model.lm, 2, STEPS, seed=3)
    copied = streaming_text_logits(copy_model.lm, codes)
    assert not calls
    in_place = streaming_text_logits(lean_model(moshi_dir, "float", "int8", int8_read=int8_read).lm, codes)
    layers = sum(isinstance(m, LeanAttention) and m.kv_int8 for m in copy_model.lm.transformer.modules())
    assert len(calls) == STEPS * layers
    assert float((in_place - copied).norm() / copied.norm()) < 1e-4


def test_the_worker_reads_the_int8_cache_the_fastest_way_that_runs_where_it_is(moshi_dir: Path) -> None:
    """`auto`: the Triton kernel, measured fastest on an H100, wherever it takes the step (a CUDA worker,
    compiling or not); else the compiled read where moshi compiles; else (a CPU) the copy. A read asked
    for by name is kept, and the Triton kernel never takes a CPU step, several steps at once or a head
    size it cannot tile. `int8_read_of` says which read a lean LM takes (what the benchmark records)."""
    assert resolve_int8_read("auto", compiling=True, triton_reads=True) == "triton"
    assert resolve_int8_read("auto", compiling=False, triton_reads=True) == "triton"
    assert resolve_int8_read("auto", compiling=True, triton_reads=False) == "compiled"
    assert resolve_int8_read("auto", compiling=False, triton_reads=False) == "copy"
    for read in ("copy", "compiled", "triton"):
        assert resolve_int8_read(read, compiling=False, triton_reads=False) == read
    assert triton_reads(torch.device("cuda"), 1, 128) == (int8_attention.triton is not None)
    assert not triton_reads(torch.device("cpu"), 1, 128)
    assert not triton_reads(torch.device("cuda"), 2, 128)
    assert not triton_reads(torch.device("cuda"), 1, 96)

    assert int8_read_of(lean_model(moshi_dir, "int8", "float").lm, compiling=True) is None
    on_cpu = lean_model(moshi_dir, "float", "int8").lm
    assert int8_read_of(on_cpu, compiling=False) == "copy"
    assert int8_read_of(on_cpu, compiling=True) == "compiled"
    set_int8_read(on_cpu, "triton")
    assert int8_read_of(on_cpu, compiling=False) == "triton"


@torch.no_grad()
def test_every_int8_product_matches_the_float_layer() -> None:
    """The three products Int8Linear picks from (CPU bf16, CUDA, fallback), all run here: torch's CPU
    `_int_mm` computes what its CUDA one does, on 4 rows padded past its 16-row floor. Measured 0.7-1 %
    relative L2 (one rounding of weights, and of activations for w8a8); a wrong scale or layout is ~100 %."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=False)
    torch.nn.init.normal_(linear.weight, std=256**-0.5, generator=generator)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn((4, 256), generator=generator)
    expected = linear(x)
    cpu = torch.device("cpu")
    assert kernel_for(cpu, torch.bfloat16, 256, 512) == "int8pack"
    assert kernel_for(torch.device("cuda"), torch.bfloat16, 256, 512) == "w8a8"
    assert kernel_for(cpu, torch.float32, 256, 512) == kernel_for(cpu, torch.bfloat16, 85, 512) == "dequant"
    products = {
        "int8pack": layer(x.to(torch.bfloat16)).float(),
        "w8a8": w8a8_matmul(x, layer.weight, layer.weight_scb),
        "dequant": layer(x),
    }
    for name, product in products.items():
        relative = float((product - expected).norm() / expected.norm())
        assert relative < 0.02, f"{name}: {relative}"


def test_the_batcher_serves_sessions_on_int8_weights_and_cache(moshi_dir: Path) -> None:
    model = lean_model(moshi_dir, "int8", "int8")
    batcher = Batcher(model, 2)
    try:
        caches = [s.kv_cache for s in model.lm.get_streaming_state().values() if hasattr(s, "kv_cache")]
        assert any(isinstance(c, Int8KVCache) for c in caches), "the main transformer's cache is int8"
        primer = model.encode_text("hello there")
        batcher.join("a", primer)
        batcher.join("b")
        rng = np.random.default_rng(0)
        published = {"a": 0, "b": 0}
        for _ in range(len(primer) + batcher.delay + 4):
            audio = (rng.standard_normal((2, FRAME_SAMPLES)) * 0.3).astype(np.float32)
            for out in batcher.step(audio):
                if out.pcm is not None:
                    assert out.pcm.shape == (FRAME_SAMPLES,) and np.isfinite(out.pcm).all()
                    published[out.session_id] += 1
        assert published["a"] >= 4 and published["b"] >= 4, published
    finally:
        batcher.close()


def write_q8(moshi_dir: Path, q8_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """`moshi_dir` as a `-q8` directory (config `quantize`, `model.q8.safetensors`) holding `state`."""
    shutil.copytree(moshi_dir, q8_dir)
    config = json.loads((q8_dir / "config.json").read_text(encoding="utf-8"))
    config |= {"quantize": True, "moshi_name": "model.q8.safetensors"}
    (q8_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (q8_dir / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(q8_dir / "model.q8.safetensors"))
    return q8_dir


def test_a_q8_checkpoint_loads_into_the_same_int8_layers(moshi_dir: Path, tmp_path: Path) -> None:
    """A `-q8` directory (config `quantize`, `model.q8.safetensors` of int8 weights and `_scb` scales,
    as Kyutai publishes) loads without bitsandbytes, into exactly the LM that quantizing at load gives."""
    quantized = lean_model(moshi_dir, "int8", "float")
    q8_dir = write_q8(moshi_dir, tmp_path / "moshiko-q8", quantized.lm.state_dict())

    loaded = load_moshi(settings_for(q8_dir))  # weights unset: a q8 checkpoint is int8 whatever it says
    scales = [m.weight_scb for m in loaded.lm.modules() if isinstance(m, Int8Linear)]
    assert scales and all(s.dtype == torch.float32 for s in scales)
    codes = random_codes(loaded.lm, 2, 8, seed=5)
    assert torch.equal(streaming_text_logits(loaded.lm, codes), streaming_text_logits(quantized.lm, codes))


def test_a_q8_checkpoint_of_float_weights_is_refused_at_load(moshi_dir: Path, tmp_path: Path) -> None:
    """Names and shapes match, so load_state_dict took them; the int8 layers would have scaled the float
    weights by their `_scb` / 127 and served a wrong model without a word."""
    state = lean_model(moshi_dir, "int8", "float").lm.state_dict()
    floats = {k: v.float() if v.dtype == torch.int8 else v for k, v in state.items()}
    q8_dir = write_q8(moshi_dir, tmp_path / "float-q8", floats)
    with pytest.raises(ModelLoadError, match=r"weight is torch.float32, not int8"):
        load_moshi(settings_for(q8_dir))


async def test_a_worker_on_int8_weights_and_cache_serves_a_session(
    bus: Bus, start_worker: Callable[..., Awaitable[RunningWorker]]
) -> None:
    running = await start_worker(dialogue_weights="int8", dialogue_kv_cache="int8")
    assert isinstance(running.worker.model.lm.text_linear, Int8Linear)
    await open_session(bus, SessionStart(session_id="q1"))
    reader = DialogueReader(bus, "q1")
    await reader.until(lambda r: r.event(EventName.READY) is not None, 20, "no ready event")
    rng = np.random.default_rng(0)
    for seq in range(20):
        pcm = float_to_pcm16(rng.standard_normal(FRAME_SAMPLES) * 0.3)
        await bus.append(bus.names.session_input("q1"), UserAudio(session_id="q1", seq=seq, pcm=pcm))
    await reader.until(lambda r: len(r.frames) >= 8, 20, "frames did not follow")
    assert all(len(f.pcm) == FRAME_BYTES for f in reader.frames)
    await bus.append_control(SessionStop(session_id="q1"))
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 10, "no ended event")


# The in-place reads' empty rows (the exec mask) are in test_int8_attention.py; see the note above.
@pytest.mark.parametrize("int8_read", ["copy"])
def test_a_rollover_on_the_int8_cache_resets_only_its_rows(moshi_dir: Path, int8_read: Int8Read) -> None:
    """A row reset (a session rolling over in place, again and again) on the int8 cache leaves its
    neighbour's text exactly as when it talked alone: the cache's reset and exec mask are per row,
    whichever way the cache is read."""
    model = lean_model(moshi_dir, "float", "int8", int8_read=int8_read)
    batcher = Batcher(model, 2, audio_temperature=0.0)
    try:
        voices = {
            "steady": user_audio(seed=1, steps=ROLLOVER_STEPS),
            "roller": user_audio(seed=2, steps=ROLLOVER_STEPS),
        }
        batcher.join("steady", (), GREEDY)
        alone = talk(batcher, {"steady": voices["steady"]}, (), ROLLOVER_STEPS).outputs["steady"]
        batcher.leave(0)
        primer = model.encode_text("You are a pirate.")
        batcher.join("steady", (), GREEDY)
        batcher.join("roller", primer, GREEDY)
        run = talk(batcher, voices, primer, ROLLOVER_STEPS)
        assert sum(o.rollover is not None for o in run.outputs["roller"]) >= 2
        assert tokens(run.outputs["steady"]) == tokens(alone)
    finally:
        batcher.close()
