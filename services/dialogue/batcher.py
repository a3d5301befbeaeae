"""Many conversations, one Moshi: a fixed table of slots (batch rows) stepped together every tick.

Every tick runs ONE Mimi encode, ONE `LMGen.step` and ONE Mimi decode for the whole batch. The batch
size never changes (CUDA graphs are captured for one size); sessions come and go by row:
- a joining session resets only its row (`reset_streaming(mask)` on Mimi and LMGen);
- rows without a session are masked out (`set_exec_mask`): their state does not advance;
- a session's first user frame resets its Mimi row after encoding, as moshi's server does for its one
  connection (that frame is "in the past" for the model and carries the encoder's left padding);
- persona priming: the session's primer tokens replace the sampled text token of its row, one per step
  (LMGen's `on_text_hook`), while its user stream is silence; its output is not published until the
  first step after the primer has come out of the model's acoustic delay;
- per-row sampling (`sampling.py`): each row's text and audio temperature and top-k, padding bias,
  repetition penalty and seeds, as batched tensor ops; a row's draws depend on its seeds and its own
  step count only, so a seeded session samples the same whatever else is in the batch;
- context rollover (`roll_over`): a session whose row nears the model's context gets a fresh state,
  primed like a joining session. On a free row it is primed while the old row keeps talking, hears the
  user's audio once its primer is in, and takes over at the first step its output is due: that step's
  frame is the old row's crossfaded into the fresh one's, and the old row is freed. Without a free row
  the session's own row is reset and primed again: its frames are a gap (`RowOutput.gap`) until then.

The tick is lean on the host: the user audio goes through one persistent (pinned, on CUDA) host buffer
with a non-blocking copy, the row masks live on the device and are rebuilt only when the slot table
changes, nothing mid-tick waits on the device (what a mask holds is known on the host), and the text
tokens and the PCM of every row come back in ONE device-to-host copy. Joining rows are reset in one
batched call; with `graph_resets` (default: on CUDA with compile) that call is a CUDA graph, and the
two state tensors moshi reassigns each step (LMGen's `offsets`, a streaming conv's `first`) are
updated in place instead, so the graph always writes the live tensors. LMGen's own CUDA graphs replay
only while no row uses a LoRA adapter: a step with adapters runs eagerly (`_lm_graphs`), unless
CHORUS_DIALOGUE_LORA_GRAPHS made the bank graph-safe.

Nothing here knows about Redis: the worker feeds one frame per row and publishes what comes out.
Not thread-safe: one thread steps it (the worker's model thread); the slot table is changed only
between steps.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.utils.compile import CUDAGraphed, no_compile, no_cuda_graph

from services.dialogue.adapters import NO_ADAPTER, AdapterBank
from services.dialogue.model import MoshiModel
from services.dialogue.sampling import RowSampledLMGen, RowSampling
from shared.audio import FRAME_SAMPLES, FloatAudio
from shared.errors import NoCapacity
from shared.messages import Sampling

# State tensors moshi's streaming steps reassign (`state.x = torch.where(...)`) rather than update in place:
# a CUDA graph captured over them (the graphed reset) would go on writing the tensor of capture time.
_REASSIGNED_FIELDS = {"_LMGenState": "offsets", "_StreamingConv1dState": "first"}
_IN_PLACE_CLASSES: dict[type[State], type[State]] = {}

# The frame of a takeover: the old state's audio fades out as the fresh state's fades in (raised cosine).
_FADE_IN = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, FRAME_SAMPLES))).astype(np.float32)
_FADE_OUT = (1.0 - _FADE_IN).astype(np.float32)


class RolloverKind(enum.StrEnum):
    FREE_SLOT = "free_slot"  # primed on a free row beside the old one: no gap
    IN_PLACE = "in_place"  # no free row: the session's own row primed again, a gap meanwhile


@dataclass
class PendingRollover:
    """A rollover under way, kept on the session's current row."""

    kind: RolloverKind
    successor: int | None  # the row the fresh state is primed on (None: in place)
    frames: int  # steps the replaced state had taken
    gap_frames: int = 0  # steps the session has had no output of the model since (in place)


@dataclass(frozen=True)
class Rollover:
    """A finished rollover: the fresh state's first frame is in the output that carries it."""

    kind: RolloverKind
    frames: int  # steps the replaced state had taken
    primer_tokens: int
    gap_frames: int  # frames without the model's audio (0 with a free slot)


class Phase(enum.Enum):
    IDLE = "idle"  # no session: row masked out
    PRIMING = "priming"  # forcing the primer; the user stream is silence
    LIVE = "live"  # the user's audio in, the model's text and audio out


@dataclass
class Slot:
    """One batch row and the session in it."""

    row: int
    session_id: str | None = None
    forced: deque[int] = field(default_factory=deque)  # primer tokens still to force
    primer_length: int = 0
    age: int = 0  # steps taken since the session joined
    head_start: int = 0  # steps its state comes due for rollover early (`priming.rollover_head_start`)
    needs_reset: bool = False
    rollovers: int = 0  # fresh states this session got on this worker before this one
    replaces: int | None = None  # a fresh state, until it takes over from the session's row `replaces`
    pending: PendingRollover | None = None

    @property
    def phase(self) -> Phase:
        if self.session_id is None:
            return Phase.IDLE
        return Phase.PRIMING if self.forced else Phase.LIVE


@dataclass(frozen=True)
class RowOutput:
    """What one step gave one session."""

    session_id: str
    row: int
    phase: Phase  # during this step
    went_live: bool  # this step consumed the session's first user frame: it is ready
    text_token: int | None  # the text token of this frame; None = nothing to publish yet
    # Re-primed in place: nothing of the model this step, though the session was live.
    gap: bool = field(default=False, kw_only=True)
    # A fresh state took over with this frame (`row` is the session's row from now on).
    rollover: Rollover | None = field(default=None, kw_only=True)
    pcm: FloatAudio | None  # [1920] float32 native audio; None = nothing to publish yet (last: it is big)


class Batcher:
    def __init__(
        self,
        model: MoshiModel,
        slots: int,
        *,
        audio_temperature: float = 0.8,
        audio_top_k: int = 250,
        compile: bool = False,
        graph_resets: bool | None = None,
        adapters: AdapterBank | None = None,
    ) -> None:
        self.model = model
        self.adapters = adapters  # per-row LoRA (services/dialogue/adapters.py); None: the plain LM
        self.slots = [Slot(row) for row in range(slots)]
        self.compile = compile
        device = model.device
        self._cuda = device.type == "cuda"
        self.graph_resets = self._cuda and compile if graph_resets is None else graph_resets
        lm = model.lm
        self.sampling = RowSampling(
            slots,
            text_card=lm.text_linear.out_features,
            audio_card=lm.card,
            audio_codebooks=lm.dep_q,
            padding_tokens=(lm.existing_text_padding_id, lm.existing_text_end_padding_id),
            audio_temperature=audio_temperature,
            audio_top_k=audio_top_k,
            device=device,
        )
        self._force_tokens = torch.full((slots,), -1, dtype=torch.long, device=device)  # -1: not forced
        self._forcing = False
        # The user audio of a tick: written on the host, copied once (non-blocking) to the device.
        self._audio_host = torch.zeros((slots, 1, FRAME_SAMPLES), pin_memory=self._cuda)
        self._audio = self._audio_host.to(device) if self._cuda else self._audio_host
        self._audio_silent = True  # the device buffer holds silence (a priming step needs no copy)
        self._masks: dict[str, tuple[tuple[bool, ...], torch.Tensor]] = {}  # role -> (rows, device mask)
        self._gen_mask: torch.Tensor | None = None  # the exec mask LMGen holds now (None: unknown)
        self.mask_builds = 0  # device masks built so far (a new one only when the slot table changed)
        self.gen = RowSampledLMGen(
            model.lm,
            sampling=self.sampling,
            on_text_hook=self._force_text,
            on_text_logits_hook=self.sampling.shape_text,
            support_out_of_sync=True,  # rows start at different times: never hold back the whole batch
        )
        # Frames between a text token being sampled and its frame coming out (Moshi's acoustic delay).
        self.delay = self.gen.max_delay
        self.warmed_up = False
        self._streaming = contextlib.ExitStack()
        self._streaming.enter_context(model.mimi.streaming(slots))
        self._streaming.enter_context(self.gen.streaming(slots))
        if self.graph_resets:
            _update_in_place(model.mimi, self.gen)
        disable = not (self.graph_resets and self._cuda)
        self._reset_rows = CUDAGraphed(self._reset_models, disable=disable)
        self._reset_codec = CUDAGraphed(model.mimi.reset_streaming, disable=disable)

    def close(self) -> None:
        """Leave streaming mode, so the same model can be batched again (tests, benchmarks)."""
        self._streaming.close()

    # --- the slot table (called between steps) --------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    def free_rows(self) -> list[int]:
        return [s.row for s in self.slots if s.session_id is None]

    def seated_sessions(self) -> int:
        """Sessions holding rows (a session rolling over on a free row holds two: counted once)."""
        return len({s.session_id for s in self.slots if s.session_id is not None})

    def fresh_rows(self) -> int:
        """Rows held by a rollover's fresh state until it takes over (its session's second row)."""
        return sum(1 for s in self.slots if s.replaces is not None)

    def active(self) -> list[Slot]:
        return [s for s in self.slots if s.session_id is not None]

    def join(
        self,
        session_id: str,
        primer: Sequence[int] = (),
        sampling: Sampling | None = None,
        adapter_slot: int = NO_ADAPTER,
    ) -> int:
        """Seat a session on a free row; its row is reset before the next step. Returns the row.
        `adapter_slot`: the bank slot of the session's LoRA adapter (NO_ADAPTER: none)."""
        free = self.free_rows()
        if not free:
            raise NoCapacity(f"all {self.batch_size} slots are busy", session_id=session_id)
        if adapter_slot != NO_ADAPTER and self.adapters is None:
            raise NoCapacity("this worker serves no LoRA adapters", session_id=session_id)
        slot = self.slots[free[0]]
        _seat(slot, session_id, primer)
        self.sampling.start(slot.row, sampling or Sampling())
        self._use_adapter(slot.row, adapter_slot)
        return slot.row

    def leave(self, row: int) -> None:
        """Free a row: from the next step it is masked out (its state is reset when reused). A fresh state
        primed for its session goes with it."""
        slot = self.slots[row]
        if slot.pending is not None and slot.pending.successor is not None:
            self.leave(slot.pending.successor)
        if slot.replaces is not None:
            self.slots[slot.replaces].pending = None
        slot.session_id = None
        slot.forced.clear()
        slot.pending = slot.replaces = None
        self.sampling.clear(row)
        self._use_adapter(row, NO_ADAPTER)

    def _use_adapter(self, row: int, adapter_slot: int) -> None:
        if self.adapters is not None:
            self.adapters.assign(row, adapter_slot)

    def set_adapter(self, row: int, adapter_slot: int) -> None:
        """The session's rows (both, while it rolls over) use the adapter in `adapter_slot` from the next
        step on (the LoRA layers read the row -> slot table each step)."""
        if adapter_slot != NO_ADAPTER and self.adapters is None:
            raise NoCapacity("this worker serves no LoRA adapters")
        for changed in self._session_rows(row):
            self._use_adapter(changed, adapter_slot)

    def set_sampling(self, row: int, sampling: Sampling) -> None:
        for changed in self._session_rows(row):
            self.sampling.set(changed, sampling)

    def due_rollovers(self, at: int) -> list[Slot]:
        """The live sessions' rows that have taken `at` steps (less their head start) and have no rollover
        under way."""
        return [
            s
            for s in self.slots
            if s.phase is Phase.LIVE
            and s.replaces is None
            and s.pending is None
            and s.age + s.head_start >= at
        ]

    def frames_until_due(self, at: int, *, besides: int | None = None) -> list[int]:
        """For every state that will come due for a rollover at `at` (not one a fresh state replaces, nor
        the one on row `besides`): the steps until it does (0 or less: due)."""
        return [
            at - s.head_start - s.age
            for s in self.slots
            if s.session_id is not None
            and s.row != besides
            and (s.pending is None or s.pending.successor is None)
        ]

    def give_head_start(self, row: int, frames: int) -> None:
        """The state on `row` comes due `frames` steps early (once: a rollover's fresh state has none)."""
        self.slots[row].head_start = frames

    def roll_over(self, row: int, primer: Sequence[int], *, in_place: bool = False) -> RolloverKind:
        """Give the session on `row` a fresh state primed with `primer`: on a free row while `row` goes on
        (it takes over once its output is due), else (or `in_place`) on `row` itself (reset before the next
        step)."""
        slot = self.slots[row]
        if slot.session_id is None or slot.replaces is not None or slot.pending is not None:
            raise ValueError(f"row {row} has no live session to roll over")
        free = self.free_rows()
        if in_place or not free:
            slot.pending = PendingRollover(RolloverKind.IN_PLACE, None, slot.age)
            _seat(slot, slot.session_id, primer, rollovers=slot.rollovers + 1)
            self.sampling.rewind(row)
            return RolloverKind.IN_PLACE
        fresh = self.slots[free[0]]
        _seat(fresh, slot.session_id, primer, rollovers=slot.rollovers + 1)
        fresh.replaces = row
        self.sampling.copy(row, fresh.row)
        if self.adapters is not None:
            self._use_adapter(fresh.row, self.adapters.slot_of(row))
        slot.pending = PendingRollover(RolloverKind.FREE_SLOT, fresh.row, slot.age)
        return RolloverKind.FREE_SLOT

    def _session_rows(self, row: int) -> list[int]:
        """`row` and the row of the fresh state primed for its session, if any."""
        pending = self.slots[row].pending
        return [row] if pending is None or pending.successor is None else [row, pending.successor]

    # --- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, audio: FloatAudio, *, prime_until: float | None = None) -> list[RowOutput]:
        """One tick for every row: `audio` is [batch, 1920] float32 user audio (rows not live: ignored).

        With `prime_until` (a time.monotonic() deadline), spare time after the step goes to extra
        steps of the priming rows alone (the others masked out, so they do not move): a primer is
        forced faster than real time when the batch has headroom, one token per tick when it has not.
        """
        if audio.shape != (self.batch_size, FRAME_SAMPLES):
            raise ValueError(f"expected audio [{self.batch_size}, {FRAME_SAMPLES}], got {audio.shape}")
        started = time.monotonic()
        outputs = self._live_step(audio)
        step_s = time.monotonic() - started
        while prime_until is not None and any(s.forced for s in self.slots):
            if time.monotonic() + step_s > prime_until:
                break
            self._priming_step()
        return outputs

    def _live_step(self, audio: FloatAudio) -> list[RowOutput]:
        slots = self.active()
        phases = [s.phase for s in self.slots]
        with self._compile_mode():
            self._reset_joined_rows()
            self._load_audio(audio, [phase is Phase.LIVE for phase in phases])
            tokens, pcm = self._fetch(*self._run_models(phases, "active"))
        outputs: list[RowOutput] = []
        takeovers: list[tuple[Slot, Slot]] = []
        for slot in slots:
            if slot.replaces is not None:
                continue  # a fresh state's frames go out with its session's row's, from the takeover on
            out = self._output(slot, phases[slot.row], tokens, pcm)
            fresh = self._successor(slot)
            if fresh is not None and self._due(fresh, tokens):
                out = self._takeover(slot, fresh, out, tokens, pcm)
                takeovers.append((slot, fresh))
            outputs.append(out)
        for slot in slots:
            slot.age += 1
        for old, fresh in takeovers:
            old.pending = fresh.replaces = None
            self.leave(old.row)
        return outputs

    def _successor(self, slot: Slot) -> Slot | None:
        pending = slot.pending
        return (
            self.slots[pending.successor] if pending is not None and pending.successor is not None else None
        )

    def _due(self, slot: Slot, tokens: list[int]) -> bool:
        """This step's output of `slot` is its own (past its primer and the acoustic delay)."""
        return slot.age >= slot.primer_length + self.delay and tokens[slot.row] >= 0

    def _takeover(
        self, old: Slot, fresh: Slot, out: RowOutput, tokens: list[int], pcm: FloatAudio
    ) -> RowOutput:
        """The first frame of the fresh state, its audio faded in over the old state's (no click)."""
        assert old.pending is not None and fresh.session_id is not None
        mixed = pcm[fresh.row] * _FADE_IN
        if out.pcm is not None:
            mixed = mixed + out.pcm * _FADE_OUT
        done = Rollover(RolloverKind.FREE_SLOT, old.pending.frames, fresh.primer_length, gap_frames=0)
        return RowOutput(
            fresh.session_id, fresh.row, Phase.LIVE, False, tokens[fresh.row], mixed, rollover=done
        )

    def _priming_step(self) -> None:
        """A step of the priming rows alone, on silence; its output is never published (it is within
        the primer), so nothing comes back to the host."""
        slots = [s for s in self.active() if s.forced]
        priming = {s.row for s in slots}
        phases = [Phase.PRIMING if row in priming else Phase.IDLE for row in range(self.batch_size)]
        with self._compile_mode():
            self._reset_joined_rows()
            self._load_audio(None, [False] * self.batch_size)
            self._run_models(phases, "priming")
            if self._cuda:  # the time of a step is what bounds priming: wait for it
                torch.cuda.current_stream(self.model.device).synchronize()
        for slot in slots:
            slot.age += 1

    def _load_audio(self, audio: FloatAudio | None, live: list[bool]) -> None:
        """This tick's user audio into the device buffer: live rows only, the others silent. A fresh
        state primed for a session hears what its session's row hears."""
        if not any(live):
            if not self._audio_silent:
                self._audio.zero_()
                self._audio_silent = True
            return
        assert audio is not None
        host = self._audio_host.numpy()[:, 0]
        np.copyto(host, audio, casting="same_kind")
        for slot in self.slots:
            if slot.replaces is not None:
                host[slot.row] = host[slot.replaces]
        host[~np.array(live)] = 0.0
        if self._cuda:
            self._audio.copy_(self._audio_host, non_blocking=True)
        self._audio_silent = False

    def _run_models(self, phases: list[Phase], role: str) -> tuple[torch.Tensor, torch.Tensor]:
        mimi = self.model.mimi
        active = self._mask(role, [phase is not Phase.IDLE for phase in phases])
        mimi.set_exec_mask(active)
        if self._gen_mask is not active:  # LMGen's mask moves only with the slot table (or a reset)
            self.gen.set_exec_mask(active)
            self._gen_mask = active
        codes = mimi.encode(self._audio)
        first = [p is not Phase.IDLE and s.age == 0 for p, s in zip(phases, self.slots, strict=True)]
        if any(first):
            self._reset_codec(self._mask("first", first))  # moshi's server does this after its first frame
        self._prepare_forcing()
        with self._lm_graphs():
            tokens = self.gen.step(codes)
        assert tokens is not None  # support_out_of_sync: always a tensor, ungenerated rows negative
        generated = active & (tokens[:, 1:, 0] >= 0).all(dim=1)
        mimi.set_exec_mask(generated)  # rows with nothing generated yet keep their decoder state
        out = mimi.decode(tokens[:, 1:].clamp(min=0))
        return tokens[:, 0, 0], out[:, 0]

    def _lm_graphs(self) -> contextlib.AbstractContextManager[None]:
        """LMGen's CUDA graphs (main transformer, depformer) replay only while no row uses an adapter: they
        are captured then (warmup), with the LoRA layers' host-side plan "no adapter" frozen into them. A
        step with adapters in use runs eagerly, its plan read by Python (per-adapter groups of rows).
        A graph-safe bank (CHORUS_DIALOGUE_LORA_GRAPHS: the grouped path on every step, captured with it)
        keeps them on."""
        adapters = self.adapters
        if self._cuda and adapters is not None and adapters.in_use and not adapters.graph_safe:
            eager: contextlib.AbstractContextManager[None] = no_cuda_graph()
            return eager
        return contextlib.nullcontext()

    def _fetch(self, tokens: torch.Tensor, pcm: torch.Tensor) -> tuple[list[int], FloatAudio]:
        """The text tokens and PCM of every row on the host, in one copy ([B, 1 + 1920] float32: a text
        token id is exact in float32). The array is new each tick: outputs may outlive the next step."""
        packed = torch.cat([tokens[:, None].float(), pcm.float()], dim=1)
        if self._cuda:
            host = torch.empty(packed.shape, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            torch.cuda.current_stream(self.model.device).synchronize()
            packed = host
        values = packed.numpy()
        return values[:, 0].astype(np.int64).tolist(), values[:, 1:]

    def _output(self, slot: Slot, phase: Phase, tokens: list[int], pcm: FloatAudio) -> RowOutput:
        assert slot.session_id is not None
        # The frame out of this step belongs to the step `delay` earlier: published once past the primer.
        published = self._due(slot, tokens)
        gap, rollover = False, None
        if slot.pending is not None and slot.pending.kind is RolloverKind.IN_PLACE:
            gap, rollover = self._in_place(slot, published)
        return RowOutput(
            session_id=slot.session_id,
            row=slot.row,
            phase=phase,
            went_live=phase is Phase.LIVE and slot.age == slot.primer_length and not slot.rollovers,
            text_token=tokens[slot.row] if published else None,
            pcm=pcm[slot.row] if published else None,
            gap=gap,
            rollover=rollover,
        )

    def _in_place(self, slot: Slot, published: bool) -> tuple[bool, Rollover | None]:
        """A row primed again in place: a gap until its output is due, then the rollover is done."""
        pending = slot.pending
        assert pending is not None
        if not published:
            pending.gap_frames += 1
            return True, None
        slot.pending = None
        return False, Rollover(pending.kind, pending.frames, slot.primer_length, pending.gap_frames)

    def _mask(self, role: str, rows: list[bool]) -> torch.Tensor:
        """The device mask of `rows` for one role, copied to the device only when it changed."""
        key = tuple(rows)
        cached = self._masks.get(role)
        if cached is not None and cached[0] == key:
            return cached[1]
        host = torch.tensor(key, dtype=torch.bool, pin_memory=self._cuda)
        mask = host.to(self.model.device, non_blocking=True)
        self._masks[role] = (key, mask)
        self.mask_builds += 1
        return mask

    def _reset_joined_rows(self) -> None:
        rows = [s.needs_reset for s in self.slots]
        if not any(rows):
            return
        for slot in self.slots:
            slot.needs_reset = False
        self._reset_rows(self._mask("reset", rows))
        self._gen_mask = None  # a reset sets the exec mask of its rows

    def _reset_models(self, mask: torch.Tensor) -> None:
        """Every streaming state of the reset rows, Mimi's and LMGen's (one CUDA graph with graph_resets)."""
        self.model.mimi.reset_streaming(mask)
        self.gen.reset_streaming(mask)

    def _prepare_forcing(self) -> None:
        """Pop this step's primer token of every priming row (one host-to-device copy, not one per row)."""
        tokens = [s.forced.popleft() if s.session_id is not None and s.forced else -1 for s in self.slots]
        self._forcing = any(t >= 0 for t in tokens)
        if self._forcing:
            forced = torch.tensor(tokens, dtype=torch.long, pin_memory=self._cuda)
            self._force_tokens.copy_(forced, non_blocking=True)

    # --- LMGen hooks (run inside gen.step) ------------------------------------------------------

    def _force_text(self, text_token: torch.Tensor) -> None:
        """Replace the sampled text token of priming rows by their primer's next token."""
        if self._forcing:
            forced = self._force_tokens
            text_token.copy_(torch.where(forced >= 0, forced, text_token))

    @contextlib.contextmanager
    def _compile_mode(self) -> Iterator[None]:
        if self.compile:
            yield
        else:
            with no_compile():
                yield

    def warmup(self, steps: int = 4) -> None:
        """Before any session joins: a few full steps on silence (CUDA graphs and kernels get built, the
        graphed resets captured), then every row is reset."""
        sessions = [s.session_id for s in self.slots]
        for slot in self.slots:
            slot.session_id, slot.age = "warmup", 0
        silence = np.zeros((self.batch_size, FRAME_SAMPLES), dtype=np.float32)
        for _ in range(steps):
            self.step(silence)
        every_row = self._mask("warmup", [True] * self.batch_size)
        with self._compile_mode():
            for _ in range(2):  # the first call runs eagerly, the second captures the graph
                self._reset_rows(every_row)
                self._reset_codec(every_row)
        self._gen_mask = None
        for slot, session_id in zip(self.slots, sessions, strict=True):
            slot.session_id, slot.age, slot.needs_reset = session_id, 0, True
        self.warmed_up = True


def _seat(slot: Slot, session_id: str, primer: Sequence[int], *, rollovers: int = 0) -> None:
    """A fresh state for `session_id` on `slot`: reset before the next step, then primed with `primer`."""
    slot.session_id = session_id
    slot.forced = deque(primer)
    slot.primer_length = len(primer)
    slot.age = slot.head_start = 0
    slot.needs_reset = True
    slot.rollovers = rollovers


def _update_in_place(*modules: StreamingModule[Any]) -> None:
    """Make the state fields moshi reassigns each step update their tensor in place instead."""
    for module in modules:
        for state in module.get_streaming_state().values():
            name = _REASSIGNED_FIELDS.get(type(state).__name__)
            if name is not None and state is not None:
                state.__class__ = _in_place_class(type(state), name)


def _in_place_class(cls: type[State], name: str) -> type[State]:
    if cls not in _IN_PLACE_CLASSES:

        def get(state: State) -> torch.Tensor:
            tensor: torch.Tensor = state.__dict__[name]
            return tensor

        def set_(state: State, value: torch.Tensor) -> None:
            state.__dict__[name].copy_(value)

        _IN_PLACE_CLASSES[cls] = type(f"{cls.__name__}InPlace", (cls,), {name: property(get, set_)})
    return _IN_PLACE_CLASSES[cls]
