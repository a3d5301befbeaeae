from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.dialogue.priming import check_context, check_rollover_at
from shared.settings import CommonSettings


class DialogueSettings(CommonSettings):
    dialogue_http_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="Port of this worker's /healthz, /readyz, /metrics (0 = off).",
    )
    dialogue_http_host: str = Field(
        default="127.0.0.1",
        description="Interface of this worker's /healthz, /readyz, /metrics: loopback unless set (Kubernetes "
        "sets the pod IP, so probes and Prometheus reach it; 0.0.0.0 exposes it on every interface).",
    )
    moshi_repo: str = Field(
        default="kyutai/moshiko-pytorch-bf16",
        description="Hugging Face repo of the Moshi checkpoint (moshika, `-q8` variants too).",
    )
    moshi_dir: Path | None = Field(
        default=None,
        description="Local checkpoint directory (config.json, LM and Mimi weights, tokenizer); "
        "overrides the repo. `chorus dev make-checkpoints DIR` writes one to DIR/moshi.",
    )
    dialogue_model: Literal["moshiko", "moshika"] | None = Field(
        default=None,
        description="Which voice this checkpoint is; unset: `moshika` if the repo/dir name says so, "
        "else `moshiko`. Sessions asking for the other model are left to its workers.",
    )
    dialogue_slots: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Sessions served at once: the batch size of every step. On an 80 GB GPU at bf16, 32 "
        '(an H100 ran 40 in real time, at 94 % of its memory; docs/performance.md, "Sessions per GPU"); '
        "the GPU overlay sets 32.",
    )
    dialogue_device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="Where the model runs; auto = cuda when present, else cpu."
    )
    dialogue_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="LM weights dtype; auto = bfloat16 on cuda, float32 on cpu."
    )
    dialogue_weights: Literal["float", "int8"] = Field(
        default="float",
        description="LM linear layers: `float` (in CHORUS_DIALOGUE_DTYPE) or `int8` (int8 weights, one "
        "scale per output row: half the weight memory of bf16). A `-q8` checkpoint is int8 whatever "
        "this says.",
    )
    dialogue_kv_cache: Literal["float", "int8"] = Field(
        default="float",
        description="The LM's KV cache: `float` (moshi's ring cache in the LM's dtype) or `int8` (one "
        "scale per head and position: about half the memory of bf16 per session; on a CUDA worker read in "
        "place by a Triton kernel, elsewhere through a dequantized copy). Measured on an H100 with bf16 "
        "weights: 80 real-time sessions at the published context (40 with a bf16 cache), 152 with a "
        '1500-frame context (docs/performance.md, "An int8 KV cache with bf16 weights").',
    )
    dialogue_context: int | None = Field(
        default=None,
        ge=1,
        description="Frames of the conversation the LM attends over: each session's KV cache holds this many "
        "steps. Unset: the checkpoint's (3000 for the published Moshi, 4 minutes). Shorter: each session's "
        "cache, and each step's read of it, shrink in proportion, so more sessions fit a GPU (80 real-time "
        'per H100 at 1500 in bf16, against 40 at 3000: docs/performance.md, "A shorter context"); Moshi '
        "itself remembers less of the conversation, and the "
        "default context rollover comes sooner (the fresh state is primed with the transcript's tail). At "
        "most the checkpoint's context; at least twice the rollover margin "
        "(`CHORUS_DIALOGUE_MAX_PRIMER_TOKENS` plus the acoustic delay plus 2 s): a worker refuses to "
        "start otherwise. With `CHORUS_DIALOGUE_ROLLOVER_AT=0` the shorter cache wraps instead (the persona "
        "fades sooner).",
    )
    dialogue_compile: bool | None = Field(
        default=None,
        description="Let moshi torch.compile its hot functions; unset = on for cuda, off for cpu "
        "(on CPU it only adds start-up time).",
    )
    dialogue_tick_ms: float = Field(
        default=80.0, gt=0, description="Interval between batched steps (one Mimi frame is 80 ms)."
    )
    dialogue_input_buffer_frames: int = Field(
        default=25,
        ge=2,
        description="Per-session bound of buffered user frames (25 = 2 s); older ones are dropped.",
    )
    dialogue_jitter_frames: int = Field(
        default=1,
        ge=0,
        description="Frames of user audio buffered before a session's timeline starts; absorbs "
        "network jitter at the cost of this much latency.",
    )
    dialogue_audio_temperature: float = Field(
        default=0.8, ge=0.0, le=2.0, description="Audio sampling temperature of sessions that set none."
    )
    dialogue_audio_top_k: int = Field(
        default=250, ge=1, le=2048, description="Audio sampling top-k of sessions that set none."
    )
    dialogue_max_primer_tokens: int = Field(
        default=64,
        ge=0,
        description="Bound on the text tokens forced into a session before it starts (persona primer "
        "plus, after a failover, the transcript's tail); each costs one 80 ms tick of priming.",
    )

    dialogue_resume_history_tokens: int = Field(
        default=8,
        ge=0,
        description="After a failover, at most this many tokens of what the session said are forced "
        "(after the persona primer): more continuity, longer gap before the user hears it again.",
    )
    dialogue_utterance_pause_frames: int = Field(
        default=10,
        ge=1,
        description="80 ms frames without text that end an utterance (one transcript entry each).",
    )

    dialogue_rollover_at: int | None = Field(
        default=None,
        ge=0,
        description="Frames a session's model state takes before it rolls over to a fresh one, primed "
        "with the persona primer and the tail of the transcript (Moshi attends over a fixed context: 3000 "
        "frames, 4 minutes). Unset: the model's context minus a margin that primes the fresh state in time "
        "(`CHORUS_DIALOGUE_MAX_PRIMER_TOKENS` plus 2 s), off when the context is under twice that margin; "
        "0: off (the model's cache wraps, as Kyutai's server lets it). Must exceed the primer bound (plus "
        "the acoustic delay) and leave that bound plus 2 s before the context: a worker refuses to start "
        "otherwise.",
    )
    dialogue_rollover_history_tokens: int = Field(
        default=32,
        ge=0,
        description="At a context rollover, at most this many tokens of what the session said are forced "
        "(after the persona primer, within `CHORUS_DIALOGUE_MAX_PRIMER_TOKENS`): docs/personas.md.",
    )

    dialogue_rollover_reserve: int = Field(
        default=0,
        ge=0,
        description="Rows of the batch that placement and failover leave free for context rollovers, so "
        "that a full worker still rolls a session over on a free row (no pause) instead of in place (a "
        "pause of up to the primer bound while the fresh state is primed). The worker serves "
        "`CHORUS_DIALOGUE_SLOTS` minus this many sessions; sessions placed together have their first "
        "rollovers spaced (the primer bound over these rows apart) so that the kept rows keep up. 0: none. "
        "Less than the slots, and only with rollover on: a worker refuses to start otherwise.",
    )
    dialogue_prime_ahead: bool = Field(
        default=True,
        description="Use a tick's spare time for extra steps of the rows still priming (the others "
        "masked out), so primers are forced faster than real time when the batch has headroom.",
    )

    dialogue_adapter_memory: int = Field(
        default=0,
        ge=0,
        description="Bytes of device memory for LoRA adapters (fine-tuned personas, docs/personas.md): "
        "the worker keeps as many adapter slots of `CHORUS_DIALOGUE_ADAPTER_MAX_RANK` as fit (at most 64), "
        "loads an adapter on first use and evicts the least recently used one no session uses. 0: this "
        "worker serves no adapters (its step has no LoRA at all). Refused with int8 weights.",
    )
    dialogue_adapter_max_rank: int = Field(
        default=128,
        ge=1,
        le=1024,
        description="Highest LoRA rank this worker serves (a slot's size; smaller ranks are zero-padded).",
    )

    dialogue_lora_kernel: Literal["auto", "grouped", "per_adapter"] = Field(
        default="auto",
        description="How the LoRA layers add each row's update (docs/performance.md, LoRA): `per_adapter` "
        "(two thin matmuls per adapter in use: kernels grow with the adapters) or `grouped` (two "
        "grouped matmuls over every slot, static shapes: as many kernels for 8 adapters as for 1; needs "
        "the rank bound a multiple of 16 bytes, and on CUDA compute capability 9.0+). auto: `grouped` "
        "on such a GPU in bfloat16 or with CHORUS_DIALOGUE_LORA_GRAPHS, else `per_adapter` (faster on "
        "the CPU: bench/bench_lora.py).",
    )
    dialogue_lora_graphs: bool | None = Field(
        default=None,
        description="Keep LMGen's CUDA graphs on while rows use adapters: the grouped LoRA path then runs "
        "on every step (no-adapter rows add zero), so the graph captured at warm-up serves every step. "
        "Off: a step with adapters runs eagerly. Unset = on where the worker replays CUDA graphs (CUDA, "
        "NO_CUDA_GRAPH unset) and the grouped kernel can run (bfloat16, compute capability 9.0+, an "
        "aligned rank bound, CHORUS_DIALOGUE_LORA_KERNEL not per_adapter), else off. On an H100 (32 "
        "sessions, rank 128) a tick with 8 distinct adapters took 1.4x the plain LM's with it, 4-10x "
        "eagerly (docs/performance.md, LoRA); it costs 1.3x with no adapter in use.",
    )

    @model_validator(mode="after")
    def _graphs_need_the_grouped_kernel(self) -> DialogueSettings:
        if self.dialogue_lora_graphs and self.dialogue_lora_kernel == "per_adapter":
            raise ValueError(
                "dialogue_lora_graphs needs dialogue_lora_kernel grouped (or auto): the per_adapter "
                "kernel's plan is a host decision a CUDA graph would freeze"
            )
        return self

    @property
    def dialogue_capacity(self) -> int:
        """Sessions a worker serves at once: its slots, less those kept for rollovers."""
        return self.dialogue_slots - self.dialogue_rollover_reserve

    @model_validator(mode="after")
    def _context_fits_a_rollover(self) -> DialogueSettings:
        # Before any model loads (minutes for the 7B): without the acoustic delay, which only the
        # checkpoint knows; the worker checks again with it once the model is loaded. A rollover set
        # past a shortened context is refused here; past the checkpoint's own, only once it is known.
        check_context(self.dialogue_context, self.dialogue_max_primer_tokens)
        check_rollover_at(self.dialogue_rollover_at, self.dialogue_context, self.dialogue_max_primer_tokens)
        return self

    @model_validator(mode="after")
    def _a_row_left_to_place(self) -> DialogueSettings:
        if self.dialogue_rollover_reserve >= self.dialogue_slots:
            raise ValueError(
                f"dialogue_rollover_reserve ({self.dialogue_rollover_reserve}) must be under dialogue_slots "
                f"({self.dialogue_slots}): the worker would place no session"
            )
        if self.dialogue_rollover_reserve and self.dialogue_rollover_at == 0:
            raise ValueError(
                "dialogue_rollover_reserve keeps rows for rollovers: dialogue_rollover_at 0 turns them off"
            )
        return self


@lru_cache
def get_settings() -> DialogueSettings:
    return DialogueSettings()
