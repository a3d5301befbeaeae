"""Per-row LoRA: every row of the batch may use a different adapter, or none, in the same LM step.

moshi fuses one adapter into the weights (`replace_lora_with_linear`): one adapter per model. Here every
linear layer of the LM (the ones moshi's `replace_all_linear_with_lora` wraps: all of them) becomes a
`RowLoRALinear`: the frozen layer plus, for each row with an adapter, that row's update
`scaling · B (A x)`. The adapters sit stacked in a fixed number of device slots (`AdapterBank`); slot 0
is "no adapter". Every tensor is allocated once and updated in place (an adapter loaded into a slot), so
adapters are hot-added between steps without a restart.

The work is per adapter in use, not per row (as Punica / S-LoRA group rows by adapter). The host knows
which row uses which slot: when that changes, the bank plans the step once (`_Layout`: for each slot in
use, its rows, a contiguous run as a slice or else an index tensor on the device) and every layer reads
the plan. A layer then runs its frozen matmul and, per slot in use, two thin matmuls over that slot's
rows at that adapter's own rank (a view of the slot: nothing is gathered or copied), added into the
rows' output (in place for a run, `index_add_` otherwise). No row with an adapter: no LoRA work at all.

That is the `per_adapter` kernel: its kernel count grows with the adapters in use (about three per
adapter per layer) and its plan is a Python decision, so a CUDA graph captured over a step would freeze
it: the batcher replays LMGen's graphs only while no row uses an adapter (they are captured then), and
steps eagerly otherwise (services/dialogue/batcher.py).

The `grouped` kernel (CHORUS_DIALOGUE_LORA_KERNEL) has static shapes: the rows sorted by slot (`perm`, a
device tensor of the batch's length) and the group ends of every slot, slot 0 included (`offs`), are
written in place (`copy_`) when the row -> slot table changes, never re-allocated; a layer gathers its
input in slot order, runs two `torch._grouped_mm` over every slot at `max_rank` (smaller ranks are
zero-padded, slot 0 is all zeros, so its rows add zero) and adds the result back by `index_add_`: four
kernels per layer whatever the adapters in use, no host decision, no host sync. Every row must be in a
group (grouped_mm leaves rows past the last offset unwritten: garbage), hence slot 0 is one. grouped_mm
needs every matrix's leading stride a multiple of 16 bytes: `max_rank` must be (`_grouped_problem`), and
a layer whose input width is not (the small test model's gating) keeps A padded with zero columns and
pads its gathered input per step. A^T and B^T are transposed views of the stacked slots, a (column-major)
layout it takes as they are: no copy, at load or per step. With CHORUS_DIALOGUE_LORA_GRAPHS the grouped
path runs on every step, adapters or not (`static`), so one captured CUDA graph serves every step and
the batcher keeps LMGen's graphs on with adapters: the default wherever LMGen replays graphs
(`resolve_graphs`), since a step run eagerly costs several frames on a GPU.

The scaling is folded into B when an adapter is loaded. With int8 weights (moshi refuses LoRA with its
quantized path) the bank is not installed: see `refuse_with_quantized`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from moshi.modules.lora import LoRALinear
from moshi.utils.compile import _is_cuda_graph_enabled as cuda_graphs_enabled
from torch import nn

from shared.adapters import LayerShapes, check_adapter
from shared.errors import ModelLoadError, Unprocessable, UnsupportedMedia

log = logging.getLogger(__name__)

NO_ADAPTER = 0  # the bank's all-zero slot

LoraKernel = Literal["per_adapter", "grouped"]
_ALIGN_BYTES = 16  # grouped_mm: every matrix's leading stride a multiple of this


def linear_layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Linear]]:
    """The LM's linear layers by name, as moshi's `replace_all_linear_with_lora` finds them (a wrapped
    layer under its own name)."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, RowLoRALinear):
            yield path, child.frozen_W
        elif isinstance(child, nn.Linear):
            yield path, child
        else:
            yield from linear_layers(child, f"{path}.")


def layer_shapes(lm: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer: what an adapter for this LM must match."""
    return {name: (layer.out_features, layer.in_features) for name, layer in linear_layers(lm)}


class _Stacked(nn.Module):
    """One layer's A (or B) of every slot, [slots, ...]: a buffer named `weight`, as moshi reads it."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)


@dataclass(frozen=True)
class _Group:
    """The rows of one slot in use: a contiguous run (a view of the batch) or their indices on the device."""

    slot: int
    rows: slice | torch.Tensor


class _Layout:
    """Which rows use which slot, planned on the host when that changes; every layer of the bank reads it.

    `per_adapter` reads `groups`; `grouped` reads `perm` (the rows in slot order) and `offs(T)` (each
    slot's group end in the flattened [B * T] rows), device tensors updated in place."""

    def __init__(
        self, batch_size: int, slots: int, device: torch.device, kernel: LoraKernel, static: bool
    ) -> None:
        self.batch_size = batch_size
        self.kernel: LoraKernel = kernel
        self.static = static  # grouped path on every step (adapters or not): one CUDA graph for all
        self.groups: tuple[_Group, ...] = ()  # empty: no row uses an adapter
        self.perm = torch.arange(batch_size, device=device)
        self._ends = [batch_size] * slots  # rows of slots 0..s, cumulated: every row in slot 0
        self._offs = {1: self._device_ends(1, device)}  # by tokens per row; T = 1 made before any capture

    @property
    def active(self) -> bool:
        """The LoRA branch runs this step."""
        return self.static or bool(self.groups)

    def offs(self, tokens: int) -> torch.Tensor:
        offs = self._offs.get(tokens)
        if offs is None:  # a step with T > 1 tokens per row (never inside a captured graph: T = 1 there)
            offs = self._offs[tokens] = self._device_ends(tokens, self.perm.device)
        return offs

    def sort(self, row_slots: list[int]) -> None:
        """The grouped kernel's tensors for a new row -> slot table, written in place."""
        perm = sorted(range(len(row_slots)), key=row_slots.__getitem__)  # stable: rows ascending per slot
        counts = [0] * len(self._ends)
        for slot in row_slots:
            counts[slot] += 1
        self._ends = [sum(counts[: slot + 1]) for slot in range(len(counts))]
        self.perm.copy_(torch.tensor(perm, dtype=torch.long))
        for tokens, offs in self._offs.items():
            offs.copy_(torch.tensor([end * tokens for end in self._ends], dtype=torch.int32))

    def _device_ends(self, tokens: int, device: torch.device) -> torch.Tensor:
        return torch.tensor([end * tokens for end in self._ends], dtype=torch.int32, device=device)


class RowLoRALinear(LoRALinear):  # type: ignore[misc]  # moshi is untyped
    """A frozen linear layer plus the low-rank update of each adapter in use, on the rows that use it.

    A subclass of moshi's `LoRALinear` so moshi's modules treat it as one (the attention's streaming
    state reads `lora_A.weight`'s device and dtype; the gating takes the generic path).
    """

    in_features: int
    out_features: int
    rank: int
    frozen_W: nn.Linear
    lora_A: _Stacked
    lora_B: _Stacked
    _layout: _Layout
    _views: list[tuple[torch.Tensor, torch.Tensor] | None]
    _in_padded: int
    _a_t: torch.Tensor
    _b_t: torch.Tensor

    def __init__(self, base: nn.Linear, layout: _Layout, slots: int, max_rank: int, align: int = 1) -> None:
        nn.Module.__init__(self)  # not LoRALinear's: its own A/B/W and load hook are not wanted
        if base.bias is not None:
            raise ModelLoadError("per-row LoRA wraps bias-free linear layers only")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling, self.bias = max_rank, 1.0, False
        self.frozen_W = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        # A's rows padded to `align` elements (the grouped kernel's 16 bytes; 1: none): an input width
        # grouped_mm cannot take is zero-padded per step and meets zero columns of A.
        self._in_padded = -(-self.in_features // align) * align
        self.lora_A = _Stacked(torch.zeros(slots, max_rank, self._in_padded, **factory))
        self.lora_B = _Stacked(torch.zeros(slots, self.out_features, max_rank, **factory))
        self._layout = layout
        # Every slot's A^T [slots, in, r] and B^T [slots, r, out] for the grouped kernel: views, made once.
        self._a_t = self.lora_A.weight.transpose(1, 2)
        self._b_t = self.lora_B.weight.transpose(1, 2)
        # Each slot's (A^T, B^T) at its adapter's rank: views of the slot, made once at load (None: the
        # slot's adapter leaves this layer alone). The bank is installed on the LM where it runs: moving
        # the LM afterwards (`.to()`) would leave these on the old tensors.
        self._views = [None] * slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.frozen_W(x)
        layout = self._layout
        if not layout.active:
            return result
        if x.dim() != 3 or x.shape[0] != layout.batch_size:
            raise ValueError(f"per-row LoRA expects [{layout.batch_size}, T, D] inputs, got {list(x.shape)}")
        if layout.kernel == "grouped":
            padding = self._in_padded - self.in_features
            _add_grouped(result, x, layout.perm, layout.offs(x.shape[1]), self._a_t, self._b_t, padding)
            return result
        for group in layout.groups:
            views = self._views[group.slot]
            if views is not None:
                _add_low_rank(result, x, group.rows, *views)
        return result

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Slot `slot` <- (A, scaled B) of one adapter, at its own rank; None clears it."""
        self.lora_A.weight[slot].zero_()
        self.lora_B.weight[slot].zero_()
        self._views[slot] = None
        if a is not None and b is not None:
            rank = a.shape[0]
            down = self.lora_A.weight[slot, :rank, : self.in_features]
            up = self.lora_B.weight[slot, :, :rank]
            down.copy_(a)
            up.copy_(b)
            self._views[slot] = (down.T, up.T)

    def __repr__(self) -> str:
        return (
            f"RowLoRALinear(in_features={self.in_features}, out_features={self.out_features}, r={self.rank})"
        )


def _add_low_rank(
    result: torch.Tensor, x: torch.Tensor, rows: slice | torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor
) -> None:
    """result[rows] += (x[rows] A^T) B^T, in place."""
    if isinstance(rows, slice):
        out = result[rows].view(-1, result.shape[-1])  # a view (never a copy): updated where it lies
        out.addmm_(x[rows].reshape(-1, x.shape[-1]) @ a_t, b_t)
        return
    picked = x.index_select(0, rows)
    update = (picked.flatten(0, 1) @ a_t) @ b_t
    result.index_add_(0, rows, update.view(*picked.shape[:2], -1))


def _add_grouped(
    result: torch.Tensor,
    x: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    padding: int,
) -> None:
    """result += each row's (x A_s^T) B_s^T, every slot s at once: rows gathered in slot order, two grouped
    matmuls, added back where they came from. Shapes depend on the batch only."""
    batch, tokens = x.shape[:2]
    ordered = x.index_select(0, perm).flatten(0, 1)  # [B * T, in], slot by slot
    if padding:
        ordered = nn.functional.pad(ordered, (0, padding))
    down = torch._grouped_mm(ordered, a_t, offs=offs)
    up = torch._grouped_mm(down, b_t, offs=offs)  # rows may be padded: splitting dim 0 is still a view
    result.index_add_(0, perm, up.reshape(batch, tokens, up.shape[-1]))


def resolve_kernel(
    choice: Literal["auto", "per_adapter", "grouped"], lm: nn.Module, max_rank: int, *, graphs: bool = False
) -> LoraKernel:
    """CHORUS_DIALOGUE_LORA_KERNEL for this LM: `auto` is `grouped` on CUDA (compute capability 9.0+)
    in bfloat16 (grouped_mm's CUDA dtype) with an aligned rank bound, and wherever `graphs`
    (CHORUS_DIALOGUE_LORA_GRAPHS) needs it;
    else `per_adapter` (on the CPU bench/bench_lora.py measures it faster: grouped_mm loops over the
    groups there, and the gather and scatter cost more than they save). A `grouped` that grouped_mm
    cannot run is refused."""
    problem = _grouped_problem(lm, max_rank)
    if choice == "auto":
        on_cuda = next(lm.parameters()).device.type == "cuda"
        choice = "grouped" if graphs or (on_cuda and not problem) else "per_adapter"
    if choice == "grouped" and problem:
        raise ModelLoadError(f"the grouped LoRA kernel cannot run this LM: {problem}")
    return choice


def resolve_graphs(
    choice: bool | None,
    lm: nn.Module,
    max_rank: int,
    kernel: Literal["auto", "per_adapter", "grouped"],
) -> bool:
    """CHORUS_DIALOGUE_LORA_GRAPHS for this LM: unset is on wherever LMGen replays CUDA graphs (the LM on
    CUDA, moshi's NO_CUDA_GRAPH unset) and the grouped kernel can run there. On an H100 a step with
    adapters run eagerly took 4-10x a graphed one, far past the 80 ms frame; graphed, 1.3-1.4x
    (docs/performance.md, "LoRA adapters"). Off the GPU there are no graphs to keep: the grouped path
    on every step would only cost."""
    if choice is not None:
        return choice
    on_cuda = next(lm.parameters()).device.type == "cuda"
    graphs_on = bool(cuda_graphs_enabled())  # moshi's own answer (NO_CUDA_GRAPH): its graphs, its rule
    return on_cuda and graphs_on and kernel != "per_adapter" and _grouped_problem(lm, max_rank) is None


def _grouped_problem(lm: nn.Module, max_rank: int) -> str | None:
    """Why grouped_mm cannot run this LM's LoRA layers (None: it can)."""
    weight = next(lm.parameters())
    if not weight.dtype.is_floating_point:
        return f"the LM's weights are {weight.dtype}"
    if weight.device.type == "cuda" and weight.dtype != torch.bfloat16:
        return f"on CUDA grouped_mm takes bfloat16, the LM is {weight.dtype} (CHORUS_DIALOGUE_DTYPE)"
    # Below Hopper torch runs grouped_mm as a loop that syncs with the host: slower than per_adapter and
    # impossible to capture in a CUDA graph.
    if weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device) < (9, 0):
        major, minor = torch.cuda.get_device_capability(weight.device)
        return f"grouped_mm's fused kernel needs compute capability 9.0+, this GPU has {major}.{minor}"
    step = _ALIGN_BYTES // weight.element_size()
    if max_rank % step:
        return f"the adapter rank bound ({max_rank}) is not a multiple of {step} (16 bytes of {weight.dtype})"
    return None


@dataclass(frozen=True)
class AdapterTensors:
    """An adapter read for one model: each layer's (A, scaling · B) on the model's device and dtype."""

    rank: int
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.layers.values())


def read_adapter(
    data: bytes,
    shapes: LayerShapes,
    device: torch.device,
    dtype: torch.dtype,
    *,
    rank: int | None = None,
    scaling: float | None = None,
) -> AdapterTensors:
    """An adapter file (moshi-finetune's layout) as tensors for the model; 422 when it does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    layout = check_adapter(data, shapes, rank=rank, scaling=scaling)
    try:
        raw = load(data)
    except SafetensorError as exc:  # what the header check let through (the gateway checks with it too)
        raise UnsupportedMedia(f"the adapter file does not load: {str(exc)[:120]}") from exc
    layers = {
        layer: (
            raw[f"{layer}.lora_A.weight"].to(device=device, dtype=dtype),
            (raw[f"{layer}.lora_B.weight"].to(torch.float32) * layout.scaling).to(device=device, dtype=dtype),
        )
        for layer in layout.layers
    }
    return AdapterTensors(layout.rank, layers)


class AdapterBank:
    """Every LoRA-wrapped layer of one LM, `slots` adapter slots each, and the row -> slot table."""

    def __init__(
        self,
        lm: nn.Module,
        batch_size: int,
        slots: int,
        max_rank: int,
        *,
        kernel: LoraKernel = "per_adapter",
        static: bool = False,
    ) -> None:
        """`kernel`: how a layer adds the updates (module docstring); `static`: the grouped path on every
        step, so CUDA graphs may replay steps with adapters (CHORUS_DIALOGUE_LORA_GRAPHS)."""
        if slots < 1:
            raise ModelLoadError("the adapter bank needs at least one slot")
        if static and kernel != "grouped":
            raise ModelLoadError("CUDA graphs with adapters need the grouped LoRA kernel")
        if kernel == "grouped" and (problem := _grouped_problem(lm, max_rank)):
            raise ModelLoadError(f"the grouped LoRA kernel cannot run this LM: {problem}")
        device = next(lm.parameters()).device
        self.lm = lm
        self.slots = slots  # adapter slots, 1..slots (0 is no adapter)
        self.max_rank = max_rank
        self.kernel: LoraKernel = kernel
        self._device = device
        self._row_slots = [NO_ADAPTER] * batch_size
        self._layout = _Layout(batch_size, slots + 1, device, kernel, static)  # shared by every layer
        align = _ALIGN_BYTES // next(lm.parameters()).element_size() if kernel == "grouped" else 1
        self._layers: dict[str, RowLoRALinear] = {}
        self._originals: dict[str, nn.Linear] = {}
        for name, layer in list(linear_layers(lm)):
            wrapped = RowLoRALinear(layer, self._layout, slots + 1, max_rank, align)
            _set_module(lm, name, wrapped)
            self._layers[name], self._originals[name] = wrapped, layer
        self.shapes = layer_shapes(lm)

    @staticmethod
    def slot_bytes(lm: nn.Module, max_rank: int) -> int:
        """Device memory of one slot: A and B of every linear layer at `max_rank`."""
        total = 0
        for _, layer in linear_layers(lm):
            total += max_rank * (layer.in_features + layer.out_features) * layer.weight.element_size()
        return total

    def load(self, slot: int, adapter: AdapterTensors) -> None:
        """Copy an adapter into a slot (between steps). Layers it does not name get no update."""
        self._check_slot(slot)
        if adapter.rank > self.max_rank:
            raise Unprocessable(f"adapter rank {adapter.rank} is above this worker's {self.max_rank}")
        with torch.no_grad():
            for name, layer in self._layers.items():
                a, b = adapter.layers.get(name, (None, None))
                layer.load_slot(slot, a, b)

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        with torch.no_grad():
            for layer in self._layers.values():
                layer.load_slot(slot, None, None)

    def assign(self, row: int, slot: int) -> None:
        """Row `row` uses the adapter in `slot` (NO_ADAPTER: none) from the next step on."""
        if slot != NO_ADAPTER:
            self._check_slot(slot)
        if self._row_slots[row] != slot:
            self._row_slots[row] = slot
            self._layout.groups = self._plan()
            if self.kernel == "grouped":
                self._layout.sort(self._row_slots)

    def slot_of(self, row: int) -> int:
        return self._row_slots[row]

    @property
    def in_use(self) -> bool:
        """Some row uses an adapter (else the LoRA layers do nothing beyond the frozen ones)."""
        return bool(self._layout.groups)

    @property
    def graph_safe(self) -> bool:
        """Every step runs the same kernels on the same tensors: a CUDA graph may replay steps with
        adapters (`static`)."""
        return self._layout.static

    def _plan(self) -> tuple[_Group, ...]:
        """The rows of each slot in use: a slice when they are contiguous, else indices on the device."""
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(self._row_slots):
            if slot != NO_ADAPTER:
                by_slot.setdefault(slot, []).append(row)
        groups = []
        for slot, rows in by_slot.items():
            if rows[-1] - rows[0] + 1 == len(rows):
                groups.append(_Group(slot, slice(rows[0], rows[-1] + 1)))
            else:
                groups.append(_Group(slot, torch.tensor(rows, dtype=torch.long, device=self._device)))
        return tuple(groups)

    def remove(self) -> None:
        """Put the original linear layers back (the LM is as before the bank)."""
        for name, layer in self._originals.items():
            _set_module(self.lm, name, layer)
        self._layers.clear()
        self._originals.clear()

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.slots:
            raise ValueError(f"adapter slot {slot} is not in 1..{self.slots}")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
