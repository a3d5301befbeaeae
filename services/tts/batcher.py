"""One Pocket TTS instance speaking many phrases at once: each step (80 ms of audio), one flow-LM forward
and one Mimi decode for every phrase in progress, a row each.

Measured on english_2m (docs/performance.md, "TTS"): a step of one row spends about as long in Python and
framework overhead as in arithmetic, so six rows cost about twice one, not six times. Rows join and leave
between steps: a new phrase is prompted with its text on its own (one forward over its tokens) and joins
the next step, so it never waits for the others to finish. Per row, the loop is pocket_tts's
`_autoregressive_generation` (end of speech, frames after it, the length bound) and its decoder worker's
fade-in; the maths are pocket_tts's modules, called with a batch dimension (`batch_state` aligns the rows'
streaming states).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from pocket_tts.models.text_chunking import prepare_text_prompt, split_into_best_sentences
from pocket_tts.modules.stateful_module import increment_steps

from services.tts.batch_state import Layout, ModelState, fresh
from shared.audio import FloatAudio

log = logging.getLogger(__name__)

# Slots a batch's caches get beyond its longest row: a regroup at most every this many steps when
# nobody joins or leaves.
SPARE_STEPS = 32
# pocket_tts's MAX_TOKEN_PER_CHUNK: longer texts are spoken in several chunks, each from the voice state.
MAX_TOKENS_PER_CHUNK = 50


@dataclass(eq=False)
class Phrase:
    """What the engine asks a batcher for. The callbacks run on the batcher's thread: `on_audio` gets
    each chunk, `on_end` once at the end (an exception when the phrase failed)."""

    state: ModelState  # the voice; never modified
    text: str
    max_samples: int
    cancel: threading.Event
    on_audio: Callable[[FloatAudio], None]
    on_end: Callable[[BaseException | None], None]
    produced: int = field(default=0, init=False)


@dataclass(eq=False)
class _Row:
    """One text chunk of a phrase in the batch: pocket_tts's per-generation counters."""

    phrase: Phrase
    rest: list[str]  # the phrase's chunks after this one
    max_steps: int
    frames_after_eos: int
    latent: torch.Tensor  # the next backbone input, [1, 1, ldim] (NaN: the first step)
    flow: ModelState | None  # its own states until it joins the batch
    mimi: ModelState | None
    steps: int = 0
    eos_step: int | None = None
    faded: bool = False
    over: bool = False


class EngineClosed(Exception):
    """The phrase was still being spoken when its engine closed."""


class _Stop:
    """Ends the batcher's loop."""


_Job = tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]


class Batcher:
    """The thread that owns one model instance: phrases join, every step runs them all, jobs (a voice
    state to compute) run between steps."""

    def __init__(self, model: Any, index: int) -> None:
        self.model = model
        self._flow_layout = Layout(model.flow_lm)
        self._mimi_layout = Layout(model.mimi)
        self._mimi_steps = int(model.mimi.encoder_frame_rate / model.mimi.frame_rate)
        self._fade = torch.linspace(0, 1, model.config.mimi.sample_rate // 200)
        self._inbox: queue.SimpleQueue[Phrase | _Job | _Stop] = queue.SimpleQueue()
        self._rows: list[_Row] = []  # in the batch, in the order of its states
        self._joining: list[_Row] = []
        self._flow: ModelState | None = None
        self._mimi: ModelState | None = None
        self._phrases = 0
        self._jobs: deque[_Job] = deque()  # taken from the inbox, run one per step
        self._waiting_jobs = 0  # asked for and not yet run (inbox or deque)
        self._lock = threading.Lock()
        self._closed = False  # under the lock: nothing is put in the inbox after _Stop
        self._thread = threading.Thread(target=self._run, name=f"tts-batch-{index}", daemon=True)
        self._thread.start()

    @property
    def phrases(self) -> int:
        """Phrases submitted and not yet ended: where the engine puts the next one."""
        return self._phrases

    @property
    def jobs(self) -> int:
        """Jobs asked for and not yet run: where the engine computes the next voice state."""
        return self._waiting_jobs

    def submit(self, phrase: Phrase) -> None:
        """Speak `phrase`; EngineClosed once closed (its thread would never end it)."""
        with self._lock:
            self._check_open()
            self._phrases += 1
            self._inbox.put(phrase)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """`fn(*args)` on the batcher's thread, between two steps."""
        future: Future[Any] = Future()
        with self._lock:
            self._check_open()
            self._waiting_jobs += 1
            self._inbox.put((fn, args, future))
        return future

    def close(self) -> None:
        """Stop the thread: phrases in progress or waiting end with EngineClosed, as do waiting jobs."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(_Stop())
        self._thread.join(timeout=10)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the TTS engine closed")

    # --- the loop --------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.no_grad():
                self._loop()
        finally:
            with self._lock:
                self._closed = True
            self._fail_all(EngineClosed("the TTS engine closed"))
            self._refuse_waiting()

    def _loop(self) -> None:
        while self._take(block=not (self._rows or self._joining or self._jobs)):
            self._drop_finished()
            if not (self._rows or self._joining):
                continue
            try:
                self._regroup_if_needed()
                self._step()
            except Exception as exc:
                # The batch's state is unusable: its phrases fail, the next ones start anew.
                log.exception("tts batch step failed", extra={"rows": len(self._rows)})
                self._fail_all(exc)

    def _take(self, *, block: bool) -> bool:
        """Start the phrases that arrived and run one job (the rows speak a step between two voice states,
        and a phrase arriving meanwhile joins after one, not after all); False once asked to stop."""
        items = [self._inbox.get()] if block else []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._inbox.get_nowait())
        for item in items:
            if isinstance(item, _Stop):
                return False  # the last item: nothing is put in the inbox after it
            if isinstance(item, Phrase):
                self._start(item)
            else:
                self._jobs.append(item)
        if self._jobs:
            self._run_job(self._jobs.popleft())
        return True

    def _run_job(self, job: _Job) -> None:
        fn, args, future = job
        with self._lock:
            self._waiting_jobs -= 1
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)

    def _start(self, phrase: Phrase) -> None:
        try:
            model = self.model
            chunks = split_into_best_sentences(
                model.flow_lm.conditioner.tokenizer,
                phrase.text,
                MAX_TOKENS_PER_CHUNK,
                model.pad_with_spaces_for_short_inputs,
                remove_semicolons=model.remove_semicolons,
                append_terminal_punctuation=model.append_terminal_punctuation,
                capitalize_first_letter=model.capitalize_first_letter,
                replace_characters=model.replace_characters,
            )
            if not chunks:
                self._end(phrase, None)
                return
            self._joining.append(self._prompt(phrase, chunks[0], chunks[1:]))
        except Exception as exc:
            self._end(phrase, exc)

    def _prompt(self, phrase: Phrase, chunk: str, rest: list[str]) -> _Row:
        """A row for one chunk: the voice state with the chunk's text run through the flow LM (pocket_tts's
        `_generate_audio_stream_short_text` and `_generate` up to the first latent)."""
        model = self.model
        text, frames_after_eos = prepare_text_prompt(
            chunk,
            model.pad_with_spaces_for_short_inputs,
            model.remove_semicolons,
            model.append_terminal_punctuation,
            model.capitalize_first_letter,
            model.replace_characters,
        )
        if model.model_recommended_frames_after_eos is not None:
            frames_after_eos = model.model_recommended_frames_after_eos
        else:
            frames_after_eos += 2
        tokens = model.flow_lm.conditioner.prepare(text)
        state = copy.deepcopy(phrase.state)
        model._expand_kv_cache(state, model._flow_lm_current_end(state) + tokens.shape[1])
        model._run_flow_lm_and_increment_step(model_state=state, text_tokens=tokens)
        flow_lm = model.flow_lm
        return _Row(
            phrase=phrase,
            rest=rest,
            max_steps=model._estimate_max_gen_len(tokens.shape[1]),
            frames_after_eos=frames_after_eos,
            latent=torch.full((1, 1, flow_lm.ldim), float("nan"), dtype=flow_lm.dtype),
            flow=state,
            mimi=fresh(model.mimi),
        )

    def _drop_finished(self) -> None:
        for row in self._rows + self._joining:
            if not row.over and row.phrase.cancel.is_set():
                row.over = True
                self._end(row.phrase, None)
        self._joining = [row for row in self._joining if not row.over]

    def _regroup_if_needed(self) -> None:
        """Restack the batch when a row joined or left, or its caches are full."""
        leaving = any(row.over for row in self._rows)
        full = (
            self._flow is not None
            and self._mimi is not None
            and (
                self._flow_layout.room(self._flow) < 1
                or self._mimi_layout.room(self._mimi) < self._mimi_steps
            )
        )
        if not (self._joining or leaving or full):
            return
        flows: list[ModelState] = []
        mimis: list[ModelState] = []
        if self._flow is not None and self._mimi is not None:
            staying = [i for i, row in enumerate(self._rows) if not row.over]
            if staying:
                split_flow = self._flow_layout.split(self._flow)
                split_mimi = self._mimi_layout.split(self._mimi)
                flows += [split_flow[i] for i in staying]
                mimis += [split_mimi[i] for i in staying]
        rows = [row for row in self._rows if not row.over]
        for row in self._joining:
            assert row.flow is not None and row.mimi is not None
            flows.append(row.flow)
            mimis.append(row.mimi)
            row.flow = row.mimi = None
            rows.append(row)
        self._rows, self._joining = rows, []
        if not rows:
            self._flow = self._mimi = None
            return
        self._flow = self._flow_layout.stack(flows, spare=SPARE_STEPS)
        self._mimi = self._mimi_layout.stack(mimis, spare=SPARE_STEPS * self._mimi_steps)

    def _step(self) -> None:
        """One latent and its 80 ms of audio for every row."""
        model, flow_lm, rows = self.model, self.model.flow_lm, self._rows
        if not rows or self._flow is None or self._mimi is None:
            return
        inputs = torch.cat([row.latent for row in rows])
        no_text = torch.empty((len(rows), 0, flow_lm.dim), dtype=flow_lm.dtype)
        latents, eos = flow_lm(
            inputs,
            no_text,
            self._flow,
            model.sampler_decode_steps,
            model.temp,
            model.noise_clamp,
            model.eos_threshold,
        )
        increment_steps(flow_lm, self._flow, increment=1)
        latents = latents[:, None, :]
        audio = model.mimi.decode_from_latent(latents * flow_lm.emb_std + flow_lm.emb_mean, self._mimi)
        increment_steps(model.mimi, self._mimi, increment=self._mimi_steps)
        for index, row in enumerate(rows):
            self._advance(row, bool(eos[index].item()), latents[index : index + 1], audio[index, 0])

    def _advance(self, row: _Row, eos: bool, latent: torch.Tensor, audio: torch.Tensor) -> None:
        """pocket_tts's per-step decision for one row: speak this step's audio or end the chunk."""
        step = row.steps
        row.steps += 1
        if eos and row.eos_step is None and step >= self.model._MIN_FRAMES_BEFORE_EOS:
            row.eos_step = step
        if row.eos_step is not None and step >= row.eos_step + row.frames_after_eos:
            self._chunk_over(row)
            return
        row.latent = latent
        self._emit(row, audio)
        if row.phrase.produced >= row.phrase.max_samples:
            row.phrase.cancel.set()
            row.over = True
            self._end(row.phrase, None)
        elif row.steps >= row.max_steps:
            self._chunk_over(row)

    def _emit(self, row: _Row, audio: torch.Tensor) -> None:
        phrase = row.phrase
        samples = audio.to("cpu", torch.float32).numpy()[: phrase.max_samples - phrase.produced].copy()
        if not row.faded:
            # pocket_tts fades a fresh decoder's first 5 ms in (a small step there is heard as a click).
            n = min(len(self._fade), len(samples))
            samples[:n] *= self._fade[:n].numpy()
            row.faded = True
        if len(samples):
            phrase.produced += len(samples)
            phrase.on_audio(samples)

    def _chunk_over(self, row: _Row) -> None:
        row.over = True
        if row.rest and not row.phrase.cancel.is_set():
            try:
                self._joining.append(self._prompt(row.phrase, row.rest[0], row.rest[1:]))
            except Exception as exc:
                self._end(row.phrase, exc)
            return
        self._end(row.phrase, None)

    def _end(self, phrase: Phrase, error: BaseException | None) -> None:
        with self._lock:
            self._phrases -= 1
        phrase.on_end(error)

    def _fail_all(self, error: BaseException | None) -> None:
        for row in self._rows + self._joining:
            if not row.over:
                row.over = True
                self._end(row.phrase, error)
        self._rows, self._joining = [], []
        self._flow = self._mimi = None

    def _refuse_waiting(self) -> None:
        """End what is still in the inbox once the loop is over: its callers would wait forever."""
        closed = EngineClosed("the TTS engine closed")
        items: list[Phrase | _Job | _Stop] = [*self._jobs]
        self._jobs.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._inbox.get_nowait())
        for item in items:
            if isinstance(item, Phrase):
                self._end(item, closed)
            elif not isinstance(item, _Stop) and item[2].set_running_or_notify_cancel():
                item[2].set_exception(closed)
