"""Pocket TTS behind an async API: a pool of model instances, each used by one thread at a time.

`pocket_tts` pins torch to one thread per process at import. Batched (`CHORUS_TTS_BATCH`, the default),
each instance is a `Batcher` thread that speaks all the phrases given to it at once, one forward pass per
step for all of them; a phrase goes to the instance with the fewest. Unbatched, an instance speaks one
phrase at a time through `TTSModel.generate_audio_stream` (not thread-safe per instance) on its own
executor thread, and concurrency comes only from several instances. Either way the event loop never runs
a forward pass: chunks cross from the model's thread to the loop through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from services.tts.batcher import Batcher, Phrase
from services.tts.catalog import Catalog
from services.tts.pocket_config import CONFIG_FILE, PocketConfig, resolve
from services.tts.settings import TtsSettings
from shared import metrics
from shared.audio import SAMPLE_RATE, FloatAudio
from shared.errors import CloningUnavailable, ModelLoadError

log = logging.getLogger(__name__)

# Pocket TTS's per-module streaming state: {module name: {tensor name: tensor}}.
ModelState = dict[str, dict[str, torch.Tensor]]
AudioSink = Callable[[FloatAudio], Awaitable[None]]


def load_model(settings: TtsSettings, choice: PocketConfig) -> Any:
    """One TTSModel through the published loader (`TTSModel.load_model`). Blocking: call from a thread.

    A published config whose voice-cloning weights are out of reach (gated on the hub: no token, or the
    terms not accepted) loads the weights without cloning: `has_voice_cloning` says which it got."""
    from pocket_tts.models.tts_model import TTSModel

    options: dict[str, Any] = {"temp": settings.tts_temperature, "eos_threshold": settings.tts_eos_threshold}
    try:
        if choice.published:
            model = TTSModel.load_model(language=choice.name, **options)
        else:
            with tempfile.TemporaryDirectory(prefix="chorus-tts-") as tmp:
                config_file = Path(tmp) / CONFIG_FILE
                config_file.write_text(yaml.safe_dump(choice.config), encoding="utf-8")
                model = TTSModel.load_model(config=str(config_file), **options)
    except Exception as exc:
        source = choice.local_dir or f"the hub ({choice.name})"
        raise ModelLoadError(f"cannot load Pocket TTS from {source}: {exc}") from exc
    if settings.tts_device != "cpu":
        model = model.to(settings.tts_device)
    return model.eval()


class DeadlinePassed(Exception):
    """A request's deadline passed while it waited for a free model instance: nobody wants its answer."""


class Engine:
    """N model instances and a thread per instance; `synthesize` and `voice_state` borrow one."""

    def __init__(self, models: list[Any], choice: PocketConfig, *, batch_rows: int = 0) -> None:
        """`batch_rows`: phrases each instance speaks at once, batched (0: one at a time, unbatched)."""
        self.choice = choice
        self.version = choice.version()
        self.instances = len(models)
        # Every instance loads the same weights; without the cloning ones a clip cannot become a voice.
        self.can_clone = all(getattr(model, "has_voice_cloning", True) for model in models)
        self.catalog = Catalog(choice)
        self._any = models[0]
        self._executor = ThreadPoolExecutor(max_workers=len(models), thread_name_prefix="tts-model")
        self._batchers = [Batcher(model, index) for index, model in enumerate(models)] if batch_rows else []
        # What a phrase waits for: a free instance, or batched a free row on any instance.
        self._free: asyncio.Queue[Any] = asyncio.Queue()
        for token in models * max(1, batch_rows):
            self._free.put_nowait(token)

    @classmethod
    async def load(cls, settings: TtsSettings) -> Engine:
        started = time.monotonic()
        choice = resolve(settings.tts_dir, settings.tts_config)
        models = [
            await asyncio.to_thread(load_model, settings, choice) for _ in range(settings.tts_instances)
        ]
        rows = settings.tts_batch_rows if settings.tts_batch else 0
        engine = await asyncio.to_thread(cls, models, choice, batch_rows=rows)
        log.info(
            "pocket tts loaded",
            extra={
                "instances": len(models),
                "batched": settings.tts_batch,
                "model_version": engine.version,
                "tts_config": choice.name,
                "tts_dir": str(choice.local_dir or "hub"),
                "voice_cloning": engine.can_clone,
                "catalog_voices": len(engine.catalog.voices),
                "load_s": round(time.monotonic() - started, 2),
            },
        )
        if not engine.can_clone:
            log.warning(
                "Pocket TTS loaded without its voice-cloning weights: uploads and profile voices are "
                "refused, catalog voices work. %s",
                CloningUnavailable().detail,
            )
        return engine

    def close(self) -> None:
        for batcher in self._batchers:
            batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def _instance(self) -> AsyncIterator[Any]:
        model = await self._free.get()
        try:
            yield model
        finally:
            self._free.put_nowait(model)

    async def voice_state(self, clip: FloatAudio) -> ModelState:
        """`get_state_for_audio_prompt` on a 24 kHz mono clip; CloningUnavailable without the weights
        for it (Pocket TTS would compute a state that clones nothing)."""
        if not self.can_clone:
            raise CloningUnavailable()
        prompt = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None, :]
        if self._batchers:
            # On the instance's own thread, between two steps of the phrases it speaks; voice states asked
            # for at once go to different instances, as unbatched.
            batcher = min(self._batchers, key=lambda b: (b.jobs, b.phrases))
            computed: ModelState = await asyncio.wrap_future(
                batcher.call(batcher.model.get_state_for_audio_prompt, prompt)
            )
            return computed
        async with self._instance() as model:
            loop = asyncio.get_running_loop()
            state: ModelState = await loop.run_in_executor(
                self._executor, model.get_state_for_audio_prompt, prompt
            )
        return state

    async def catalog_state(self, name: str) -> ModelState:
        """A catalog voice's published state (downloaded from the hub once, or read from the checkpoint)."""
        state: ModelState = await asyncio.to_thread(
            self._any.get_state_for_audio_prompt, self.catalog.source(name)
        )
        return state

    async def synthesize(
        self,
        state: ModelState,
        text: str,
        *,
        max_samples: int,
        cancel: threading.Event,
        sink: AudioSink,
        deadline: float | None = None,
    ) -> int:
        """Stream `text` in the voice of `state` into `sink` (float chunks at 24 kHz) until the model
        ends the speech, `max_samples` are out, or `cancel` is set. Returns the samples produced.

        `deadline` (unix time): checked once an instance (batched: a row) is free, since waiting for one
        can take seconds on a busy worker; past it, `DeadlinePassed` is raised and nothing is synthesised.
        """
        if self._batchers:
            async with self._instance():
                _check_deadline(deadline)
                return await self._synthesize_batched(
                    state, text, max_samples=max_samples, cancel=cancel, sink=sink
                )
        async with self._instance() as model:
            _check_deadline(deadline)
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue[FloatAudio | None] = asyncio.Queue()

            def produce() -> None:
                produced = 0
                try:
                    for chunk in model.generate_audio_stream(state, text, copy_state=True, stop=cancel):
                        audio = chunk.detach().to("cpu", torch.float32).numpy()[: max_samples - produced]
                        if not len(audio):
                            continue  # decoded after the bound was reached
                        produced += len(audio)
                        loop.call_soon_threadsafe(chunks.put_nowait, audio)
                        if produced >= max_samples:
                            cancel.set()  # pocket_tts stops generating at its next step
                finally:
                    loop.call_soon_threadsafe(chunks.put_nowait, None)

            started = time.monotonic()
            # The instance goes back only once its thread is done with it.
            total = await _drain(chunks, sink, cancel, loop.run_in_executor(self._executor, produce))
            _observe(total, started)
            return total

    async def _synthesize_batched(
        self, state: ModelState, text: str, *, max_samples: int, cancel: threading.Event, sink: AudioSink
    ) -> int:
        """`synthesize` through the instance speaking the fewest phrases: it joins that batch's next step."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[FloatAudio | None] = asyncio.Queue()
        ended: asyncio.Future[None] = loop.create_future()

        def on_end(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, ended, error)
            loop.call_soon_threadsafe(chunks.put_nowait, None)

        def on_audio(audio: FloatAudio) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, audio)

        phrase = Phrase(
            state=state,
            text=text,
            max_samples=max_samples,
            cancel=cancel,
            on_audio=on_audio,
            on_end=on_end,
        )
        started = time.monotonic()
        min(self._batchers, key=lambda b: (b.phrases, b.jobs)).submit(phrase)
        # The batcher drops a cancelled phrase at its next step.
        total = await _drain(chunks, sink, cancel, ended)
        _observe(total, started)
        return total


async def _drain(
    chunks: asyncio.Queue[FloatAudio | None], sink: AudioSink, cancel: threading.Event, done: Awaitable[None]
) -> int:
    """Hand a phrase's chunks to `sink` until its end (None); whatever ends the stream (the end, the sink
    failing, the caller cancelled), the phrase is cancelled and `done` awaited. Returns the samples sunk."""
    total = 0
    try:
        while (audio := await chunks.get()) is not None:
            total += len(audio)
            await sink(audio)
    finally:
        cancel.set()
        await done
    return total


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.time() > deadline:
        raise DeadlinePassed(f"{time.time() - deadline:.1f} s past its deadline")


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _observe(samples: int, started: float) -> None:
    elapsed = time.monotonic() - started
    if samples and elapsed > 0:
        metrics.TTS_REALTIME_FACTOR.observe(samples / SAMPLE_RATE / elapsed)
