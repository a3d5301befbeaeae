"""Pocket TTS behind an async API: a pool of model instances, each used by one thread at a time.

`TTSModel.generate_audio_stream` is not thread-safe per instance and `pocket_tts` pins torch to one
thread per process at import, so concurrency comes from several instances, each on its own executor
thread (and the generation/decoding threads pocket_tts starts itself). The event loop never runs a
forward pass: chunks cross from the synthesis thread to the loop through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from services.tts.settings import TtsSettings
from shared import metrics
from shared.audio import SAMPLE_RATE, FloatAudio
from shared.errors import ModelLoadError

log = logging.getLogger(__name__)

# Pocket TTS's per-module streaming state: {module name: {tensor name: tensor}}.
ModelState = dict[str, dict[str, torch.Tensor]]
AudioSink = Callable[[FloatAudio], Awaitable[None]]

CONFIG_FILE = "config.yaml"
DEFAULT_LANGUAGE = "english"
_REMOTE = ("hf://", "http://", "https://")


def _path_fields(config: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(container, key) of every file reference a Pocket TTS config may hold."""
    flow_lm = config.get("flow_lm", {})
    return [
        (config, "weights_path"),
        (config, "weights_path_without_voice_cloning"),
        (flow_lm, "weights_path"),
        (flow_lm.get("lookup_table", {}), "tokenizer_path"),
        (config.get("mimi", {}), "weights_path"),
    ]


def local_config(tts_dir: Path) -> dict[str, Any]:
    """A checkpoint directory's config with its relative file references made absolute."""
    path = tts_dir / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"CHORUS_TTS_DIR={tts_dir} has no {CONFIG_FILE}")
    config: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    for container, key in _path_fields(config):
        value = container.get(key)
        if isinstance(value, str) and not value.startswith(_REMOTE) and not Path(value).is_absolute():
            container[key] = str((tts_dir / value).resolve())
    return config


def model_version(settings: TtsSettings) -> str:
    """Identifies the weights a voice state was computed with (cached states are keyed by it)."""
    digest = hashlib.sha256(f"pocket-tts {version('pocket-tts')}\n".encode())
    if settings.tts_dir is None:
        from pocket_tts.utils.config import CONFIGS_DIR

        # The shipped config pins the hub revision of its weights.
        digest.update((CONFIGS_DIR / f"{DEFAULT_LANGUAGE}.yaml").read_bytes())
    else:
        digest.update((settings.tts_dir / CONFIG_FILE).read_bytes())
        weights = local_config(settings.tts_dir).get("weights_path")
        if isinstance(weights, str) and Path(weights).is_file():
            with open(weights, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def load_model(settings: TtsSettings) -> Any:
    """One TTSModel through the published loader (`TTSModel.load_model`). Blocking: call from a thread."""
    from pocket_tts.models.tts_model import TTSModel

    options: dict[str, Any] = {"temp": settings.tts_temperature, "eos_threshold": settings.tts_eos_threshold}
    try:
        if settings.tts_dir is None:
            model = TTSModel.load_model(language=DEFAULT_LANGUAGE, **options)
        else:
            with tempfile.TemporaryDirectory(prefix="chorus-tts-") as tmp:
                config_file = Path(tmp) / CONFIG_FILE
                config_file.write_text(yaml.safe_dump(local_config(settings.tts_dir)), encoding="utf-8")
                model = TTSModel.load_model(config=str(config_file), **options)
    except ModelLoadError:
        raise
    except Exception as exc:
        source = settings.tts_dir or "the hub"
        raise ModelLoadError(f"cannot load Pocket TTS from {source}: {exc}") from exc
    if settings.tts_device != "cpu":
        model = model.to(settings.tts_device)
    return model.eval()


class DeadlinePassed(Exception):
    """A request's deadline passed while it waited for a free model instance: nobody wants its answer."""


class Engine:
    """N model instances and a thread per instance; `synthesize` and `voice_state` borrow one."""

    def __init__(self, models: list[Any], version_id: str) -> None:
        self.version = version_id
        self.instances = len(models)
        self._free: asyncio.Queue[Any] = asyncio.Queue()
        for model in models:
            self._free.put_nowait(model)
        self._executor = ThreadPoolExecutor(max_workers=len(models), thread_name_prefix="tts-model")

    @classmethod
    async def load(cls, settings: TtsSettings) -> Engine:
        started = time.monotonic()
        models = [await asyncio.to_thread(load_model, settings) for _ in range(settings.tts_instances)]
        version_id = await asyncio.to_thread(model_version, settings)
        log.info(
            "pocket tts loaded",
            extra={
                "instances": len(models),
                "model_version": version_id,
                "tts_dir": str(settings.tts_dir or "hub"),
                "load_s": round(time.monotonic() - started, 2),
            },
        )
        return cls(models, version_id)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def _instance(self) -> AsyncIterator[Any]:
        model = await self._free.get()
        try:
            yield model
        finally:
            self._free.put_nowait(model)

    async def voice_state(self, clip: FloatAudio) -> ModelState:
        """`get_state_for_audio_prompt` on a 24 kHz mono clip."""
        prompt = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None, :]
        async with self._instance() as model:
            loop = asyncio.get_running_loop()
            state: ModelState = await loop.run_in_executor(
                self._executor, model.get_state_for_audio_prompt, prompt
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

        `deadline` (unix time): checked once an instance is free, since waiting for one can take seconds
        on a busy worker; past it, `DeadlinePassed` is raised and nothing is synthesised.
        """
        async with self._instance() as model:
            if deadline is not None and time.time() > deadline:
                raise DeadlinePassed(f"{time.time() - deadline:.1f} s past its deadline")
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
            worker = loop.run_in_executor(self._executor, produce)
            total = 0
            try:
                while (audio := await chunks.get()) is not None:
                    total += len(audio)
                    await sink(audio)
            finally:
                # Whatever ended the stream, the instance goes back only once its thread is done with it.
                cancel.set()
                await worker
            elapsed = time.monotonic() - started
            if total and elapsed > 0:
                metrics.TTS_REALTIME_FACTOR.observe(total / SAMPLE_RATE / elapsed)
            return total
