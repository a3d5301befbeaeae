"""Per-row sampling of the shared batch: every session's own temperature, top-k, padding bias, repetition
penalty and seeds, as batched tensor ops.

Sampling is the Gumbel-max trick: among a row's top-k tokens, the one whose shaped logit over the row's
temperature plus Gumbel noise is largest, which draws from the softmax at that temperature. The noise is
computed for the top-k candidates only (a few hundred values a row, not the vocabulary). It is not drawn
from a generator shared by the batch but computed from a counter: a hash of (the row's seed, the row's
step, the stream, the token id). A row's draws therefore depend only on its seeds and on how many steps
its state has taken, never on the other rows: the same seeds, primer and input audio give the same text
and audio codes wherever the session sits and whoever shares its batch. A temperature of 0 is greedy (no
noise). A row whose session gave no seed gets one drawn at random when it joins.

Text is sampled in LMGen's `on_text_logits_hook`, which leaves only the chosen token's logit finite
(LMGen then takes their argmax: it runs with `use_sampling=False`); audio in
`RowSampledLMGen.depformer_step`, which on CUDA runs inside LMGen's CUDA graph: there everything it reads
is a tensor updated in place, never a host value (its top-k candidates are the whole codebook, sorted).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from moshi.models import LMGen

from shared.messages import REPETITION_CONTEXT_MAX, Sampling

_MASK32 = 0xFFFFFFFF
_Hashed = TypeVar("_Hashed", torch.Tensor, int)


def _mix(x: _Hashed) -> _Hashed:
    """A 32-bit integer hash (xor-shift-multiply) of values below 2**32, on int64 tensors or ints. The
    multipliers are below 2**31, so no product leaves the int64 range."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def _split(seed: int) -> tuple[int, int]:
    return seed & _MASK32, seed >> 32


class RowSampling:
    """The sampling settings of every row, on the device, and the noise they draw."""

    def __init__(
        self,
        rows: int,
        *,
        text_card: int,
        audio_card: int,
        audio_codebooks: int,
        padding_tokens: tuple[int, int],
        audio_temperature: float,
        audio_top_k: int,
        device: torch.device,
    ) -> None:
        self.rows = rows
        self.text_card = text_card
        self.audio_card = audio_card
        self.padding_tokens = padding_tokens  # the text padding token, then the end-of-padding token
        self.default_audio = (audio_temperature, audio_top_k)
        self.text_temperature = torch.ones(rows, device=device)
        self.audio_temperature = torch.ones(rows, device=device)
        # Idle rows keep k=1, so the batch's largest text k is the largest a session asked for.
        self.text_top_k = torch.ones(rows, dtype=torch.long, device=device)
        self.text_top_k_rows = [1] * rows  # the same on the host: the batch's largest k without a device read
        self.audio_top_k = torch.ones(rows, dtype=torch.long, device=device)
        self.audio_top_k_rows = [1] * rows
        self.graphed = device.type == "cuda"  # LMGen graphs its depformer step on CUDA only
        self.pad_bias = torch.zeros(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.penalty_rows = [1.0] * rows
        self.penalty_context = torch.zeros(rows, dtype=torch.long, device=device)
        # Each row's recent text tokens, oldest first (-1: none); padding is never recorded.
        self.recent = torch.full((rows, REPETITION_CONTEXT_MAX), -1, dtype=torch.long, device=device)
        self.keys = torch.zeros((rows, 2, 2), dtype=torch.long, device=device)  # [row, text/audio, lo/hi]
        self.steps = torch.zeros(rows, dtype=torch.long, device=device)  # steps this row's state has taken
        self._columns = torch.arange(max(REPETITION_CONTEXT_MAX, text_card, audio_card), device=device)
        # The noise keys of a step, per row and stream (text, then each audio codebook): set before the step.
        streams = torch.arange(1 + audio_codebooks, device=device)
        self._stream_ids = _mix(streams + 1)
        self._stream_seeds = (
            streams > 0
        ).long()  # text streams use the text seed, the codebooks the audio one
        self.noise_keys = torch.zeros((rows, 1 + audio_codebooks), dtype=torch.long, device=device)

    # --- the table (between steps) ------------------------------------------------------------

    def start(self, row: int, sampling: Sampling) -> None:
        """A fresh state on `row` for a session: its seeds drawn if not given."""
        self.rewind(row)
        for stream, seed in enumerate((sampling.text_seed, sampling.audio_seed)):
            # Unseeded: drawn from torch's generator (a test or benchmark that seeds it replays the draws).
            chosen = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.keys[row, stream] = torch.tensor(_split(chosen))
        self.set(row, sampling)

    def set(self, row: int, sampling: Sampling) -> None:
        """A row's settings (a seed given here is used from the next step on). A penalty turned on here
        covers the text from now on: what the row said before was recorded only if a neighbour penalized,
        and a row samples the same whoever shares its batch."""
        if self.penalty_rows[row] == 1.0 and sampling.repetition_penalty != 1.0:
            self.recent[row] = -1
        audio_temperature = sampling.audio_temperature
        audio_top_k = sampling.audio_top_k
        self.text_temperature[row] = sampling.text_temperature
        self.text_top_k[row] = self.text_top_k_rows[row] = min(sampling.text_top_k, self.text_card)
        self.audio_temperature[row] = (
            self.default_audio[0] if audio_temperature is None else audio_temperature
        )
        self.audio_top_k[row] = self.audio_top_k_rows[row] = min(
            self.default_audio[1] if audio_top_k is None else audio_top_k, self.audio_card
        )
        self.pad_bias[row] = sampling.pad_mult
        self.penalty[row] = self.penalty_rows[row] = sampling.repetition_penalty
        self.penalty_context[row] = sampling.repetition_penalty_context
        for stream, seed in enumerate((sampling.text_seed, sampling.audio_seed)):
            if seed is not None:
                self.keys[row, stream] = torch.tensor(_split(seed))

    def copy(self, source: int, target: int) -> None:
        """`target` samples as `source` does (a fresh state for the same session), from its own step 0."""
        for tensor in (
            self.text_temperature,
            self.audio_temperature,
            self.text_top_k,
            self.audio_top_k,
            self.pad_bias,
            self.penalty,
            self.penalty_context,
            self.keys,
        ):
            tensor[target] = tensor[source]
        self.text_top_k_rows[target] = self.text_top_k_rows[source]
        self.audio_top_k_rows[target] = self.audio_top_k_rows[source]
        self.penalty_rows[target] = self.penalty_rows[source]
        self.rewind(target)

    def rewind(self, row: int) -> None:
        """A fresh state on `row`, same settings and seeds: its counter and recent tokens from zero."""
        self.steps[row] = 0
        self.recent[row] = -1

    def clear(self, row: int) -> None:
        """A row without a session: it no longer widens the batch's top-k nor turns the penalty on."""
        self.text_top_k[row] = self.text_top_k_rows[row] = 1
        self.audio_top_k[row] = self.audio_top_k_rows[row] = 1
        self.penalty[row] = self.penalty_rows[row] = 1.0

    # --- during a step ------------------------------------------------------------------------

    def shape_text(self, logits: torch.Tensor) -> None:
        """Text logits [B, 1, 1, card], in place: repetition penalty and padding bias, then the sample,
        the only logit left finite (LMGen's argmax picks it)."""
        shaped = logits[:, 0, 0].float()
        if any(p != 1.0 for p in self.penalty_rows):
            shaped = self._penalize(shaped)
        shaped[:, self.padding_tokens[0]] += self.pad_bias
        chosen = self._sample(
            shaped, max(self.text_top_k_rows), self.text_top_k, self.text_temperature, self.noise_keys[:, 0]
        )
        logits.fill_(float("-inf"))
        logits.scatter_(-1, chosen.view(-1, 1, 1, 1), 0.0)

    def sample_audio(self, logits: torch.Tensor, codebook: int) -> torch.Tensor:
        """Audio logits [B, 1, 1, card] of one codebook -> the sampled tokens [B]."""
        k_max = self.audio_card if self.graphed else max(self.audio_top_k_rows)
        shaped = logits[:, 0, 0].float()
        return self._sample(
            shaped, k_max, self.audio_top_k, self.audio_temperature, self.noise_keys[:, codebook + 1]
        )

    def prepare(self) -> None:
        """Before a step: every row's noise key of every stream, from its seeds and its step count."""
        step = _mix((self.steps & _MASK32)[:, None] ^ self._stream_ids[None, :])
        seeds = self.keys[:, self._stream_seeds]  # [B, streams, lo/hi]
        self.noise_keys.copy_(_mix(seeds[..., 0] ^ _mix(seeds[..., 1] ^ step)))

    def record(self, text_token: torch.Tensor, executed: torch.Tensor) -> None:
        """After a step: the text tokens [B] it wrote join their rows' recent tokens (rows that ran only)."""
        if any(p != 1.0 for p in self.penalty_rows):
            padding = (text_token == self.padding_tokens[0]) | (text_token == self.padding_tokens[1])
            token = torch.where(padding, -1, text_token)
            shifted = torch.cat([self.recent[:, 1:], token[:, None]], dim=1)
            self.recent.copy_(torch.where(executed[:, None], shifted, self.recent))

    def advance(self, executed: torch.Tensor) -> None:
        self.steps.add_(executed.long())

    def _penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """CTRL's repetition penalty over each row's last `repetition_penalty_context` text tokens: a
        positive logit is divided by the penalty, a negative one multiplied."""
        window = (
            self._columns[:REPETITION_CONTEXT_MAX] >= REPETITION_CONTEXT_MAX - self.penalty_context[:, None]
        )
        valid = (self.recent >= 0) & window
        counts = torch.zeros_like(logits)
        counts.scatter_add_(1, self.recent.clamp(min=0), valid.float())
        penalty = self.penalty[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(counts > 0, penalized, logits)

    def _sample(
        self,
        logits: torch.Tensor,
        k_max: int,
        top_k: torch.Tensor,
        temperature: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """[B, card] float logits -> a token [B] per row: among the row's `top_k` best, the argmax of logit
        over temperature plus Gumbel noise (no noise at temperature 0: greedy)."""
        values, ids = logits.topk(k_max, dim=-1)  # best first
        values = values.masked_fill(self._columns[:k_max] >= top_k[:, None], float("-inf"))
        hot = temperature > 0
        scores = values / torch.where(hot, temperature, 1.0)[:, None] + _gumbel(keys, ids) * hot[:, None]
        return ids.gather(-1, scores.argmax(dim=-1, keepdim=True))[:, 0]


def _gumbel(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [B, k] for the token `ids` [B, k] of rows whose noise keys (seed, step, stream) are
    `keys` [B]: a function of each row's own key and the token id alone."""
    bits = _mix(keys[:, None] ^ ((ids * 0x61C88647) & _MASK32)) >> 8  # 24 bits: exact in float32
    uniform = (bits.float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


class RowSampledLMGen(LMGen):  # type: ignore[misc]  # moshi is untyped here (follow_imports = skip)
    """LMGen whose depformer samples each audio codebook per row (`RowSampling.sample_audio`), and whose
    rows count their steps and record their text tokens. Run with `use_sampling=False` (the text is
    sampled through the text logits hook) and no CFG."""

    def __init__(self, lm_model: Any, *, sampling: RowSampling, on_text_hook: Any, **kwargs: Any) -> None:
        super().__init__(lm_model, use_sampling=False, on_text_hook=self._text_chosen, **kwargs)
        if self.cfg_coef != 1.0:
            raise ValueError("per-row sampling does not do classifier-free guidance")
        self.row_sampling = sampling
        self.choose_text = on_text_hook  # may replace the sampled token (priming) before it is recorded

    def _text_chosen(self, text_token: torch.Tensor) -> None:
        self.choose_text(text_token)
        state = self._streaming_state
        assert state is not None
        self.row_sampling.record(text_token, state.exec_mask)

    def _step(
        self, input_tokens: torch.Tensor, depformer_replace_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        self.row_sampling.prepare()
        out: tuple[torch.Tensor, torch.Tensor] | None = super()._step(input_tokens, depformer_replace_tokens)
        state = self._streaming_state
        assert state is not None
        self.row_sampling.advance(state.exec_mask)
        return out

    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        lm_model = self.lm_model
        assert lm_model.depformer is not None
        previous = text_token
        tokens: list[torch.Tensor] = []
        with lm_model.depformer.streaming(text_token.shape[0]):
            for codebook in range(lm_model.dep_q):
                logits = lm_model.forward_depformer(codebook, previous[:, None, None], transformer_out)
                previous = self.row_sampling.sample_audio(logits, codebook)
                tokens.append(previous)
        return torch.stack(tokens, dim=1)
