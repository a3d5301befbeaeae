"""The adapters a dialogue worker holds on its device: one bank slot each, loaded on first use.

`CHORUS_DIALOGUE_ADAPTER_MEMORY` decides how many slots the bank has (`slots_for`). A session naming an
adapter takes a use of it (`acquire`): held already, it is only counted; otherwise its file is read from
storage, checked against the model's layers, and copied into a free slot, or into the slot of the least
recently used adapter no session uses (evicted). With every slot in use the session is refused
(`NoCapacity`). Loading runs on the model thread between two steps: the tick loop never waits on storage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from services.dialogue.adapters import AdapterBank, AdapterTensors, read_adapter
from shared.adapter_store import AdapterStore
from shared.errors import ModelLoadError, NoCapacity, Unprocessable

log = logging.getLogger(__name__)

T = TypeVar("T")
ModelThread = Callable[..., Awaitable[Any]]

MAX_SLOTS = 64  # beyond this a bigger budget buys nothing: a worker serves a few dozen rows at most


def slots_for(lm: nn.Module, memory: int, max_rank: int) -> int:
    """Adapter slots that fit `memory` bytes at `max_rank` (at most MAX_SLOTS); refused when not one does,
    or when the LM's weights are quantized (moshi refuses LoRA with its int8 path, and so do we)."""
    refuse_with_quantized(lm)
    size = AdapterBank.slot_bytes(lm, max_rank)
    if memory < size:
        raise ModelLoadError(
            f"CHORUS_DIALOGUE_ADAPTER_MEMORY={memory} holds no adapter: "
            f"one of rank {max_rank} needs {size} bytes"
        )
    return min(memory // size, MAX_SLOTS)


def refuse_with_quantized(lm: nn.Module) -> None:
    """Adapters update float weights: an LM with integer (int8) weights is refused with a clear error."""
    quantized = [name for name, tensor in lm.state_dict().items() if not tensor.dtype.is_floating_point]
    quantized = [name for name in quantized if name.endswith("weight")]
    if quantized:
        raise ModelLoadError(
            "LoRA adapters need the unquantized weights (moshi refuses LoRA with int8 too): set "
            f"CHORUS_DIALOGUE_ADAPTER_MEMORY=0 or load the float weights ({quantized[0]} is quantized)"
        )


@dataclass
class _Held:
    slot: int
    users: int = 0


class AdapterCache:
    def __init__(self, bank: AdapterBank, store: AdapterStore, in_model_thread: ModelThread) -> None:
        self.bank = bank
        self.store = store
        self._in_model_thread = in_model_thread
        self._held: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._loading = asyncio.Lock()
        weight = next(bank.lm.parameters())
        self._device, self._dtype = weight.device, weight.dtype
        self.loads = 0

    def held(self) -> list[str]:
        """The adapters on the device (presence lists them: placement prefers a worker holding one)."""
        return list(self._held)

    def holds(self, adapter_id: str) -> bool:
        return adapter_id in self._held

    async def acquire(self, adapter_id: str) -> int:
        """One more session uses `adapter_id`: its slot (loaded now if it was not held)."""
        async with self._loading:
            held = self._held.get(adapter_id)
            if held is None:
                held = _Held(await self._load(adapter_id))
                self._held[adapter_id] = held
            self._held.move_to_end(adapter_id)
            held.users += 1
            return held.slot

    def release(self, adapter_id: str) -> None:
        held = self._held.get(adapter_id)
        if held is not None and held.users > 0:
            held.users -= 1

    def _free_slot(self) -> tuple[int, str | None]:
        """A slot to load into: a free one, else the one of the least recently used adapter no session uses
        (its id: evicted only once the new adapter is in its slot)."""
        taken = {h.slot for h in self._held.values()}
        free = [slot for slot in range(1, self.bank.slots + 1) if slot not in taken]
        if free:
            return free[0], None
        for adapter_id, held in self._held.items():  # least recently used first
            if held.users == 0:
                return held.slot, adapter_id
        raise NoCapacity(f"all {self.bank.slots} adapter slots of this worker are in use")

    async def _load(self, adapter_id: str) -> int:
        """Read, check and copy the adapter into a slot. One that cannot be read or does not fit (deleted
        meanwhile, say) evicts nothing: the adapter it would have replaced stays held."""
        slot, evicted = self._free_slot()  # with every slot in use, refused before anything is read
        started = time.monotonic()
        record = await self.store.get(adapter_id)
        if record.rank > self.bank.max_rank:  # before the file is read and converted on the model thread
            raise Unprocessable(f"adapter rank {record.rank} is above this worker's {self.bank.max_rank}")
        data = await self.store.data(adapter_id)
        tensors: AdapterTensors = await self._in_model_thread(
            read_adapter,
            data,
            self.bank.shapes,
            self._device,
            self._dtype,
            rank=record.rank,
            scaling=record.scaling,
        )
        await self._in_model_thread(self.bank.load, slot, tensors)  # its checks come before any write
        if evicted is not None:
            del self._held[evicted]
            log.info("adapter evicted", extra={"adapter_id": evicted, "slot": slot})
        if self._device.type == "cuda":
            await self._in_model_thread(torch.cuda.synchronize, self._device)
        self.loads += 1
        log.info(
            "adapter loaded",
            extra={
                "adapter_id": adapter_id,
                "slot": slot,
                "rank": tensors.rank,
                "bytes": tensors.nbytes,
                "load_s": round(time.monotonic() - started, 4),
            },
        )
        return slot
