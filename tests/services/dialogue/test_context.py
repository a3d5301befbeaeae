"""A shorter attention context (CHORUS_DIALOGUE_CONTEXT) on the real Moshi classes (the small generated
checkpoint, whose context is 100 frames): each session's KV cache is allocated at it, the LM attends over
it alone (the same logits as the checkpoint's context until it is full, others after), the default
rollover comes before it fills, and what the model cannot honour is refused at start."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from moshi.modules.transformer import StreamingMultiheadAttention
from pydantic import ValidationError

from bench.bench_quant import kv_bytes_per_session, random_codes, streaming_text_logits
from services.dialogue.model import MoshiModel, load_moshi
from services.dialogue.priming import ROLLOVER_SLACK_FRAMES
from services.dialogue.serving import DialogueWorker
from services.dialogue.settings import DialogueSettings
from shared.bus import Bus
from shared.errors import ModelLoadError
from shared.messages import ContextRollover, EventName, SessionStart, SessionStop
from tests.services.dialogue.conftest import DialogueReader, RunningWorker, settings_for
from tests.support.sessions import open_session

StartWorker = Callable[..., Awaitable[RunningWorker]]
CHECKPOINT_CONTEXT = 100
SHORT = 60
PRIMER_TOKENS = 4  # a small primer bound: twice the rollover margin (2 x (4 + 1 + 25)) is under SHORT


def attention_contexts(module: torch.nn.Module) -> set[int | None]:
    return {m.context for m in module.modules() if isinstance(m, StreamingMultiheadAttention)}


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_each_sessions_cache_is_allocated_at_the_shorter_context(
    moshi_dir: Path, moshi_model: MoshiModel, kv_cache: str
) -> None:
    short = load_moshi(
        settings_for(
            moshi_dir,
            dialogue_context=SHORT,
            dialogue_kv_cache=kv_cache,
            dialogue_max_primer_tokens=PRIMER_TOKENS,
        )
    )
    assert moshi_model.lm.context == CHECKPOINT_CONTEXT
    assert short.lm.context == SHORT
    assert attention_contexts(short.lm.transformer) == {SHORT}
    assert attention_contexts(short.lm.depformer) == attention_contexts(moshi_model.lm.depformer)
    with short.lm.streaming(2):
        capacities = {
            m._streaming_state.kv_cache.capacity
            for m in short.lm.transformer.modules()
            if isinstance(m, StreamingMultiheadAttention)
        }
    assert capacities == {SHORT}
    full = load_moshi(settings_for(moshi_dir, dialogue_kv_cache=kv_cache))
    shrunk = 1 - kv_bytes_per_session(short.lm) / kv_bytes_per_session(full.lm)
    # In proportion (the ring's offsets aside; moshi streams the depformer apart, with no session cache).
    assert shrunk == pytest.approx(1 - SHORT / CHECKPOINT_CONTEXT, abs=1e-3)


@torch.no_grad()
def test_the_lm_attends_over_the_shorter_context_alone(moshi_dir: Path, moshi_model: MoshiModel) -> None:
    short = load_moshi(
        settings_for(moshi_dir, dialogue_context=SHORT, dialogue_max_primer_tokens=PRIMER_TOKENS)
    )
    codes = random_codes(moshi_model.lm, rows=2, steps=SHORT + 20, seed=3)
    full_logits = streaming_text_logits(moshi_model.lm, codes)  # [steps, rows, text card]
    short_logits = streaming_text_logits(short.lm, codes)
    # The first SHORT steps see the same past; after them the short LM has forgotten the oldest steps.
    torch.testing.assert_close(short_logits[:SHORT], full_logits[:SHORT], rtol=1e-4, atol=1e-4)
    later = (short_logits[SHORT:] - full_logits[SHORT:]).abs().amax(dim=(1, 2))
    assert (later > 1e-2).all(), f"from step {SHORT} on, the oldest steps are out of sight: {later}"


def test_a_context_past_the_checkpoints_is_refused_at_load(moshi_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="past the checkpoint's context of 100 frames"):
        load_moshi(
            settings_for(
                moshi_dir,
                dialogue_context=CHECKPOINT_CONTEXT + 1,
                dialogue_max_primer_tokens=PRIMER_TOKENS,
            )
        )


def test_a_context_too_short_to_roll_over_in_is_refused_before_any_model_loads() -> None:
    with pytest.raises(ValidationError, match="must be at least 58 frames"):  # 2 x (4 + 25), no delay known
        DialogueSettings(dialogue_context=57, dialogue_max_primer_tokens=4)


def test_a_context_too_short_to_roll_over_in_stops_the_worker_at_start(bus: Bus, moshi_dir: Path) -> None:
    least = 2 * (4 + 1 + ROLLOVER_SLACK_FRAMES)  # 4 primer tokens + the acoustic delay of 1, + the slack
    settings = settings_for(moshi_dir, dialogue_context=least - 1, dialogue_max_primer_tokens=4)
    model = load_moshi(settings)
    with pytest.raises(ValueError, match=f"must be at least {least} frames"):
        DialogueWorker(bus, settings, model)
    enough = settings.model_copy(update={"dialogue_context": least})
    DialogueWorker(bus, enough, load_moshi(enough)).batcher.close()


async def test_a_worker_with_a_shorter_context_rolls_sessions_over_before_it_fills(
    bus: Bus, start_worker: StartWorker
) -> None:
    context, primer_tokens = 64, 4
    running = await start_worker(
        dialogue_slots=2,
        dialogue_context=context,
        dialogue_max_primer_tokens=primer_tokens,
        dialogue_tick_ms=40,
    )
    margin = primer_tokens + running.worker.batcher.delay + ROLLOVER_SLACK_FRAMES
    assert running.worker.rollover_at == context - margin
    await open_session(bus, SessionStart(session_id="short"))
    reader = DialogueReader(bus, "short")
    await reader.until(lambda r: r.event(EventName.CONTEXT_ROLLOVER) is not None, 30, "no rollover")
    rollover = reader.event(EventName.CONTEXT_ROLLOVER)
    assert rollover is not None and rollover.data_as(ContextRollover).frames == context - margin
    await bus.append_control(SessionStop(session_id="short"))
    await reader.until(lambda r: r.event(EventName.ENDED) is not None, 10, "no ended event")
    seqs = [e.seq for e in reader.entries]
    assert seqs == list(range(len(seqs))), "one seq counter across the rollover, no gaps"
