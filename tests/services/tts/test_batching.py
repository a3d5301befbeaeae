"""`CHORUS_TTS_BATCH`: an instance speaks all its phrases in one forward pass per step, and each phrase
sounds exactly as it would alone.

Without sampling noise (temperature 0), every phrase spoken in a batch (voices with prompts of different
lengths, texts of different lengths, a phrase joining while others are half-way, one cancelled half-way)
equals, sample for sample within float rounding, the same phrase through Pocket TTS's own
`generate_audio_stream` on an unbatched engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from services.tts.batcher import Batcher, EngineClosed, Phrase
from services.tts.engine import Engine, ModelState, load_model
from services.tts.pocket_config import resolve
from shared.audio import SAMPLE_RATE
from tests.support.tts import SPEECH, SPEECH2, read_clip, tts_settings

# Float rounding only: batched matrix products and keys re-rotated when a row moves in the batch. The
# samples themselves are ~0.1.
TOLERANCE = 1e-5
CHUNK = 1920  # 80 ms: one step of one row
LONG = "The quick brown fox jumps over the lazy dog, and then it runs away again."
SHORT = "Hello there."
MIDDLE = "Four words, then more."


@pytest.fixture(scope="module")
async def engines(
    tts_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Engine, Engine]]:
    """(batched, unbatched) engines on the same weights, without sampling noise."""
    made = []
    for batch in (True, False):
        settings = tts_settings(
            tts_checkpoint,
            tmp_path_factory.mktemp("batching"),
            "redis://unused",
            "unused:",
            tts_temperature=0,
            tts_batch=batch,
            tts_batch_rows=8,
        )
        made.append(await Engine.load(settings))
    yield made[0], made[1]
    for engine in made:
        engine.close()


class Speech:
    """One phrase's audio as it arrives; `chunks` wakes whoever waits for the n-th chunk."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.cancel = threading.Event()
        self.arrived = asyncio.Condition()

    async def sink(self, audio: np.ndarray) -> None:
        async with self.arrived:
            self.parts.append(audio)
            self.arrived.notify_all()

    async def after(self, chunks: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.parts) >= chunks)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)


async def speak(engine: Engine, state: ModelState, text: str, speech: Speech | None = None) -> np.ndarray:
    speech = speech or Speech()
    await engine.synthesize(state, text, max_samples=8 * SAMPLE_RATE, cancel=speech.cancel, sink=speech.sink)
    return speech.audio


async def test_each_phrase_of_a_batch_sounds_as_it_would_alone(engines: tuple[Engine, Engine]) -> None:
    batched, alone = engines
    clone = await batched.voice_state(read_clip(SPEECH))  # computed on the batcher's thread
    other = await batched.voice_state(read_clip(SPEECH2)[: SAMPLE_RATE * 2])  # a shorter prompt
    catalog = await batched.catalog_state(sorted(batched.catalog.voices)[0])
    rows = {"long": (clone, LONG), "short": (other, SHORT), "late": (catalog, MIDDLE), "cut": (other, LONG)}
    expected = {name: await speak(alone, state, text) for name, (state, text) in rows.items()}

    speeches = {name: Speech() for name in rows}

    async def late() -> np.ndarray:  # joins once the long phrase is a third through
        await speeches["long"].after(len(expected["long"]) // CHUNK // 3)
        return await speak(batched, *rows["late"], speeches["late"])

    async def cut() -> np.ndarray:
        task = asyncio.create_task(speak(batched, *rows["cut"], speeches["cut"]))
        await speeches["cut"].after(5)
        speeches["cut"].cancel.set()
        return await task

    got = await asyncio.gather(
        speak(batched, *rows["long"], speeches["long"]),
        speak(batched, *rows["short"], speeches["short"]),
        late(),
        cut(),
    )
    results = dict(zip(["long", "short", "late", "cut"], got, strict=True))

    for name in ("long", "short", "late"):
        assert len(results[name]) == len(expected[name]), name
        assert np.abs(results[name] - expected[name]).max() < TOLERANCE, name
    # Cancelled after its 5th chunk: it stops within a step or two, and what it said is the same.
    cut_audio = results["cut"]
    assert 5 * CHUNK <= len(cut_audio) <= 8 * CHUNK < len(expected["cut"])
    assert np.abs(cut_audio - expected["cut"][: len(cut_audio)]).max() < TOLERANCE
    assert len(expected["long"]) > len(expected["late"]) > len(expected["short"])


async def test_a_phrase_failing_in_a_batch_fails_alone(engines: tuple[Engine, Engine]) -> None:
    """A phrase whose voice state does not fit the model is refused; the batch keeps speaking."""
    batched, _ = engines
    clone = await batched.voice_state(read_clip(SPEECH))
    broken = {name: dict(module) for name, module in clone.items()}
    first = next(name for name, module in broken.items() if "cache" in module)
    broken[first]["cache"] = broken[first]["cache"][..., :1]  # a head size the model does not have
    healthy = asyncio.create_task(speak(batched, clone, LONG))
    with pytest.raises(RuntimeError):
        await speak(batched, broken, SHORT)
    assert len(await healthy) > 0


async def test_phrases_past_an_instances_rows_wait_for_one(tts_checkpoint: Path, tmp_path: Path) -> None:
    """Two rows: a third phrase starts once one of the first two has ended."""
    settings = tts_settings(tts_checkpoint, tmp_path, "redis://unused", "unused:", tts_batch_rows=2)
    engine = await Engine.load(settings)
    try:
        clone = await engine.voice_state(read_clip(SPEECH))
        first, second, third = Speech(), Speech(), Speech()
        speaking = [asyncio.create_task(speak(engine, clone, LONG, s)) for s in (first, second)]
        await first.after(1)
        waiting = asyncio.create_task(speak(engine, clone, SHORT, third))
        await second.after(3)
        assert not third.parts, "the third phrase waited for a row"
        first.cancel.set()
        assert len(await waiting) > 0
        second.cancel.set()
        await asyncio.gather(*speaking)
    finally:
        engine.close()


async def test_closing_the_engine_ends_every_phrase_and_refuses_new_ones(
    tts_checkpoint: Path, tmp_path: Path
) -> None:
    """Nothing awaits a closed engine forever: phrases in progress end with EngineClosed, and a phrase or
    a voice asked for afterwards is refused at once (its batcher thread would never answer)."""
    settings = tts_settings(tts_checkpoint, tmp_path, "redis://unused", "unused:", tts_batch_rows=4)
    engine = await Engine.load(settings)
    clone = await engine.voice_state(read_clip(SPEECH))
    first = Speech()
    speaking = [
        asyncio.create_task(speak(engine, clone, LONG, first)),
        asyncio.create_task(speak(engine, clone, SHORT)),
    ]
    await first.after(1)
    engine.close()
    for result in await asyncio.wait_for(asyncio.gather(*speaking, return_exceptions=True), 30):
        assert isinstance(result, EngineClosed)
    with pytest.raises(EngineClosed):
        await speak(engine, clone, SHORT)
    with pytest.raises(EngineClosed):
        await engine.voice_state(read_clip(SPEECH))


async def test_voice_states_asked_for_at_once_run_one_per_step(tts_checkpoint: Path, tmp_path: Path) -> None:
    """A voice state is computed on the instance's thread between two steps. Several asked for at once run
    one per step, so the phrases in progress speak between them (rather than pausing for them all), and
    they are counted as the instance's load, so the engine gives the next one to another instance."""
    settings = tts_settings(tts_checkpoint, tmp_path, "redis://unused", "unused:")
    model = load_model(settings, resolve(settings.tts_dir, settings.tts_config))
    batcher = Batcher(model, 0)
    try:
        steps: list[int] = []  # appended on the batcher's thread, one per step of the phrase
        speaking, ended = threading.Event(), threading.Event()

        def on_audio(audio: np.ndarray) -> None:
            steps.append(len(audio))
            speaking.set()

        phrase = Phrase(
            state=model.get_state_for_audio_prompt(torch.from_numpy(read_clip(SPEECH))[None]),
            text=LONG,
            max_samples=60 * SAMPLE_RATE,
            cancel=threading.Event(),
            on_audio=on_audio,
            on_end=lambda _: ended.set(),
        )
        batcher.submit(phrase)
        assert await asyncio.to_thread(speaking.wait, 30)
        holding, gate = threading.Event(), threading.Event()

        def hold() -> None:  # the thread waits here while three voice states are asked for
            holding.set()
            gate.wait()

        held = batcher.call(hold)
        assert await asyncio.to_thread(holding.wait, 30)
        asked = [batcher.call(len, steps) for _ in range(3)]
        assert batcher.jobs == 3
        gate.set()
        await asyncio.wrap_future(held)
        seen = [await asyncio.wrap_future(job) for job in asked]
        assert seen[0] < seen[1] < seen[2], seen
        assert batcher.jobs == 0
        phrase.cancel.set()
        assert await asyncio.to_thread(ended.wait, 30)
    finally:
        batcher.close()
