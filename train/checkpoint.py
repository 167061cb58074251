"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run_dir>/checkpoints/step_<N:08d>/` holds the DCP shards (model trainable state, optimizer, scheduler, EMA,
step) plus one `rank_<r>.pt` per rank with what differs per rank (RNG states, data-loader position). The file
`COMPLETE` is written last, by rank 0, after every rank finished: a checkpoint without it never counts, so a job
killed in the middle of a save resumes from the previous one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

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


class CheckpointManager:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, state: dict[str, Any], *, per_rank: dict[str, Any]) -> Path:
        """`state` holds DCP-able entries (tensors / DTensors / nested dicts); `per_rank` this rank's extras."""
        path = step_dir(self.root, step)
        if self.rank == 0:
            if path.exists():  # a half-written save of the same step from a killed run
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(path))
        torch.save(
            {"rng": rng_state(), "data": _to_builtin(per_rank.get("data")), "step": step},
            path / f"rank_{self.rank:05d}.pt",
        )
        barrier()
        if self.rank == 0:
            meta = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "seconds": round(time.perf_counter() - t0, 3)}
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(json.dumps(meta))
            tmp.rename(path / MARKER)  # atomic: the marker appears whole or not at all
            self._prune()
        barrier()
        return path

    def _prune(self) -> None:
        complete = list_checkpoints(self.root)
        keep = {p for _, p in complete[-self.cfg.keep_last :]}
        newest = complete[-1][0] if complete else -1
        for s, p in list_checkpoints(self.root, complete_only=False):
            # Older incomplete dirs are debris of killed saves; newer ones cannot exist (we just saved the newest).
            if p not in keep and s <= newest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Loads DCP entries into `state` in place; restores this rank's RNG; returns its per-rank extras."""
        if not is_complete(path):
            raise ValueError(f"checkpoint '{path}' is incomplete (no {MARKER} marker)")
        dcp.load(state, checkpoint_id=str(path))
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise ValueError(
                f"checkpoint '{path}' has no {rank_file.name}: it was written with a different world size"
            )
        extras = torch.load(rank_file, weights_only=True)
        set_rng_state(extras["rng"])
        return extras
