"""Sharded loading: every rank reads from the base model's safetensors only the rows of each weight it owns.

The order is torchtitan's: the transformer is built on `meta`, the adapter injected, `fully_shard` applied (still on
meta), then `to_empty` gives each rank uninitialised storage for its own shards only, and `fill_sharded` writes them:
for each parameter, the local shard's offset in the global tensor (DTensor placement, FSDP2's `Shard(0)` on a 1-D or
2-D HSDP mesh) says which contiguous byte range of the safetensors file holds it, and exactly that range is read
(`readinto`, no mmap: the file pages a rank reads are page cache, not its resident memory). Peak host memory per
rank is therefore its shards plus one tensor's read buffer, not the whole model as with a per-rank `from_pretrained`.

Values that are not in the file (a new adapter's initial weights, small) come as whole tensors in `initial`, built
the same way as on the unsharded path, so a sharded run starts from exactly the same parameters (tests check the
gathered weights against `from_pretrained`'s, bitwise).

Why not DCP's `HuggingFaceStorageReader` (torch 2.14 has it): it reads each slice through `safe_open`'s mmap, keeps
the file mapped for all of a file's reads (so every touched page counts in the rank's RSS until the end), and it
plans with collectives. The safetensors layout is a length-prefixed JSON header and raw little-endian rows, so a
slice along dim 0 is one `seek` + `readinto`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from train.model import build_transformer_meta, set_computed_buffers, transformer_source

# safetensors dtype names -> torch (the ones a diffusers checkpoint can hold)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the tensor's first element in `file`."""


class SafetensorsIndex:
    """name -> (file, dtype, shape, byte offset) over the .safetensors files of one folder (headers only)."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, _Entry] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{f}: tensor '{name}' has dtype {info['dtype']}, which a FLUX model never has")
                self.entries[name] = _Entry(f, _ST_DTYPES[info["dtype"]], tuple(info["shape"]),
                                            8 + n + info["data_offsets"][0])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of tensor `name`, in its stored dtype (one contiguous read)."""
        e = self.entries[name]
        shape = (stop - start, *e.shape[1:]) if e.shape else ()
        out = torch.empty(shape, dtype=e.dtype)
        if out.numel() == 0:
            return out
        row = out[0].numel() * out.element_size() if e.shape else 0
        with open(e.file, "rb") as fh:
            fh.seek(e.begin + start * row)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            if fh.readinto(view) != len(view):
                raise ValueError(f"{e.file}: truncated while reading '{name}'")
        return out


def file_key(fqn: str) -> str:
    """The safetensors key of a parameter: peft keeps the wrapped Linear as `<name>.base_layer`."""
    return fqn.replace(".base_layer.", ".")


def _local_slice(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor, its row offset along dim 0 in the global tensor)."""
    if not isinstance(p, DTensor):
        return p.data, 0
    local = p.to_local()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    # FSDP2 shards dim 0 only: every other dim is whole, so the shard is a contiguous run of rows in the file.
    assert tuple(shape) == tuple(local.shape) and all(o == 0 for o in offset[1:]), (shape, offset, p.placements)
    return local, offset[0] if offset else 0


@torch.no_grad()
def fill_sharded(model: torch.nn.Module, index: SafetensorsIndex, initial: dict[str, torch.Tensor], *,
                 defer: frozenset[str] = frozenset()) -> None:
    """Fill every parameter's local shard of a `to_empty`'d (sharded or plain) model: from the file, or from
    `initial` (whole tensors, keyed by parameter name). Raises ValueError when they do not cover the model exactly.
    Parameters named in `defer` are part of that check but are not filled (the caller fills them later)."""
    named = dict(model.named_parameters())
    wanted = {file_key(n) for n in named if n not in initial}
    missing, unexpected = sorted(wanted - index.entries.keys()), sorted(index.entries.keys() - wanted)
    if missing or unexpected:
        where = next(iter(index.entries.values())).file.parent if index.entries else "?"
        raise ValueError(f"{where}: weights do not match the transformer config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, p in named.items():
        if name in defer:
            continue
        local, row = _local_slice(p)
        if local.numel() == 0:
            continue
        rows = local.shape[0] if local.dim() else 0
        if name in initial:
            src = initial[name][row : row + rows] if local.dim() else initial[name]
        else:
            key = file_key(name)
            if index.entries[key].shape != tuple(p.shape):
                raise ValueError(f"{index.entries[key].file}: '{key}' has shape {index.entries[key].shape}, the "
                                 f"transformer config says {tuple(p.shape)}")
            src = index.read_rows(key, row, row + rows)
        local.copy_(src)  # casts to the parameter's dtype and moves to its device


def materialize(model: torch.nn.Module, device: torch.device, index: SafetensorsIndex,
                initial: dict[str, torch.Tensor], *, deferred: Sequence[str] = (),
                finish: Callable[[torch.nn.Module], None] | None = None) -> None:
    """`to_empty` a meta-built (and possibly `fully_shard`ed) model on `device`, then `fill_sharded` it.

    `deferred` modules (the frozen Linears `model.base_quant` quantizes, which FSDP2 leaves whole) are allocated,
    read and handed to `finish` one at a time after the rest, so their full-precision weights never all exist at
    once: the extra peak is one Linear, not the base model.
    """
    # Buffers are neither in the weights nor in `initial` (FLUX has none; Chroma's mod_proj is computed in its
    # __init__): to_empty leaves them uninitialised, so they are computed again.
    late = [(name, model.get_submodule(name)) for name in deferred]
    held = {id(p) for _, m in late for p in m.parameters(recurse=False)}
    # Module.to_empty is exactly this _apply, minus the exception for the deferred parameters (left on meta)
    model._apply(lambda t: t if id(t) in held else torch.empty_like(t, device=device))
    set_computed_buffers(model, device=device)
    fill_sharded(model, index, initial, defer=frozenset(
        f"{name}.{pn}" for name, m in late for pn, _ in m.named_parameters(recurse=False)))
    for name, module in late:
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            for pn, p in module.named_parameters(recurse=False):
                key = file_key(f"{name}.{pn}")
                if index.entries[key].shape != tuple(p.shape):
                    raise ValueError(f"{index.entries[key].file}: '{key}' has shape {index.entries[key].shape}, the "
                                     f"transformer config says {tuple(p.shape)}")
                p.copy_(index.read_rows(key, 0, p.shape[0]))
        if finish is not None:
            finish(module)


def meta_transformer(path: str | Path, *, dtype: torch.dtype, guidance: str = "bypass", guidance_scale: float = 1.0):
    """(transformer on meta in `dtype`, index of its safetensors) for `materialize`: nothing is read but the config
    and the files' headers. `guidance`/`guidance_scale`: `model.guidance`."""
    config, files, dropped = transformer_source(path, guidance=guidance)
    model = build_transformer_meta(config, guidance=guidance, guidance_scale=guidance_scale)
    # nn.Module.to, not ModelMixin.to (which warns about fp32-kept modules; FLUX and Chroma have none): free on meta
    torch.nn.Module.to(model, dtype)
    index = SafetensorsIndex(files)
    if dropped:  # bypassed guidance embedder: not in the model, so not in what the shards are filled from
        index.entries = {k: v for k, v in index.entries.items() if not k.startswith(dropped)}
    return model, index
