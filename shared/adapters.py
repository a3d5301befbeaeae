"""LoRA adapters as `moshi-finetune` writes them, read without torch: the safetensors header and its checks.

An adapter file holds, for each linear layer of the LM it was trained on (moshi's
`replace_all_linear_with_lora` wraps every one), `{layer}.lora_A.weight` [rank, in] and
`{layer}.lora_B.weight` [out, rank], all of one rank; its update is `scaling · B (A x)`. Rank and scaling
come from the file's metadata (`lora_rank`, `lora_scaling`: what moshi's loaders read from the model
config) or from the uploader; the scaling defaults to moshi's own default, 2.0.

`check_adapter` is the one gate an adapter passes, on upload (gateway) and again before it is loaded
(dialogue worker): it is checked against the serving model's layer shapes (`LayerShapes`: layer name ->
(out, in), what the dialogue workers publish), and the first tensor in name order that does not fit is
named in the error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import Unprocessable, UnsupportedMedia

LayerShapes = Mapping[str, tuple[int, int]]  # linear layer name -> (out_features, in_features)

DEFAULT_SCALING = 2.0  # moshi.models.loaders' default lora_scaling
MAX_RANK = 1024
MAX_SCALING = 1000.0  # moshi-finetune's default is 2.0; past this the update swamps the weights (fp16: inf)
_A, _B = ".lora_A.weight", ".lora_B.weight"
_WIDTHS = {"F32": 4, "BF16": 2, "F16": 2}
# A header lists each tensor in ~150 bytes of JSON: a rank-128 adapter of every linear layer of Moshi 7B
# (~1,000 tensors) needs well under this. A bigger declared header is refused before it is read.
MAX_HEADER = 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors code: F32, BF16, F16
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int


Header = tuple[dict[str, str], dict[str, TensorEntry]]  # a file's metadata and its tensors, by name


@dataclass(frozen=True)
class AdapterLayout:
    """What a checked adapter file holds."""

    rank: int
    scaling: float
    layers: tuple[str, ...]  # the linear layers it updates, in name order
    dtype: str
    parameters: int


def read_header(data: bytes) -> Header:
    """The metadata and tensor entries of a safetensors file; 415 when it is not one."""
    length = _header_length(data[:8], len(data))
    return _parse_header(data[8 : 8 + length], len(data) - 8 - length)


def read_header_file(path: Path) -> Header:
    """`read_header` of a file, reading its header only (at most `MAX_HEADER` bytes): blocking I/O."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = _header_length(f.read(8), size)
        return _parse_header(f.read(length), size - 8 - length)


def check_loads(path: Path) -> None:
    """safetensors' own parser (the dialogue worker's loader) takes the file's header, its data unread:
    415 otherwise. The checks above name what is wrong; this one guards against what they may miss (a
    file that passes them must load on the worker). Blocking."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):  # type: ignore[no-untyped-call]  # untyped binding
            pass
    except SafetensorError as exc:
        raise UnsupportedMedia(f"not a safetensors file its loader takes: {str(exc)[:120]}") from exc


def _header_length(first: bytes, size: int) -> int:
    if len(first) < 8:
        raise UnsupportedMedia("not a safetensors file: shorter than its header length")
    (length,) = struct.unpack("<Q", first)
    if length > MAX_HEADER:
        raise UnsupportedMedia(
            f"not a safetensors adapter: its header declares {length} bytes, past the {MAX_HEADER} an "
            "adapter's header ever needs"
        )
    if length > size - 8:
        raise UnsupportedMedia("not a safetensors file: its header length runs past the file")
    return int(length)


def _parse_header(raw: bytes, data_size: int) -> Header:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedMedia("not a safetensors file: its header is not JSON") from exc
    except RecursionError:  # nested deeper than the decoder goes: no tensor entry is nested at all
        raise UnsupportedMedia("not a safetensors file: its header is nested too deeply") from None
    if not isinstance(header, dict):
        raise UnsupportedMedia("not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    # safetensors' own loader (the dialogue worker's) takes string values only: what passes here loads.
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsupportedMedia("not a safetensors file: __metadata__ is not an object of strings")
    entries = {name: _entry(name, value, data_size) for name, value in header.items()}
    _check_tiling(entries, data_size)
    return metadata, entries


def _check_tiling(entries: dict[str, TensorEntry], data_size: int) -> None:
    """The tensors' bytes follow one another and cover the data section, as safetensors' own loader
    demands (what passes here must load in the dialogue worker): no overlap, no gap, nothing after."""
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != end:
            raise UnsupportedMedia(f"not a safetensors file: tensor {name!r} has invalid data offsets")
        end = entry.end
    if end != data_size:
        raise UnsupportedMedia(f"not a safetensors file: {data_size - end} bytes not covered by any tensor")


def _entry(name: str, value: object, data_size: int) -> TensorEntry:
    invalid = UnsupportedMedia(f"not a safetensors file: tensor {name!r} has no valid entry")
    if not isinstance(value, dict):
        raise invalid
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
        raise invalid
    # JSON's true and false are ints to Python, not to safetensors' loader.
    if not all(type(n) is int and n >= 0 for n in (*shape, *offsets)):
        raise invalid
    if not isinstance(dtype, str):
        raise invalid
    if dtype not in _WIDTHS:
        raise Unprocessable(
            f"tensor {name}: dtype {dtype[:16]} (an adapter is F32, BF16 or F16)", tensor=name
        )
    start, end = offsets
    if end - start != _WIDTHS[dtype] * math.prod(shape) or end > data_size:
        raise UnsupportedMedia(f"not a safetensors file: tensor {name!r} does not fit its data offsets")
    return TensorEntry(str(dtype), tuple(shape), start, end)


def check_adapter(
    data: bytes | Path | Header, shapes: LayerShapes, *, rank: int | None = None, scaling: float | None = None
) -> AdapterLayout:
    """Check an adapter file (its bytes, its path: then only its header is read, blocking, or its header
    read already) against the model's layers; 422 naming the first tensor that does not fit.

    `rank` / `scaling` (the uploader's) must agree with the file's metadata where both are given.
    """
    if isinstance(data, bytes):
        data = read_header(data)
    elif isinstance(data, Path):
        data = read_header_file(data)
    metadata, entries = data
    if not entries:
        raise Unprocessable("the adapter holds no tensors")
    rank = _agreed_int("lora_rank", rank, metadata)
    scaling = _agreed_scaling(scaling, metadata)
    layers: list[str] = []
    for name in sorted(entries):
        layer, found = _layer_rank(name, entries[name], shapes)
        if rank is None:
            rank = found
        if found != rank:
            raise Unprocessable(f"tensor {name}: rank {found}, the adapter's rank is {rank}", tensor=name)
        partner = layer + (_B if name.endswith(_A) else _A)
        if partner not in entries:
            raise Unprocessable(f"tensor {name}: its partner {partner} is missing", tensor=name)
        if name.endswith(_A):
            layers.append(layer)
    assert rank is not None
    dtypes = {e.dtype for e in entries.values()}
    if len(dtypes) > 1:
        raise Unprocessable(f"the adapter mixes dtypes {sorted(dtypes)}")
    parameters = sum(math.prod(e.shape) for e in entries.values())
    return AdapterLayout(rank, scaling, tuple(layers), dtypes.pop(), parameters)


def _layer_rank(name: str, entry: TensorEntry, shapes: LayerShapes) -> tuple[str, int]:
    """The layer a tensor belongs to and its rank, if its shape fits that layer."""
    if not name.endswith((_A, _B)):
        raise Unprocessable(f"tensor {name}: not a LoRA weight (lora_A / lora_B)", tensor=name)
    layer = name[: -len(_A)]
    if layer not in shapes:
        raise Unprocessable(f"tensor {name}: the model has no linear layer {layer}", tensor=name)
    out_features, in_features = shapes[layer]
    if len(entry.shape) != 2:
        raise Unprocessable(f"tensor {name}: shape {list(entry.shape)} is not 2-D", tensor=name)
    rank, width = entry.shape if name.endswith(_A) else entry.shape[::-1]
    wanted = in_features if name.endswith(_A) else out_features
    if width != wanted or not 1 <= rank <= MAX_RANK:
        expected = ["rank", in_features] if name.endswith(_A) else [out_features, "rank"]
        raise Unprocessable(
            f"tensor {name}: shape {list(entry.shape)}, the model's layer wants {expected}", tensor=name
        )
    return layer, rank


def _agreed_int(key: str, given: int | None, metadata: dict[str, str]) -> int | None:
    stored = metadata.get(key)
    if stored is None:
        return given
    try:
        value = int(stored)
    except ValueError as exc:
        raise Unprocessable(f"metadata {key}={stored!r} is not an integer") from exc
    if given is not None and given != value:
        raise Unprocessable(f"{key} {given} disagrees with the file's metadata ({value})")
    return value


def _agreed_scaling(given: float | None, metadata: dict[str, str]) -> float:
    stored = metadata.get("lora_scaling")
    value = given
    if stored is not None:
        try:
            value = float(stored)
        except ValueError as exc:
            raise Unprocessable(f"metadata lora_scaling={stored!r} is not a number") from exc
        if given is not None and not math.isclose(given, value):
            raise Unprocessable(f"lora_scaling {given} disagrees with the file's metadata ({value})")
    value = DEFAULT_SCALING if value is None else value
    if not (math.isfinite(value) and 0 < value <= MAX_SCALING):
        raise Unprocessable(f"lora_scaling {value} is out of range (0, {MAX_SCALING:g}]")
    return value
