"""What a checkpoint is on disk, and the one safe way to read it.

A checkpoint is a directory `<run>/checkpoints/step_<N:08d>/` (train/run_dir.py) holding the DCP shards (model
trainable state, optimizer, scheduler, EMA, step), one `rank_<r>.pt` per rank with what differs per rank (RNG states,
data-loader position), and `COMPLETE`, the JSON marker written last: a directory without it never counts.

Reading never unpickles arbitrary objects: DCP's `.metadata` is a pickle, read here with an unpickler that only
admits DCP's own metadata classes (`SafeReader`), and DCP's non-tensor entries (optimizer param groups, scheduler
state) are loaded with `torch.load(weights_only=True)` (`SafeLoadPlanner`). `safe_load` is the one entry point for
reading DCP checkpoints (training resume, inference, export).
"""

from __future__ import annotations

import io
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from train.run_dir import step_dirs

MARKER = "COMPLETE"
METADATA = ".metadata"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def list_checkpoints(root: Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint in `root` (a run's checkpoints/), complete ones only unless told, by step."""
    return [(s, p) for s, p in step_dirs(root) if not complete_only or is_complete(p)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# What a DCP `.metadata` pickle may name (torch 2.6-2.14); anything else is refused, never imported or called.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never does")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` unpickler admits only DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class RefusedFile(ValueError):
    """A checkpoint file holds a pickle the safe loader refuses: said in one line, naming the file."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"checkpoint file {file} refused, nothing loaded: {reason}")
        self.file = file
        self.reason = reason


def safe_torch_load(source: str | Path | io.BytesIO, *, name: str) -> Any:
    """`torch.load(weights_only=True)`; a refusal becomes one line naming `name` and the global the pickle asked for.
    torch's own message would suggest `weights_only=False`, which here would run whatever the file says."""
    try:
        return torch.load(source, weights_only=True)
    except pickle.UnpicklingError as e:
        said = re.search(r"GLOBAL (\S+)", str(e))
        why = (f"its pickle names {said.group(1)}, which no checkpoint holds" if said
               else f"its pickle is not plain data ({next((ln for ln in str(e).splitlines()[1:] if ln.strip()), '')[:120]})")
        raise RefusedFile(name, f"{why}; it is not what a save writes (replaced after the save?)") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are read with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        info = getattr(self, "metadata", None) and self.metadata.storage_data.get(read_item.storage_index)
        where = f"{info.relative_path} (entry {read_item.dest_index.fqn})" if info else read_item.dest_index.fqn
        obj = safe_torch_load(value, name=where)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state: dict[str, Any], path: str | Path, *, no_dist: bool = False) -> None:
    """`dcp.load` into `state` (in place) without unpickling anything but plain data and DCP's own metadata."""
    with warnings.catch_warnings():
        # DCP warns "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a
        # single process" on every load without collectives, even when no_dist=True says exactly that (torch 2.14,
        # state_dict_loader.load). Only that message, only for this call.
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized",
                                category=UserWarning)
        try:
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
        except CheckpointException as e:  # DCP wraps each rank's error with its traceback: ours is the line to say
            refused = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            refused = [f for f in refused if isinstance(f, RefusedFile)]
            if refused:
                raise refused[0] from None
            raise


def read_metadata(path: str | Path):
    """The DCP metadata of a checkpoint (key -> storage metadata), read safely."""
    return SafeReader(str(path)).read_metadata()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
