"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run_dir>/checkpoints/step_<N:08d>/` holds the DCP shards (model trainable state, optimizer, scheduler, EMA,
step) plus one `rank_<r>.pt` per rank with what differs per rank (RNG states, data-loader position). The file
`COMPLETE` is written last, by rank 0, after every rank finished: a checkpoint without it never counts, so a job
killed in the middle of a save resumes from the previous one.

With `checkpoint.async_save`, `save` returns once DCP has staged the state (a host copy) and the shards are written
by a background thread over a process group of its own; rank 0 writes `COMPLETE` when that write has finished (seen
by `poll` after a later step, or by `wait`, which the next save and the end of the run call). Rank 0's DCP save
finishes only after it has gathered every rank's write results, and each rank writes its `rank_<r>.pt` before its
shards, so rank 0 alone can tell that the whole checkpoint is on disk.

Loading never unpickles arbitrary objects from a checkpoint: DCP's `.metadata` is a pickle, read here with an
unpickler that only admits DCP's own metadata classes (`SafeReader`), and DCP's non-tensor entries (optimizer param
groups, scheduler state) are loaded with `torch.load(weights_only=True)` (`SafeLoadPlanner`). `safe_load` is the one
entry point for reading DCP checkpoints (training resume, inference, export).
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from train.config import CheckpointConfig
from train.parallelize import barrier

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def list_checkpoints(root: Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (is_complete(p) or not complete_only):
            found.append((int(m.group(1)), p))
    return sorted(found)


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
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are read with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

        obj = torch.load(value, weights_only=True)
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
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)


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


def _to_builtin(obj: Any) -> Any:
    """Data-loader state as plain JSON-able values (streaming returns ints/strs)."""
    return json.loads(json.dumps(obj))


@dataclass
class _Pending:
    """An async save in flight."""

    step: int
    path: Path
    future: Future
    started: float
    blocked_s: float


class CheckpointManager:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.pending: _Pending | None = None
        self.last_blocked_s = 0.0
        """How long the last `save` blocked its caller (the whole save, or only the staging when async)."""
        self._group = None
        if cfg.async_save and dist.is_initialized():
            # The background write runs collectives (planning, the final gather) while training runs its own; a
            # gloo group of its own keeps the two streams apart (as torchtitan does), and gives DCP's async save
            # the CPU backend it requires next to NCCL.
            self._group = dist.new_group(backend="gloo")

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, state: dict[str, Any], *, per_rank: dict[str, Any]) -> Path:
        """`state` holds DCP-able entries (tensors / DTensors / nested dicts); `per_rank` this rank's extras.

        Synchronous: returns when the checkpoint is complete. Async (`checkpoint.async_save`): returns once the state
        is staged; the checkpoint is complete after `wait()` (or a `poll()` that saw it finish)."""
        self.wait()  # one save in flight at a time: the previous one completes (and is marked) first
        path = step_dir(self.root, step)
        if self.rank == 0:
            if path.exists():  # a half-written save of the same step from a killed run
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier()
        t0 = time.perf_counter()
        # Before the shards: once rank 0's DCP save has finished, every rank's file is then known to exist.
        torch.save(
            {"rng": rng_state(), "data": _to_builtin(per_rank.get("data")), "step": step},
            path / f"rank_{self.rank:05d}.pt",
        )
        if self.cfg.async_save:
            response = dcp.async_save(state, checkpoint_id=str(path), process_group=self._group)
            future = getattr(response, "upload_completion", response)  # an AsyncSaveResponse with async staging
            self.last_blocked_s = time.perf_counter() - t0
            self.pending = _Pending(step, path, future, t0, self.last_blocked_s)
            return path
        dcp.save(state, checkpoint_id=str(path))
        barrier()
        if self.rank == 0:
            self._mark_complete(step, path, seconds=time.perf_counter() - t0)
        barrier()
        self.last_blocked_s = time.perf_counter() - t0
        return path

    def poll(self) -> None:
        """Complete an async save that has finished (never blocks); call it once per step."""
        if self.pending is not None and self.pending.future.done():
            self.wait()

    def wait(self) -> None:
        """Block until the async save in flight (if any) has finished, then mark it complete (rank 0)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        pending.future.result()  # re-raises a failed write here, on the training thread
        if self.rank == 0:
            self._mark_complete(pending.step, pending.path, seconds=time.perf_counter() - pending.started,
                                blocked_s=pending.blocked_s)

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _mark_complete(self, step: int, path: Path, *, seconds: float, blocked_s: float | None = None) -> None:
        meta = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "seconds": round(seconds, 3)}
        if blocked_s is not None:
            meta.update(async_save=True, blocked_s=round(blocked_s, 3))
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.rename(path / MARKER)  # atomic: the marker appears whole or not at all
        self._prune()

    def _prune(self) -> None:
        complete = list_checkpoints(self.root)
        keep = {p for _, p in complete[-self.cfg.keep_last :]}
        newest = complete[-1][0] if complete else -1
        for s, p in list_checkpoints(self.root, complete_only=False):
            # Older incomplete dirs are debris of killed saves; newer ones may be an async save still being written.
            if p not in keep and s <= newest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Loads DCP entries into `state` in place; restores this rank's RNG; returns its per-rank extras."""
        if not is_complete(path):
            raise ValueError(f"checkpoint '{path}' is incomplete (no {MARKER} marker)")
        saved_world = json.loads((path / MARKER).read_text()).get("world_size")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved_world is not None and saved_world != world:
            raise ValueError(
                f"checkpoint '{path}' was written by {saved_world} processes, this run has {world}: resume with the "
                f"same number (RNG and data-loader position are per rank)"
            )
        safe_load(state, path)
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise ValueError(
                f"checkpoint '{path}' has no {rank_file.name}: it was written with a different world size"
            )
        extras = torch.load(rank_file, weights_only=True)
        set_rng_state(extras["rng"])
        return extras
